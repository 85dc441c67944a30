"""Hungarian matching *inside groups* (a triplet's targets), not inside images.

A triplet ``[0]<REF>[1]<REF>`` with two ground-truth objects may emit its queries in any order:
its predictions are matched to its targets only. A group plays the part of the "image" of
:func:`trp.ops.match_cost` (offsets over groups). Groups with exactly one prediction and one
target are paired directly (single-target expressions need no matching).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trp.losses.matcher import assign
from trp.ops import match_cost

__all__ = ["GroupMatcher", "match_in_groups"]

# Cost of a padding row: larger than any real cost, so padding is only used when a group has
# more targets than predictions (those targets then stay unmatched).
_PAD_COST = 1e6

CostFn = Callable[[Tensor, Tensor, Tensor], list[Tensor]]


def _check_group(group: object, n: int, name: str) -> Tensor:
    if not isinstance(group, Tensor) or group.dtype != torch.int64 or group.shape != (n,):
        raise ValueError(f"{name} must be an int64 tensor of shape [{n}]")
    return group


def match_in_groups(
    pred_group: Tensor, tgt_group: Tensor, cost_fn: CostFn
) -> tuple[Tensor, Tensor]:
    """One-to-one assignment of predictions to targets within each group.

    Args:
        pred_group (Tensor[N], int64): group id of each prediction (any ids).
        tgt_group (Tensor[G], int64): group id of each target.
        cost_fn: ``cost_fn(pred_rows [Gm, M], tgt_order [G'], offsets [Gm + 1])`` returns the
            ``[M, G_g]`` cost blocks of the groups that need matching; ``pred_rows`` holds the
            prediction index of each padded row (-1 = padding, fill it with anything finite) and
            ``tgt_order`` the target indices sorted by group (group g owns
            ``offsets[g]:offsets[g + 1]``).
    Returns:
        ``(pred_idx [K], tgt_idx [K])`` int64 on CPU, pairs sorted by target index.
    """
    pred_group, tgt_group = pred_group.cpu(), tgt_group.cpu()
    ids, inverse = torch.unique(torch.cat([pred_group, tgt_group]), return_inverse=True)
    pg, tg = inverse[: pred_group.numel()], inverse[pred_group.numel() :]
    n_pred = torch.bincount(pg, minlength=ids.numel())
    n_tgt = torch.bincount(tg, minlength=ids.numel())
    single = (n_pred == 1) & (n_tgt == 1)
    # Direct pairs: a group with one prediction and one target.
    pred_single = torch.nonzero(single[pg]).flatten()
    tgt_single = torch.nonzero(single[tg]).flatten()
    first_pred = torch.full((ids.numel(),), -1, dtype=torch.int64)
    first_pred[pg[pred_single]] = pred_single
    pairs_p, pairs_t = [first_pred[tg[tgt_single]]], [tgt_single]
    multi = torch.nonzero(~single & (n_pred > 0) & (n_tgt > 0)).flatten()
    if multi.numel():
        local = torch.full((ids.numel(),), -1, dtype=torch.int64)
        local[multi] = torch.arange(multi.numel())
        width = int(n_pred[multi].max())
        pred_rows = torch.full((multi.numel(), width), -1, dtype=torch.int64)
        p_in = torch.nonzero(local[pg] >= 0).flatten()
        p_sorted = p_in[torch.sort(local[pg[p_in]], stable=True).indices]
        counts = n_pred[multi]
        starts = counts.cumsum(0) - counts
        col = torch.arange(p_sorted.numel()) - starts[local[pg[p_sorted]]]
        pred_rows[local[pg[p_sorted]], col] = p_sorted
        t_in = torch.nonzero(local[tg] >= 0).flatten()
        t_sorted = t_in[torch.sort(local[tg[t_in]], stable=True).indices]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), n_tgt[multi].cumsum(0)])
        blocks = cost_fn(pred_rows, t_sorted, offsets)
        padded = []
        for g, block in enumerate(blocks):
            block = block.detach().cpu().double().clone()
            block[pred_rows[g] < 0] = _PAD_COST
            padded.append(block)
        bounds = offsets.tolist()
        for g, (rows, cols) in enumerate(assign(padded)):
            p = pred_rows[g, rows]
            keep = p >= 0
            pairs_p.append(p[keep])
            pairs_t.append(t_sorted[bounds[g] + cols[keep]])
    pred_idx, tgt_idx = torch.cat(pairs_p), torch.cat(pairs_t)
    order = torch.argsort(tgt_idx)
    return pred_idx[order], tgt_idx[order]


class GroupMatcher(nn.Module):
    """Box matching inside groups with DETR's cost (``5·L1 − 2·GIoU``) from ``trp.ops.match_cost``.

    Args:
        weight_bbox, weight_giou: cost weights.
    """

    def __init__(self, *, weight_bbox: float = 5.0, weight_giou: float = 2.0) -> None:
        super().__init__()
        if min(weight_bbox, weight_giou) < 0:
            raise ValueError("cost weights must be non-negative")
        self.weight_bbox = weight_bbox
        self.weight_giou = weight_giou

    @torch.no_grad()
    def forward(
        self,
        pred_boxes: Tensor,
        tgt_boxes: Tensor,
        pred_group: Tensor | None = None,
        tgt_group: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match.

        Args:
            pred_boxes (Tensor[N, 4]), tgt_boxes (Tensor[G, 4]): normalised cxcywh.
            pred_group (Tensor[N]), tgt_group (Tensor[G]): group ids; both None means
                one-to-one in order (then N must equal G).
        Returns:
            ``(pred_idx [K], tgt_idx [K])`` int64 on CPU.
        """
        n, g = pred_boxes.shape[0], tgt_boxes.shape[0]
        if (pred_group is None) != (tgt_group is None):
            raise ValueError("give both pred_group and tgt_group, or neither")
        if pred_group is None:
            if n != g:
                raise ValueError(
                    f"without groups predictions and targets pair one-to-one, got "
                    f"{n} predictions and {g} targets"
                )
            idx = torch.arange(n)
            return idx, idx.clone()
        pred_group = _check_group(pred_group, n, "pred_group")
        tgt_group = _check_group(tgt_group, g, "tgt_group")

        def cost(pred_rows: Tensor, tgt_order: Tensor, offsets: Tensor) -> list[Tensor]:
            dev = pred_boxes.device
            boxes = pred_boxes.detach()[pred_rows.clamp(min=0).to(dev)]  # Gm x M x 4
            tgt = tgt_boxes.detach()[tgt_order.to(dev)].to(boxes.dtype)  # G' x 4
            packed = match_cost(
                None,
                boxes,
                None,
                tgt,
                offsets.to(dev),
                weight_class=0.0,
                weight_bbox=self.weight_bbox,
                weight_giou=self.weight_giou,
            )
            return packed.blocks()

        return match_in_groups(pred_group, tgt_group, cost)
