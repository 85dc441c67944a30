"""Box-region losses: a logit map trained to cover an object's box (box-supervised segmentation).

A box head that reads its box off a dense map (:class:`trp.heads.BoxHead` ``decoder="light"`` with
``region=True``) needs only the box as ground truth: the target is the box's filled rectangle.
Where the data also has the object's mask, the mask is the better target: its extent is the
same (tight) box, and unlike a rectangle's empty corners it is a property of the pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from trp.heads.box_format import box_cxcywh_to_xyxy

__all__ = ["box_region_loss", "box_region_masks"]


def box_region_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``boxes`` [N, 4] normalised cxcywh -> ``Tensor[N, H, W]`` float: 1 where a pixel centre is
    inside the box."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] cxcywh, got {list(boxes.shape)}")
    h, w = int(size[0]), int(size[1])
    b = boxes.float()
    y = (torch.arange(h, device=b.device, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, device=b.device, dtype=torch.float32) + 0.5) / w
    x0, y0, x1, y1 = box_cxcywh_to_xyxy(b).unbind(-1)
    inside_x = (x[None] >= x0[:, None]) & (x[None] <= x1[:, None])  # N x W
    inside_y = (y[None] >= y0[:, None]) & (y[None] <= y1[:, None])  # N x H
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def box_region_loss(
    logits: Tensor, boxes: Tensor, *, masks: Tensor | None = None
) -> dict[str, Tensor]:
    """Sigmoid cross-entropy (mean over pixels) and dice of ``logits`` [N, H, W] against the
    regions of ``boxes`` [N, 4] (normalised cxcywh), or, when given, against ``masks`` [N, H, W]
    (the objects' masks at the logits' resolution, values in [0, 1], e.g. area fractions), each
    averaged over the N objects.

    Returns ``{"loss_region_ce", "loss_region_dice"}`` (zeros, still in the graph, for N = 0).
    """
    if logits.dim() != 3 or boxes.shape != (logits.shape[0], 4):
        raise ValueError(
            f"logits must be [N, H, W] and boxes [N, 4], got {list(logits.shape)} and "
            f"{list(boxes.shape)}"
        )
    if masks is not None and masks.shape != logits.shape:
        raise ValueError(
            f"masks must match the logits' shape {list(logits.shape)}, got {list(masks.shape)}"
        )
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return {"loss_region_ce": zero, "loss_region_dice": zero}
    if masks is not None:
        target = masks.to(device=logits.device, dtype=torch.float32)
    else:
        target = box_region_masks(boxes, tuple(logits.shape[-2:]))
    pred = logits.float()
    ce = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean((1, 2))
    prob = pred.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return {"loss_region_ce": ce.mean(), "loss_region_dice": dice.mean()}
