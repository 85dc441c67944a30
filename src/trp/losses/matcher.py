"""Hungarian matching of predictions to targets, one assignment per image (DETR family).

The costs come from the fused per-image kernel :func:`trp.ops.match_cost` (no [B·Q, ΣG] matrix);
the assignment from scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from trp.ops.match_cost import ClassMode, MatchCost

__all__ = ["HungarianMatcher", "assign", "flatten_targets"]


def flatten_targets(
    targets: Sequence[dict[str, Tensor]], device: torch.device | None = None
) -> tuple[Tensor | None, Tensor, Tensor]:
    """DETR-style per-image target dicts -> (labels [G] or None, boxes [G, 4], offsets [B + 1]).

    Each dict holds ``boxes`` (Tensor[G_b, 4], normalised cxcywh) and optionally ``labels``
    (Tensor[G_b], int64); either every dict has labels or none has.
    """
    if not isinstance(targets, Sequence) or not all(isinstance(t, dict) for t in targets):
        raise TypeError("targets must be a sequence of dicts with 'boxes' (and 'labels')")
    for i, t in enumerate(targets):
        if "boxes" not in t:
            raise KeyError(f"targets[{i}] has no 'boxes'")
    has_labels = {"labels" in t for t in targets}
    if len(has_labels) > 1:
        raise ValueError("either every target dict has 'labels' or none has")
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    offsets = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    if not targets:
        boxes = torch.zeros((0, 4), device=device)
        return None, boxes, offsets
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    labels = torch.cat([t["labels"] for t in targets]).to(device) if has_labels == {True} else None
    return labels, boxes, offsets.to(boxes.device)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of each image's queries to its targets by minimum total cost.

    Args:
        weight_class, weight_bbox, weight_giou: cost weights (DETR: 1, 5, 2).
        class_mode: ``"softmax"`` (DETR) or ``"focal"`` (Deformable-DETR, DINO).
        strict: raise on NaN / infinite costs instead of matching them last with a warning.
    """

    def __init__(
        self,
        *,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        class_mode: ClassMode = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.strict = bool(strict)
        self.cost = MatchCost(
            weight_class=weight_class,
            weight_bbox=weight_bbox,
            weight_giou=weight_giou,
            class_mode=class_mode,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        )

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor | None,
        pred_boxes: Tensor,
        targets: Sequence[dict[str, Tensor]],
    ) -> list[tuple[Tensor, Tensor]]:
        """Match.

        Args:
            pred_logits (Tensor[B, Q, K] or None), pred_boxes (Tensor[B, Q, 4], cxcywh).
            targets: B dicts with ``boxes`` (Tensor[G_b, 4], cxcywh) and ``labels``.
        Returns:
            B pairs ``(query_idx [min(Q, G_b)], target_idx [min(Q, G_b)])`` (int64, on CPU),
            sorted by query index as DETR returns them.
        """
        if len(targets) != pred_boxes.shape[0]:
            raise ValueError(
                f"got {len(targets)} target dicts for a batch of {pred_boxes.shape[0]} images"
            )
        labels, boxes, offsets = flatten_targets(targets, pred_boxes.device)
        boxes = boxes.to(pred_boxes.dtype)
        packed = self.cost(pred_logits, pred_boxes, labels, boxes, offsets)
        return assign(packed.blocks(), strict=self.strict)


def assign(blocks: Sequence[Tensor], *, strict: bool = False) -> list[tuple[Tensor, Tensor]]:
    """``linear_sum_assignment`` on each [Q, G_b] cost block.

    A block with NaN or infinite entries (e.g. a diverged box in one image) does not end the
    run: those entries cost more than every finite one, so they are matched last (as
    transformers' DETR matcher does), and a warning counts them. ``strict=True`` raises instead.
    """
    out = []
    invalid = 0
    for cost in blocks:
        if cost.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            out.append((empty, empty.clone()))
            continue
        values = cost.detach().cpu().double()
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            if strict:
                raise ValueError("matching cost contains NaN or inf (check the predicted boxes)")
            invalid += int(bad.sum())
            finite = values[~bad]
            top = float(finite.abs().max()) if finite.numel() else 0.0
            # Larger than any sum of finite costs of one assignment.
            values = values.masked_fill(bad, (top + 1.0) * (min(values.shape) + 1))
        rows, cols = linear_sum_assignment(values.numpy())
        out.append(
            (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
        )
    if invalid:
        warnings.warn(
            f"{invalid} NaN/inf matching costs were matched last (pass strict=True to raise)",
            RuntimeWarning,
            stacklevel=2,
        )
    return out
