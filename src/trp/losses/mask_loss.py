"""``MaskCriterion``: point-sampled dice + sigmoid-CE mask losses (Mask2Former) with group
matching on a shared uniform point set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.losses.group_matcher import match_in_groups
from trp.ops import point_mask_loss

__all__ = ["MaskCriterion", "mask_match_cost"]


def _sample(masks: Tensor, points: Tensor) -> Tensor:
    """``masks`` [N, H, W], ``points`` [P, 2] xy in [0, 1] -> [N, P] (bilinear)."""
    grid = (points * 2 - 1)[None, None].expand(masks.shape[0], -1, -1, -1)  # N x 1 x P x 2
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0, 0]


def mask_match_cost(
    pred_logits: Tensor,
    tgt_masks: Tensor,
    points: Tensor,
    *,
    weight_ce: float = 5.0,
    weight_dice: float = 5.0,
) -> Tensor:
    """Mask2Former's matching cost on shared points: ``[Q, H, W]`` x ``[G, Ht, Wt]`` -> [Q, G]."""
    p = _sample(pred_logits.float(), points)  # Q x P
    t = _sample(tgt_masks.float(), points)  # G x P
    pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
    ce = (pos @ t.T + neg @ (1 - t).T) / p.shape[1]
    prob = p.sigmoid()
    dice = 1 - (2 * prob @ t.T + 1) / (prob.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return weight_ce * ce + weight_dice * dice


class MaskCriterion(nn.Module):
    """Losses of :class:`trp.heads.MaskHead` through the fused ``trp.ops.point_mask_loss``.

    ``loss_mask`` (sigmoid-CE) and ``loss_dice`` on ``num_points`` points per mask chosen by
    Mask2Former's importance sampling (``oversample_ratio``, ``importance_sample_ratio``),
    normalised by the number of target masks, times ``weight_ce`` / ``weight_dice``. Matching
    inside groups uses :func:`mask_match_cost` on ``match_points`` uniform points.
    """

    def __init__(
        self,
        *,
        weight_ce: float = 5.0,
        weight_dice: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        match_points: int = 1024,
    ) -> None:
        super().__init__()
        if num_points <= 0 or match_points <= 0:
            raise ValueError("num_points and match_points must be positive")
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.match_points = match_points

    @torch.no_grad()
    def match(
        self,
        predictions: dict,
        targets: dict,
        pred_group: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(pred_idx, tgt_idx)`` within groups (one-to-one in order without groups)."""
        masks, tgt = predictions["masks"], targets["masks"]
        tgt_group = targets.get("group")
        if (pred_group is None) != (tgt_group is None):
            raise ValueError("give both pred_group and targets['group'], or neither")
        if pred_group is None:
            if masks.shape[0] != tgt.shape[0]:
                raise ValueError(
                    f"without groups predictions and targets pair one-to-one, got "
                    f"{masks.shape[0]} predictions and {tgt.shape[0]} targets"
                )
            idx = torch.arange(masks.shape[0])
            return idx, idx.clone()
        points = torch.rand(
            self.match_points,
            2,
            generator=generator,
            device=generator.device if generator is not None else "cpu",
        )
        points = points.to(masks.device)

        def cost(pred_rows: Tensor, tgt_order: Tensor, offsets: Tensor) -> list[Tensor]:
            bounds = offsets.tolist()
            out = []
            for g in range(pred_rows.shape[0]):
                rows = pred_rows[g].clamp(min=0).to(masks.device)
                cols = tgt_order[bounds[g] : bounds[g + 1]].to(tgt.device)
                out.append(
                    mask_match_cost(
                        masks[rows],
                        tgt[cols].to(masks.device),
                        points,
                        weight_ce=self.weight_ce,
                        weight_dice=self.weight_dice,
                    )
                )
            return out

        return match_in_groups(pred_group, tgt_group, cost)

    def forward(
        self,
        predictions: dict,
        targets: dict,
        *,
        pred_group: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            predictions: :class:`MaskHead` output.
            targets: ``masks`` (Tensor[G, Ht, Wt], bool or {0, 1} float, any resolution) and
                optionally ``group`` (Tensor[G], int64).
            pred_group (Tensor[N], int64, optional): the group (triplet) of each prediction.
            generator: makes the point sampling reproducible.
        Returns:
            ``loss_mask`` and ``loss_dice`` (weighted).
        """
        tgt = targets.get("masks")
        if not isinstance(tgt, Tensor) or tgt.dim() != 3:
            raise ValueError("targets['masks'] must be a Tensor[G, Ht, Wt]")
        pi, ti = self.match(predictions, targets, pred_group, generator)
        embed = predictions["mask_embed"]
        pi = pi.to(embed.device)
        out = point_mask_loss(
            embed[pi],
            predictions["pixel_features"],
            predictions["image_index"][pi],
            tgt[ti.to(tgt.device)].to(device=embed.device, dtype=embed.dtype),
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
            generator=generator,
            num_masks=max(float(tgt.shape[0]), 1.0),
        )
        return {
            "loss_mask": self.weight_ce * out["loss_mask"],
            "loss_dice": self.weight_dice * out["loss_dice"],
        }
