"""Monocular depth metrics (Eigen et al.): AbsRel, RMSE, and the δ < 1.25^k accuracies.

Per image, over its valid pixels (target finite and > 0, and inside the optional ``valid``
mask): ``AbsRel = mean(|p - g| / g)``, ``RMSE = sqrt(mean((p - g)^2))``,
``delta_k = mean(max(p / g, g / p) < 1.25^k)`` for k = 1, 2, 3. Each is then averaged over
images (the NYU/KITTI protocol); images without a valid pixel are skipped. Predictions are
clamped to ``min_depth`` first so ratios stay finite.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

DEPTH_METRIC_NAMES: tuple[str, ...] = ("AbsRel", "RMSE", "delta1", "delta2", "delta3")


def _per_image(pred: Tensor, target: Tensor, valid: Tensor | None, min_depth: float) -> Tensor:
    """``[M, 5]`` float64 metrics of the ``M`` images that have at least one valid pixel."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point Tensor")
        if t.ndim not in (3, 4) or (t.ndim == 4 and t.shape[1] != 1):
            raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W], "
                             f"got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}")
    if min_depth <= 0:
        raise ValueError(f"min_depth must be positive, got {min_depth}")
    p, g = pred.flatten(1).double(), target.flatten(1).double()  # N x P
    mask = torch.isfinite(g) & (g > 0)
    if valid is not None:
        if valid.shape != pred.shape:
            raise ValueError(f"valid must have shape {tuple(pred.shape)}, got {tuple(valid.shape)}")
        mask &= valid.flatten(1).bool()
    if not torch.isfinite(p[mask]).all():
        raise ValueError("pred contains NaN or infinite values at valid pixels")
    p = p.clamp(min=min_depth)
    g = torch.where(mask, g, torch.ones_like(g))  # placeholders, masked out below
    n = mask.sum(1)
    keep = n > 0
    m, n = mask.double(), n.clamp(min=1).double()
    abs_rel = ((p - g).abs() / g * m).sum(1) / n
    rmse = (((p - g) ** 2 * m).sum(1) / n).sqrt()
    ratio = torch.maximum(p / g, g / p)
    deltas = [((ratio < 1.25**k).double() * m).sum(1) / n for k in (1, 2, 3)]
    return torch.stack([abs_rel, rmse, *deltas], dim=1)[keep]


def depth_metrics(
    pred: Tensor, target: Tensor, valid: Tensor | None = None, *, min_depth: float = 1e-3
) -> dict[str, float]:
    """Depth metrics averaged over images. ``pred``, ``target``: ``[N, H, W]`` or
    ``[N, 1, H, W]``; ``valid``: optional bool mask of the same shape.

    Raises:
        ValueError: shape mismatch, non-finite predictions at valid pixels, or no valid pixel.
    """
    per_image = _per_image(pred, target, valid, min_depth)
    if per_image.shape[0] == 0:
        raise ValueError("no valid pixel (target > 0 and finite) in any image")
    return {name: float(v) for name, v in zip(DEPTH_METRIC_NAMES, per_image.mean(0))}


class DepthMetric(Metric):
    """Stateful depth metrics (per-image sums reduced across processes, so DDP-safe).

    ``update(pred, target, valid=None)`` with the shapes of :func:`depth_metrics`;
    ``compute()`` returns a dict keyed by ``DEPTH_METRIC_NAMES``, NaN when no image counted.
    """

    is_differentiable = False
    higher_is_better = None  # AbsRel/RMSE lower, deltas higher
    full_state_update = False

    def __init__(self, *, min_depth: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        if min_depth <= 0:
            raise ValueError(f"min_depth must be positive, got {min_depth}")
        self.min_depth = min_depth
        self.add_state("sums", default=torch.zeros(len(DEPTH_METRIC_NAMES), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        per_image = _per_image(pred, target, valid, self.min_depth)
        self.sums += per_image.sum(0).to(self.sums.device)
        self.count += per_image.shape[0]

    def compute(self) -> dict[str, Tensor]:
        values = self.sums / self.count
        return {name: values[i] for i, name in enumerate(DEPTH_METRIC_NAMES)}
