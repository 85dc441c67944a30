"""``KeypointCriterion``: L1 on visible keypoints, OKS loss (1 − OKS) and visibility BCE, with
OKS matching (``trp.ops.oks_cost``) when several instances share a triplet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.losses.group_matcher import match_in_groups

# The one copy of COCO's sigmas lives with the fused OKS op; re-exported for criteria users.
from trp.ops.oks import COCO_KEYPOINT_SIGMAS, oks_cost

__all__ = ["COCO_KEYPOINT_SIGMAS", "KeypointCriterion", "object_keypoint_similarity"]


def object_keypoint_similarity(
    pred: Tensor, target: Tensor, areas: Tensor, sigmas: Tensor, eps: float = 1e-6
) -> Tensor:
    """Differentiable OKS of paired instances.

    ``exp(−d² / (2·s²·(2σ)²))`` averaged over visible keypoints, ``s²`` = object area; all in
    the same (normalised) units. ``pred`` [N, K, 2], ``target`` [N, K, 3] (x, y, v), ``areas`` [N],
    ``sigmas`` [K] -> [N] (1 where an instance has no visible keypoint).
    """
    vis = (target[..., 2] > 0).to(pred.dtype)  # N x K
    d2 = ((pred - target[..., :2]) ** 2).sum(-1)  # N x K
    var = (2 * sigmas) ** 2
    e = d2 / (2 * var[None, :] * (areas[:, None] + eps))
    num = vis.sum(-1)
    oks = ((-e).exp() * vis).sum(-1) / num.clamp(min=1)
    return torch.where(num > 0, oks, torch.ones_like(oks))


class KeypointCriterion(nn.Module):
    """Losses of :class:`trp.heads.KeypointHead` (weighted): ``loss_kpt_l1`` (L1 of visible
    points / visible count), ``loss_oks`` (mean 1 − OKS), ``loss_visibility`` (BCE of the
    visibility logits to ``v > 0``); ``_{i}`` copies of the first two for aux layers.

    Args:
        sigmas: per-keypoint OKS sigmas (default COCO's 17; required for other K).
    """

    def __init__(
        self,
        *,
        num_keypoints: int = 17,
        sigmas: Sequence[float] | None = None,
        weight_l1: float = 5.0,
        weight_oks: float = 2.0,
        weight_visibility: float = 1.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if sigmas is None:
            if num_keypoints != len(COCO_KEYPOINT_SIGMAS):
                raise ValueError(f"give sigmas for {num_keypoints} keypoints (COCO's are for 17)")
            sigmas = COCO_KEYPOINT_SIGMAS
        if len(sigmas) != num_keypoints or min(sigmas) <= 0:
            raise ValueError(f"sigmas must be {num_keypoints} positive numbers")
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float32), persistent=False)
        self.num_keypoints = num_keypoints
        self.weight_l1 = weight_l1
        self.weight_oks = weight_oks
        self.weight_visibility = weight_visibility
        self.aux_loss = aux_loss

    @torch.no_grad()
    def match(
        self, pred: Tensor, targets: dict, pred_group: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(pred_idx, tgt_idx)``: OKS-cost Hungarian matching inside groups."""
        kpts, areas = targets["keypoints"], targets["areas"]
        tgt_group = targets.get("group")
        if (pred_group is None) != (tgt_group is None):
            raise ValueError("give both pred_group and targets['group'], or neither")
        if pred_group is None:
            if pred.shape[0] != kpts.shape[0]:
                raise ValueError(
                    f"without groups predictions and targets pair one-to-one, got "
                    f"{pred.shape[0]} predictions and {kpts.shape[0]} targets"
                )
            idx = torch.arange(pred.shape[0])
            return idx, idx.clone()
        sigmas = self.sigmas.to(pred)

        def cost(pred_rows: Tensor, tgt_order: Tensor, offsets: Tensor) -> list[Tensor]:
            dev = pred.device
            p = pred.detach()[pred_rows.clamp(min=0).to(dev)]  # Gm x M x K x 2
            order = tgt_order.to(dev)
            tgt = kpts[order].to(pred)
            packed = oks_cost(
                p,
                tgt[..., :2].contiguous(),
                tgt[..., 2].contiguous(),
                areas[order].to(pred),
                offsets.to(dev),
                sigmas=sigmas,
            )
            return packed.blocks()

        return match_in_groups(pred_group, tgt_group, cost)

    def _points(self, pred: Tensor, tgt: Tensor, areas: Tensor) -> tuple[Tensor, Tensor]:
        vis = (tgt[..., 2] > 0).to(pred.dtype)
        num_vis = vis.sum().clamp(min=1)
        l1 = ((pred - tgt[..., :2]).abs().sum(-1) * vis).sum() / num_vis
        oks = object_keypoint_similarity(pred, tgt, areas, self.sigmas.to(pred))
        loss_oks = (1 - oks).sum() / max(tgt.shape[0], 1)
        return self.weight_l1 * l1, self.weight_oks * loss_oks

    def forward(
        self, predictions: dict, targets: dict, *, pred_group: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            predictions: :class:`KeypointHead` output.
            targets: ``keypoints`` (Tensor[G, K, 3]: x, y normalised to [0, 1], v > 0 visible),
                ``areas`` (Tensor[G], object area in normalised units, e.g. box w·h), optional
                ``group`` (Tensor[G], int64).
            pred_group (Tensor[N], int64, optional): the group (triplet) of each prediction.
        """
        kpts, areas = targets.get("keypoints"), targets.get("areas")
        k = self.num_keypoints
        if not isinstance(kpts, Tensor) or kpts.dim() != 3 or kpts.shape[1:] != (k, 3):
            raise ValueError(f"targets['keypoints'] must have shape [G, {k}, 3]")
        if not isinstance(areas, Tensor) or areas.shape != kpts.shape[:1]:
            raise ValueError(f"targets['areas'] must have shape [{kpts.shape[0]}]")
        pred = predictions["keypoints"]
        if pred.dim() != 3 or pred.shape[1:] != (k, 2):
            raise ValueError(f"predictions['keypoints'] must have shape [N, {k}, 2]")
        pi, ti = self.match(pred, targets, pred_group)
        pi, ti = pi.to(pred.device), ti.to(pred.device)
        tgt, tgt_areas = kpts.to(pred)[ti], areas.to(pred)[ti]
        l1, oks = self._points(pred[pi], tgt, tgt_areas)
        vis_logits = predictions["visibility"][pi]
        vis = F.binary_cross_entropy_with_logits(
            vis_logits, (tgt[..., 2] > 0).to(pred.dtype), reduction="sum"
        ) / max(vis_logits.numel(), 1)
        losses = {
            "loss_kpt_l1": l1,
            "loss_oks": oks,
            "loss_visibility": self.weight_visibility * vis,
        }
        if self.aux_loss:
            for i, aux in enumerate(predictions.get("aux", [])):
                l1_i, oks_i = self._points(aux["keypoints"][pi], tgt, tgt_areas)
                losses[f"loss_kpt_l1_{i}"] = l1_i
                losses[f"loss_oks_{i}"] = oks_i
        return losses
