"""trp.losses.HungarianMatcher: optimal assignments per image."""

from __future__ import annotations

import itertools

import pytest
import torch

from trp.losses import HungarianMatcher, flatten_targets
from trp.ops import match_cost


def brute_force_min(cost: torch.Tensor) -> float:
    q, g = cost.shape
    best = float("inf")
    for rows in itertools.permutations(range(q), g):
        best = min(best, float(cost[list(rows), list(range(g))].sum()))
    return best


def test_assignment_is_optimal():
    gen = torch.Generator().manual_seed(1)
    b, q, k = 3, 5, 4
    logits = torch.randn(b, q, k, generator=gen)
    boxes = torch.rand(b, q, 4, generator=gen) * 0.5 + 0.1
    sizes = [3, 0, 5]
    targets = [
        {
            "labels": torch.randint(0, k, (n,), generator=gen),
            "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1,
        }
        for n in sizes
    ]
    matches = HungarianMatcher()(logits, boxes, targets)
    labels, tboxes, offsets = flatten_targets(targets)
    blocks = match_cost(logits, boxes, labels, tboxes, offsets).blocks()
    for (rows, cols), cost, n in zip(matches, blocks, sizes):
        assert len(rows) == len(cols) == min(q, n)
        assert rows.dtype == torch.int64 and (rows.diff() > 0).all()
        if n:
            assert float(cost[rows, cols].sum()) == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_perfect_predictions_match_identity():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.2, 0.3], [0.4, 0.8, 0.3, 0.1]])
    perm = torch.tensor([2, 0, 1])
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": boxes}]
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 3).float()[perm] * 10
    rows, cols = HungarianMatcher()(logits[None], boxes[perm][None], targets)[0]
    assert perm[rows].tolist() == cols.tolist()


def test_focal_mode_and_no_labels():
    boxes = torch.rand(1, 4, 4)
    matcher = HungarianMatcher(class_mode="focal", weight_class=2.0)
    targets = [{"labels": torch.tensor([1]), "boxes": boxes[0, 2:3]}]
    rows, cols = matcher(torch.zeros(1, 4, 3), boxes, targets)[0]
    assert rows.tolist() == [2] and cols.tolist() == [0]
    rows, cols = HungarianMatcher()(None, boxes, [{"boxes": boxes[0, 1:2]}])[0]
    assert rows.tolist() == [1]


def test_bad_targets():
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="target dicts"):
        matcher(None, torch.rand(2, 3, 4), [{"boxes": torch.rand(1, 4)}])
    with pytest.raises(KeyError, match="boxes"):
        matcher(None, torch.rand(1, 3, 4), [{"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="every target"):
        flatten_targets(
            [{"boxes": torch.rand(1, 4)}, {"boxes": torch.rand(1, 4), "labels": torch.tensor([0])}]
        )
    nan_boxes = torch.full((1, 2, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher(strict=True)(None, nan_boxes, [{"boxes": torch.rand(1, 4)}])
    with pytest.warns(RuntimeWarning, match="matched last"):
        ((rows, cols),) = matcher(None, nan_boxes, [{"boxes": torch.rand(1, 4)}])
    assert rows.numel() == cols.numel() == 1


def test_nan_costs_are_matched_last_with_a_warning_or_raise_when_strict():
    from trp.losses import assign

    cost = torch.tensor([[0.1, float("nan"), 0.9], [float("inf"), 0.2, 0.5]])
    with pytest.warns(RuntimeWarning, match="2 NaN/inf"):
        ((rows, cols),) = assign([cost])
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]
    only_bad = torch.full((2, 2), float("nan"))
    with pytest.warns(RuntimeWarning):
        ((rows, cols),) = assign([only_bad])
    assert sorted(cols.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="NaN or inf"):
        assign([cost], strict=True)
