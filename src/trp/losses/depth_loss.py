"""``DepthCriterion``: scale-invariant log loss (SILog) plus multi-scale gradient matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.losses.group_matcher import match_in_groups

__all__ = ["DepthCriterion", "gradient_matching_loss", "silog_loss"]


def silog_loss(
    log_diff: Tensor, valid: Tensor, *, lambd: float = 0.85, eps: float = 1e-8
) -> Tensor:
    """Eigen et al.'s scale-invariant log loss per map, averaged over maps.

    ``sqrt(mean(g²) − λ·mean(g)²)`` with ``g = log(pred) − log(gt)`` over valid pixels;
    ``log_diff``/``valid``: ``[N, H, W]``. Maps without valid pixels contribute 0.
    """
    w = valid.to(log_diff.dtype)
    n = w.flatten(1).sum(1)
    g = log_diff * w
    mean = g.flatten(1).sum(1) / n.clamp(min=1)
    mean_sq = (g * g).flatten(1).sum(1) / n.clamp(min=1)
    var = (mean_sq - lambd * mean * mean).clamp(min=0)
    per_map = torch.sqrt(var + eps) * (n > 0)
    return per_map.sum() / max(log_diff.shape[0], 1)


def gradient_matching_loss(log_diff: Tensor, valid: Tensor, *, num_scales: int = 4) -> Tensor:
    """MiDaS's gradient-matching term on the log-depth residual, over ``num_scales`` scales.

    Penalises ``|∂x g| + |∂y g|`` where both neighbours are valid, summed over pixels and
    divided by the valid count at each scale (sub-sampled by 2 per scale).
    """
    total = log_diff.new_zeros(())
    for s in range(num_scales):
        step = 2**s
        g, v = log_diff[:, ::step, ::step], valid[:, ::step, ::step].to(log_diff.dtype)
        if g.shape[-1] < 2 and g.shape[-2] < 2:
            break
        vx = v[:, :, 1:] * v[:, :, :-1]
        vy = v[:, 1:, :] * v[:, :-1, :]
        gx = ((g[:, :, 1:] - g[:, :, :-1]).abs() * vx).sum()
        gy = ((g[:, 1:, :] - g[:, :-1, :]).abs() * vy).sum()
        total = total + (gx + gy) / v.sum().clamp(min=1)
    return total


class DepthCriterion(nn.Module):
    """Losses of :class:`trp.heads.DepthHead`: ``loss_silog`` and ``loss_grad`` (weighted).

    Predictions are upsampled (bilinear) to the target resolution before the losses, so the
    ground truth is never blurred. With groups (``pred_group`` and ``targets["group"]``, as
    every criterion takes them) predictions are matched to the targets of their group on the
    mean absolute log-depth difference; without, they pair one-to-one in order.
    """

    def __init__(
        self,
        *,
        weight_silog: float = 1.0,
        weight_grad: float = 0.5,
        lambd: float = 0.85,
        num_scales: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 <= lambd <= 1.0:
            raise ValueError(f"lambd must lie in [0, 1], got {lambd}")
        self.weight_silog = weight_silog
        self.weight_grad = weight_grad
        self.lambd = lambd
        self.num_scales = num_scales

    @torch.no_grad()
    def match(
        self, predictions: dict, targets: dict, pred_group: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(pred_idx, tgt_idx)``: within groups on the mean absolute log-depth difference
        (one-to-one in order without groups)."""
        pred, gt = predictions["depth"], targets["depth"]
        tgt_group = targets.get("group")
        if (pred_group is None) != (tgt_group is None):
            raise ValueError("give both pred_group and targets['group'], or neither")
        if pred_group is None:
            if pred.shape[0] != gt.shape[0]:
                raise ValueError(
                    f"without groups predictions and targets pair one-to-one, got "
                    f"{pred.shape[0]} predictions and {gt.shape[0]} targets"
                )
            idx = torch.arange(pred.shape[0])
            return idx, idx.clone()

        def cost(pred_rows: Tensor, tgt_order: Tensor, offsets: Tensor) -> list[Tensor]:
            bounds = offsets.tolist()
            out = []
            for g in range(pred_rows.shape[0]):
                p = self._resize(pred[pred_rows[g].clamp(min=0).to(pred.device)], gt.shape[-2:])
                t = gt[tgt_order[bounds[g] : bounds[g + 1]].to(gt.device)].to(p)
                valid = ((t > 0) & torch.isfinite(t)).to(p.dtype)  # G x H x W
                lp = p.clamp(min=1e-6).log()[:, None]  # M x 1 x H x W
                lt = t.nan_to_num(1.0).clamp(min=1e-6).log()[None]  # 1 x G x H x W
                diff = ((lp - lt).abs() * valid[None]).flatten(2).sum(-1)
                out.append(diff / valid.flatten(1).sum(-1).clamp(min=1)[None])  # M x G
            return out

        return match_in_groups(pred_group, tgt_group, cost)

    @staticmethod
    def _resize(depth: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
        if depth.shape[-2:] == size or depth.shape[0] == 0:
            return depth
        return F.interpolate(depth[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(
        self, predictions: dict, targets: dict, *, pred_group: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            predictions: ``depth`` (Tensor[N, h, w], > 0).
            targets: ``depth`` (Tensor[G, H, W]); optional ``valid`` (bool Tensor[G, H, W]) and
                ``group`` (Tensor[G], int64: the triplet of each target); pixels with depth
                <= 0 or non-finite are invalid too.
            pred_group (Tensor[N], int64, optional): the triplet of each prediction (as the other
                criteria: ``RoutedPredictions.group``); without groups predictions and targets
                pair one-to-one in order.
        Returns:
            ``loss_silog`` and ``loss_grad`` (weighted), averaged over the matched maps.
        """
        pred = predictions["depth"]
        gt = targets.get("depth")
        if not isinstance(gt, Tensor) or gt.dim() != 3:
            raise ValueError(
                f"targets['depth'] must have shape [G, H, W], got {list(getattr(gt, 'shape', []))}"
            )
        pi, ti = self.match(predictions, targets, pred_group)
        pi, ti = pi.to(pred.device), ti.to(gt.device)
        if pi.numel() == 0:
            zero = pred.sum() * 0.0
            return {"loss_silog": zero, "loss_grad": zero}
        gt = gt[ti].to(pred)
        valid = (gt > 0) & torch.isfinite(gt)
        if "valid" in targets:
            valid = valid & targets["valid"][ti].to(device=gt.device, dtype=torch.bool)
        p = self._resize(pred[pi], gt.shape[-2:])
        log_diff = (p.clamp(min=1e-6).log() - gt.nan_to_num(1.0).clamp(min=1e-6).log()) * valid
        return {
            "loss_silog": self.weight_silog * silog_loss(log_diff, valid, lambd=self.lambd),
            "loss_grad": self.weight_grad
            * gradient_matching_loss(log_diff, valid, num_scales=self.num_scales),
        }
