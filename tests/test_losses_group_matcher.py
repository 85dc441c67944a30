"""Group-wise Hungarian matching (GroupMatcher, match_in_groups)."""

from __future__ import annotations

import itertools

import pytest
import torch

from trp.heads import box_cxcywh_to_xyxy
from trp.losses import GroupMatcher
from trp.ops import generalized_box_iou


def _brute_force(pred, tgt, pg, tg):
    """Minimum-cost assignment per group by enumeration."""
    pairs = []
    for g in torch.unique(torch.cat([pg, tg])).tolist():
        p = torch.nonzero(pg == g).flatten().tolist()
        t = torch.nonzero(tg == g).flatten().tolist()
        if not p or not t:
            continue
        cost = 5 * torch.cdist(pred[p], tgt[t], p=1) - 2 * generalized_box_iou(
            box_cxcywh_to_xyxy(pred[p]), box_cxcywh_to_xyxy(tgt[t])
        )
        best, best_pairs = float("inf"), None
        k = min(len(p), len(t))
        for rows in itertools.permutations(range(len(p)), k):
            for cols in itertools.combinations(range(len(t)), k):
                c = sum(cost[r, c_].item() for r, c_ in zip(rows, cols))
                if c < best - 1e-9:
                    best, best_pairs = c, [(p[r], t[c_]) for r, c_ in zip(rows, cols)]
        pairs += best_pairs
    return sorted(pairs, key=lambda x: x[1])


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05
    return torch.cat([xy, wh], 1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    # Groups: 7 has 1/1 (direct), 3 has 3 preds / 2 targets, 9 has 2 preds / 3 targets,
    # 4 has preds only, 5 has targets only.
    pg = torch.tensor([3, 7, 9, 3, 3, 9, 4])
    tg = torch.tensor([9, 3, 9, 7, 3, 9, 5])
    pred, tgt = _boxes(len(pg), g), _boxes(len(tg), g)
    pi, ti = GroupMatcher()(pred, tgt, pg, tg)
    assert list(zip(pi.tolist(), ti.tolist())) == _brute_force(pred, tgt, pg, tg)
    assert (pg[pi] == tg[ti]).all()


def test_one_to_one_without_groups_and_errors():
    pred = _boxes(3, torch.Generator().manual_seed(0))
    pi, ti = GroupMatcher()(pred, pred.clone())
    assert pi.tolist() == ti.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one-to-one"):
        GroupMatcher()(pred, pred[:2])
    with pytest.raises(ValueError, match="both"):
        GroupMatcher()(pred, pred, torch.zeros(3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="pred_group"):
        GroupMatcher()(
            pred, pred, torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
        )


def test_empty():
    pi, ti = GroupMatcher()(
        torch.zeros(0, 4),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    assert pi.numel() == ti.numel() == 0
