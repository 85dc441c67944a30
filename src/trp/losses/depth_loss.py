"""``DepthCriterion``: scale-invariant log loss (SILog) plus multi-scale gradient matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    ground truth is never blurred. Predictions and targets pair one-to-one in order.
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

    def forward(self, predictions: dict, targets: dict) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            predictions: ``depth`` (Tensor[N, h, w], > 0).
            targets: ``depth`` (Tensor[N, H, W]); optional ``valid`` (bool Tensor[N, H, W]);
                pixels with depth <= 0 or non-finite are invalid too.
        """
        pred = predictions["depth"]
        gt = targets["depth"]
        if not isinstance(gt, Tensor) or gt.dim() != 3 or gt.shape[0] != pred.shape[0]:
            raise ValueError(
                f"targets['depth'] must have shape [{pred.shape[0]}, H, W], got "
                f"{list(getattr(gt, 'shape', []))}"
            )
        gt = gt.to(pred)
        valid = (gt > 0) & torch.isfinite(gt)
        if "valid" in targets:
            valid = valid & targets["valid"].to(device=gt.device, dtype=torch.bool)
        if pred.shape[0] == 0:
            zero = pred.sum()
            return {"loss_silog": zero, "loss_grad": zero}
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(
                pred[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        log_diff = (pred.clamp(min=1e-6).log() - gt.clamp(min=1e-6).log()) * valid
        return {
            "loss_silog": self.weight_silog * silog_loss(log_diff, valid, lambd=self.lambd),
            "loss_grad": self.weight_grad
            * gradient_matching_loss(log_diff, valid, num_scales=self.num_scales),
        }
