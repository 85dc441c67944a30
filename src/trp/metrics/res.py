"""RES (referring expression segmentation) metrics: cIoU and gIoU.

* ``cIoU`` (cumulative IoU): total intersection over total union, summed over all samples;
  large objects weigh more.
* ``gIoU`` (generalised / mean IoU): the mean of per-sample IoUs. (PaDT reports this number
  under the name "cIoU"; trp keeps the standard names.)

A sample whose prediction and target are both empty has IoU 1 (perfect agreement), as in GRES.
Masks are binary: ``bool`` or integer tensors (non-zero = foreground). Floating-point masks are
rejected, because a probability or logit map must be thresholded by the caller, who knows which.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

RES_METRIC_NAMES: tuple[str, ...] = ("cIoU", "gIoU")


def _check_masks(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and return bool ``[N, H, W]`` views; a single ``[H, W]`` pair becomes N = 1."""
    for name, t in (("pred_masks", pred), ("target_masks", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be bool or integer (threshold probabilities/logits "
                            f"first), got {t.dtype}")
        if t.ndim not in (2, 3):
            raise ValueError(f"{name} must have shape [N, H, W] or [H, W], got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: pred {tuple(pred.shape)}, "
                         f"target {tuple(target.shape)}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    return pred.bool(), target.bool()


def mask_intersection_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample pixel counts ``(intersection [N], union [N])`` (int64) of binary masks."""
    pred, target = _check_masks(pred, target)
    inter = (pred & target).flatten(1).sum(1)
    union = (pred | target).flatten(1).sum(1)
    return inter, union


def _sums(pred: Tensor, target: Tensor) -> Tensor:
    """``[3]`` float64: total intersection, total union, sum of per-sample IoU."""
    inter, union = mask_intersection_union(pred, target)
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 1.0)
    return torch.stack([inter.sum().double(), union.sum().double(), iou.sum()])


def _finish(sums: Tensor, count: Tensor) -> Tensor:
    """``[cIoU, gIoU]`` from the sums; cIoU is 1 when every union was empty, both are NaN
    when no sample was seen."""
    if count == 0:
        return torch.full((2,), float("nan"), dtype=torch.float64, device=sums.device)
    ciou = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.ones_like(sums[0]))
    return torch.stack([ciou, sums[2] / count])


def res_metrics(pred_masks: Tensor, target_masks: Tensor) -> dict[str, float]:
    """cIoU and gIoU of binary masks ``[N, H, W]`` (or one ``[H, W]`` pair).

    Raises:
        TypeError: floating-point masks. ValueError: shape mismatch or ``N == 0``.
    """
    pred, target = _check_masks(pred_masks, target_masks)
    if pred.shape[0] == 0:
        raise ValueError("res_metrics needs at least one mask pair")
    values = _finish(_sums(pred, target), torch.tensor(float(pred.shape[0]), dtype=torch.float64))
    return {name: float(v) for name, v in zip(RES_METRIC_NAMES, values)}


class RESMetric(Metric):
    """Stateful cIoU / gIoU (sums reduced across processes, so DDP-safe).

    ``update(pred_masks [N, H, W], target_masks [N, H, W])`` (H, W may change between calls);
    ``compute()`` returns ``{"cIoU", "gIoU"}`` float64 scalars, both NaN when no sample was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, pred_masks: Tensor, target_masks: Tensor) -> None:
        pred, target = _check_masks(pred_masks, target_masks)
        if pred.shape[0] == 0:
            return
        self.sums += _sums(pred, target).to(self.sums.device)
        self.count += pred.shape[0]

    def compute(self) -> dict[str, Tensor]:
        values = _finish(self.sums, self.count)
        return dict(zip(RES_METRIC_NAMES, values))
