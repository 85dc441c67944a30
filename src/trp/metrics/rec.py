"""REC (referring expression comprehension) metrics, as lmms-eval reports them for RefCOCO.

Per sample, with boxes in xyxy: ``IoU``; ``ACC@t`` = ``IoU >= t`` for t in 0.1/0.3/0.5/0.7/0.9;
``Center_ACC`` = the predicted box's centre lies inside the ground-truth box (closed interval).
Each is averaged over samples. Boxes with ``x1 < x0`` or ``y1 < y0`` count as empty; the IoU of
two boxes whose union is empty is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

REC_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
REC_METRIC_NAMES: tuple[str, ...] = (
    "IoU", *(f"ACC@{t}" for t in REC_THRESHOLDS), "Center_ACC"
)


def _check_boxes(pred: Tensor, target: Tensor) -> None:
    for name, t in (("pred_boxes", pred), ("target_boxes", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.ndim != 2 or t.shape[-1] != 4:
            raise ValueError(f"{name} must have shape [N, 4] (xyxy), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"got {pred.shape[0]} predicted boxes for {target.shape[0]} targets")


def paired_box_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of each predicted box with its own target: ``[N, 4], [N, 4] -> [N]`` (float64)."""
    _check_boxes(pred, target)
    p, t = pred.double(), target.double()
    wh = (torch.minimum(p[:, 2:], t[:, 2:]) - torch.maximum(p[:, :2], t[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_p = (p[:, 2:] - p[:, :2]).clamp(min=0).prod(1)
    area_t = (t[:, 2:] - t[:, :2]).clamp(min=0).prod(1)
    union = area_p + area_t - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def center_in_box(pred: Tensor, target: Tensor) -> Tensor:
    """Bool ``[N]``: the centre of ``pred[i]`` lies inside ``target[i]`` (borders included)."""
    _check_boxes(pred, target)
    cx = (pred[:, 0].double() + pred[:, 2].double()) / 2
    cy = (pred[:, 1].double() + pred[:, 3].double()) / 2
    t = target.double()
    return (t[:, 0] <= cx) & (cx <= t[:, 2]) & (t[:, 1] <= cy) & (cy <= t[:, 3])


def _per_sample_sums(pred: Tensor, target: Tensor) -> Tensor:
    """``[2 + len(REC_THRESHOLDS)]`` sums over samples: IoU, hits per threshold, centre hits."""
    iou = paired_box_iou(pred, target)
    hits = torch.stack([(iou >= t).sum() for t in REC_THRESHOLDS]).double()
    return torch.cat([iou.sum()[None], hits, center_in_box(pred, target).sum()[None].double()])


def rec_metrics(pred_boxes: Tensor, target_boxes: Tensor) -> dict[str, float]:
    """All REC metrics of a set of predictions (``[N, 4]`` xyxy each), averaged over ``N``.

    Raises:
        ValueError: on shape mismatch, non-finite values, or ``N == 0``.
    """
    _check_boxes(pred_boxes, target_boxes)
    if pred_boxes.shape[0] == 0:
        raise ValueError("rec_metrics needs at least one box pair")
    sums = _per_sample_sums(pred_boxes, target_boxes) / pred_boxes.shape[0]
    return {name: float(v) for name, v in zip(REC_METRIC_NAMES, sums)}


class RECMetric(Metric):
    """Stateful REC metrics (sums reduced across processes, so DDP-safe).

    ``update(pred_boxes [N, 4], target_boxes [N, 4])``; ``compute()`` returns a dict keyed by
    ``REC_METRIC_NAMES`` (float64 scalars), all NaN when no sample was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", default=torch.zeros(len(REC_METRIC_NAMES), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, pred_boxes: Tensor, target_boxes: Tensor) -> None:
        _check_boxes(pred_boxes, target_boxes)
        if pred_boxes.shape[0] == 0:
            return
        self.sums += _per_sample_sums(pred_boxes, target_boxes).to(self.sums.device)
        self.count += pred_boxes.shape[0]

    def compute(self) -> dict[str, Tensor]:
        values = self.sums / self.count  # NaN when count == 0
        return {name: values[i] for i, name in enumerate(REC_METRIC_NAMES)}
