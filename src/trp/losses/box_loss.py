"""``BoxCriterion``: L1 + GIoU box losses and a box-quality score loss, with group matching."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.heads.box_format import box_cxcywh_to_xyxy
from trp.losses.box_region_loss import box_region_loss
from trp.losses.group_matcher import GroupMatcher
from trp.ops import box_iou, generalized_box_iou

# box_cxcywh_to_xyxy stays importable from here (trp.recipes imports it from trp.losses).
__all__ = ["BoxCriterion", "box_cxcywh_to_xyxy"]

ScoreTarget = Literal["giou", "iou"]


class BoxCriterion(nn.Module):
    """Losses of :class:`trp.heads.BoxHead` (PaDT / DETR recipe).

    * ``loss_bbox``: ``weight_l1 ·`` L1 of matched cxcywh boxes,
    * ``loss_giou``: ``weight_giou ·`` (1 − GIoU),
      both summed over matched pairs and divided by the number of target boxes (>= 1);
    * ``loss_score``: ``weight_score ·`` mean over matched pairs of the score regressed to the
      detached box quality: ``score_target="giou"`` (PaDT): MSE of ``sigmoid(s)·2 − 1`` to GIoU;
      ``"iou"``: BCE of ``sigmoid(s)`` to IoU.

    * ``loss_region_ce``, ``loss_region_dice`` (with ``weight_region > 0`` and a head that
      predicts ``region_logits``, the light box head's box-region map): ``weight_region ·``
      :func:`trp.losses.box_region_loss` of the matched pairs, against the target's
      ``masks`` (area fractions at the map's size) when the targets hold them and
      ``region_target="mask"``, else its filled box.

    With ``aux_loss`` every earlier decoder layer gets the box losses, keys suffixed ``_{i}``.
    Matching is per layer, inside groups (see :class:`trp.losses.GroupMatcher`).
    """

    def __init__(
        self,
        *,
        weight_l1: float = 5.0,
        weight_giou: float = 2.0,
        weight_score: float = 1.0,
        score_target: ScoreTarget = "giou",
        aux_loss: bool = True,
        matcher: GroupMatcher | None = None,
        weight_region: float = 0.0,
        region_target: Literal["mask", "box"] = "mask",
    ) -> None:
        super().__init__()
        if score_target not in ("giou", "iou"):
            raise ValueError(f"score_target must be 'giou' or 'iou', got {score_target!r}")
        if not weight_region >= 0:
            raise ValueError(f"weight_region must be >= 0, got {weight_region}")
        self.weight_region = float(weight_region)
        if region_target not in ("mask", "box"):
            raise ValueError(f"region_target must be 'mask' or 'box', got {region_target!r}")
        self.region_target = region_target
        self.weight_l1 = weight_l1
        self.weight_giou = weight_giou
        self.weight_score = weight_score
        self.score_target: ScoreTarget = score_target
        self.aux_loss = aux_loss
        self.matcher = matcher if matcher is not None else GroupMatcher()

    def _single(
        self,
        boxes: Tensor,
        scores: Tensor,
        targets: dict,
        pred_group: Tensor | None,
        num_boxes: float,
        region_logits: Tensor | None = None,
    ) -> dict[str, Tensor]:
        tgt_boxes = targets["boxes"].to(boxes)
        pi, ti = self.matcher(boxes, tgt_boxes, pred_group, targets.get("group"))
        pi, ti = pi.to(boxes.device), ti.to(boxes.device)
        src, tgt = boxes[pi], tgt_boxes[ti]
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
        giou = torch.diagonal(generalized_box_iou(src_xyxy, tgt_xyxy)) if len(pi) else src[:, 0]
        loss_giou = (1 - giou).sum() / num_boxes
        s = scores[pi]
        if not len(pi):
            loss_score = s.sum()
        elif self.score_target == "giou":
            loss_score = F.mse_loss(s.sigmoid() * 2 - 1, giou.detach())
        else:
            iou = torch.diagonal(box_iou(src_xyxy.detach(), tgt_xyxy))
            loss_score = F.binary_cross_entropy_with_logits(s, iou)
        out = {
            "loss_bbox": self.weight_l1 * loss_bbox,
            "loss_giou": self.weight_giou * loss_giou,
            "loss_score": self.weight_score * loss_score,
        }
        if region_logits is not None:
            masks = targets.get("masks")
            region = box_region_loss(
                region_logits[pi], tgt, masks=None if masks is None else masks[ti.to(masks.device)]
            )
            out.update({k: self.weight_region * v for k, v in region.items()})
        return out

    def forward(
        self, predictions: dict, targets: dict, *, pred_group: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            predictions: :class:`BoxHead` output (``boxes`` [N, 4], ``scores`` [N], ``aux``).
            targets: ``boxes`` (Tensor[G, 4], normalised cxcywh), optionally ``group``
                (Tensor[G], int64: the triplet each target belongs to) and ``masks``
                (Tensor[G, h, w], the objects' masks, for the region loss; resized by area to the
                region map's size).
            pred_group (Tensor[N], int64, optional): the triplet of each prediction; without
                groups predictions and targets pair one-to-one in order.
        Returns:
            ``loss_bbox``, ``loss_giou``, ``loss_score`` (weighted) and their ``_{i}`` aux copies;
            ``loss_region_ce``, ``loss_region_dice`` with the region loss.
        """
        if "boxes" not in targets:
            raise KeyError("targets must hold 'boxes' [G, 4]")
        tb = targets["boxes"]
        if not isinstance(tb, Tensor) or tb.dim() != 2 or tb.shape[1] != 4:
            raise ValueError("targets['boxes'] must have shape [G, 4]")
        num_boxes = max(float(tb.shape[0]), 1.0)
        region = predictions.get("region_logits") if self.weight_region > 0 else None
        if region is not None and self.region_target == "box":
            targets = {k: v for k, v in targets.items() if k != "masks"}
        masks = targets.get("masks") if region is not None else None
        if masks is not None and masks.shape[1:] != region.shape[1:]:
            # Area fractions at the region map's size (an HF host's map may be coarser).
            masks = F.interpolate(masks[:, None].float(), size=region.shape[1:], mode="area")[:, 0]
            targets = {**targets, "masks": masks}
        losses = self._single(
            predictions["boxes"], predictions["scores"], targets, pred_group, num_boxes, region
        )
        if self.aux_loss:
            for i, aux in enumerate(predictions.get("aux", [])):
                part = self._single(aux["boxes"], aux["scores"], targets, pred_group, num_boxes)
                losses.update({f"{k}_{i}": v for k, v in part.items()})
        return losses
