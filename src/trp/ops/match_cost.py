"""Per-image matching cost of the DETR family (``torch.ops.trp.match_cost``).

DETR's matcher builds the cost of every prediction against every target of the *batch*
([B·Q, ΣG]) and then throws away all but the diagonal blocks. Here each image's predictions are
scored against its own targets only: the output is the packed concatenation of the [Q, G_b]
blocks ([Q·G] in all), computed by one fused kernel.

cost = weight_class · class_cost[q, label] + weight_bbox · L1(cxcywh) − weight_giou · GIoU(xyxy)

with the class cost in DETR's softmax form (−p[label]) or in Deformable-DETR/DINO's focal form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import (
    call_reference,
    check_floating,
    check_offsets,
    check_same,
    check_tensor,
    check_values_here,
    float_dtype,
)

__all__ = ["MatchCost", "PackedCost", "class_cost_table", "match_cost"]

ClassMode = Literal["softmax", "focal"]


@dataclass(frozen=True)
class PackedCost:
    """Per-image cost blocks packed into one flat tensor.

    Attributes:
        costs (Tensor[Q * G]): image b's [Q, G_b] block starts at ``Q * offsets[b]``.
        offsets (Tensor[B + 1], int64): target offsets per image,
            ``G_b = offsets[b + 1] - offsets[b]``.
        num_queries (int): Q.
    """

    costs: Tensor
    offsets: Tensor
    num_queries: int

    def blocks(self) -> list[Tensor]:
        """Views of the per-image blocks, ``[Tensor[Q, G_b] for b in range(B)]``."""
        bounds = self.offsets.tolist()
        q = self.num_queries
        return [self.costs[q * lo : q * hi].view(q, hi - lo) for lo, hi in zip(bounds, bounds[1:])]


def class_cost_table(
    logits: Tensor, mode: ClassMode = "softmax", *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Cost of assigning each class to each query, ``logits [B, Q, K] -> [B, Q, K]``.

    ``softmax``: −softmax(logits) (DETR). ``focal``: the focal-loss difference between
    labelling the query positive and negative for that class (Deformable-DETR, DINO).
    """
    if mode == "softmax":
        return -logits.softmax(-1)
    if mode == "focal":
        prob = logits.sigmoid()
        neg = (1 - alpha) * prob.pow(gamma) * -torch.log1p(-prob + 1e-8)
        pos = alpha * (1 - prob).pow(gamma) * -torch.log(prob + 1e-8)
        return pos - neg
    raise ValueError(f"class mode must be 'softmax' or 'focal', got {mode!r}")


def match_cost(
    pred_logits: Tensor | None,
    pred_boxes: Tensor,
    tgt_labels: Tensor | None,
    tgt_boxes: Tensor,
    tgt_offsets: Tensor,
    *,
    weight_class: float = 1.0,
    weight_bbox: float = 5.0,
    weight_giou: float = 2.0,
    class_mode: ClassMode = "softmax",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> PackedCost:
    """Matching cost of each image's predictions against its own targets.

    Args:
        pred_logits (Tensor[B, Q, K] or None): class logits; None drops the class term (e.g.
            referring expressions, whose targets carry no class).
        pred_boxes (Tensor[B, Q, 4]): normalised cxcywh.
        tgt_labels (Tensor[G], int64, or None): class of each target, image-major; None only
            with ``pred_logits=None``.
        tgt_boxes (Tensor[G, 4]): normalised cxcywh, image-major.
        tgt_offsets (Tensor[B + 1], int64): image b owns targets ``offsets[b]:offsets[b+1]``.
    Returns:
        :class:`PackedCost` holding ``Tensor[Q * G]``; never differentiable (matching is discrete).
    """
    pred_boxes = check_floating(pred_boxes, "pred_boxes")
    if pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape [B, Q, 4], got {list(pred_boxes.shape)}")
    tgt_boxes = check_floating(tgt_boxes, "tgt_boxes")
    if tgt_boxes.dim() != 2 or tgt_boxes.shape[-1] != 4:
        raise ValueError(f"tgt_boxes must have shape [G, 4], got {list(tgt_boxes.shape)}")
    num_images, num_queries = pred_boxes.shape[:2]
    num_targets = tgt_boxes.shape[0]
    fused = should_use_fused(pred_boxes)
    read_values = check_values_here(pred_boxes, fused)
    if read_values:
        check_offsets(tgt_offsets, num_images, num_targets, "tgt_offsets")
    if pred_logits is None:
        if tgt_labels is not None:
            raise ValueError("tgt_labels given without pred_logits")
        class_cost = pred_boxes.new_zeros((num_images, num_queries, 1))
        tgt_labels = torch.zeros(num_targets, dtype=torch.int64, device=pred_boxes.device)
    else:
        pred_logits = check_floating(pred_logits, "pred_logits")
        if pred_logits.dim() != 3 or pred_logits.shape[:2] != pred_boxes.shape[:2]:
            raise ValueError(
                f"pred_logits must have shape [B, Q, K] = [{num_images}, {num_queries}, K], got "
                f"{list(pred_logits.shape)}"
            )
        tgt_labels = check_tensor(tgt_labels, "tgt_labels")
        if tgt_labels.dtype != torch.int64 or tgt_labels.shape != (num_targets,):
            raise ValueError(
                f"tgt_labels must be int64 of shape [{num_targets}], got {tgt_labels.dtype} "
                f"{list(tgt_labels.shape)}"
            )
        num_classes = pred_logits.shape[-1]
        if (
            read_values
            and num_targets
            and (int(tgt_labels.min()) < 0 or int(tgt_labels.max()) >= num_classes)
        ):
            raise ValueError(f"tgt_labels must lie in [0, {num_classes})")
        # float32 under autocast: bfloat16 class costs would tie near-equal queries.
        class_cost = class_cost_table(
            pred_logits.detach().to(float_dtype(pred_logits)),
            class_mode,
            alpha=focal_alpha,
            gamma=focal_gamma,
        )
    if num_targets and num_queries == 0:
        raise ValueError("targets need at least one query to match")
    check_same({"pred_boxes": pred_boxes, "tgt_boxes": tgt_boxes, "class_cost": class_cost})
    check_same({"pred_boxes": pred_boxes, "tgt_labels": tgt_labels}, dtype=False)
    args = (
        class_cost,
        pred_boxes.detach(),
        tgt_labels,
        tgt_boxes.detach(),
        tgt_offsets.to(pred_boxes.device),
        float(weight_class),
        float(weight_bbox),
        float(weight_giou),
    )
    with torch.no_grad():
        if fused:
            costs = torch.ops.trp.match_cost(*args)
        else:
            costs = call_reference(reference.match_cost, *args)
    return PackedCost(costs=costs, offsets=tgt_offsets, num_queries=num_queries)


class MatchCost(nn.Module):
    """Module form of :func:`match_cost` holding the weights and the class-cost form."""

    def __init__(
        self,
        *,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        class_mode: ClassMode = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_mode not in ("softmax", "focal"):
            raise ValueError(f"class_mode must be 'softmax' or 'focal', got {class_mode!r}")
        if min(weight_class, weight_bbox, weight_giou) < 0:
            raise ValueError("cost weights must be non-negative")
        self.weight_class = weight_class
        self.weight_bbox = weight_bbox
        self.weight_giou = weight_giou
        self.class_mode: ClassMode = class_mode
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self,
        pred_logits: Tensor | None,
        pred_boxes: Tensor,
        tgt_labels: Tensor | None,
        tgt_boxes: Tensor,
        tgt_offsets: Tensor,
    ) -> PackedCost:
        return match_cost(
            pred_logits,
            pred_boxes,
            tgt_labels,
            tgt_boxes,
            tgt_offsets,
            weight_class=self.weight_class,
            weight_bbox=self.weight_bbox,
            weight_giou=self.weight_giou,
            class_mode=self.class_mode,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"weight_class={self.weight_class}, weight_bbox={self.weight_bbox}, "
            f"weight_giou={self.weight_giou}, class_mode={self.class_mode!r}"
        )


def _register() -> None:
    @torch.library.register_fake("trp::match_cost")
    def _(class_cost, pred_boxes, tgt_labels, tgt_boxes, tgt_offsets, wc, wb, wg):
        return class_cost.new_empty((class_cost.shape[1] * tgt_boxes.shape[0],))


if native_available():
    _register()
