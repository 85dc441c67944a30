"""Pairwise IoU and generalized IoU of xyxy boxes (``torch.ops.trp.box_iou`` and
``torch.ops.trp.generalized_box_iou``), differentiable in both inputs.

Same values as ``torchvision.ops.box_iou`` / ``generalized_box_iou`` wherever those are defined;
where they divide 0 by 0 (two zero-area boxes) trp returns 0 instead of NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import call_reference, check_boxes, check_same

__all__ = ["BoxIoU", "box_iou", "generalized_box_iou"]


def _check(boxes1: Tensor, boxes2: Tensor) -> None:
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    check_same({"boxes1": boxes1, "boxes2": boxes2})


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair.

    Args:
        boxes1 (Tensor[N, 4], xyxy), boxes2 (Tensor[M, 4], xyxy): same dtype and device.
    Returns:
        Tensor[N, M] in [0, 1].
    """
    _check(boxes1, boxes2)
    if should_use_fused(boxes1):
        return torch.ops.trp.box_iou(boxes1, boxes2)
    return call_reference(reference.box_iou, boxes1, boxes2)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al., 2019) of every pair.

    Args:
        boxes1 (Tensor[N, 4], xyxy), boxes2 (Tensor[M, 4], xyxy): same dtype and device.
    Returns:
        Tensor[N, M] in [-1, 1].
    """
    _check(boxes1, boxes2)
    if should_use_fused(boxes1):
        return torch.ops.trp.generalized_box_iou(boxes1, boxes2)
    return call_reference(reference.generalized_box_iou, boxes1, boxes2)


class BoxIoU(nn.Module):
    """Module form of :func:`box_iou` (``generalized=False``) or :func:`generalized_box_iou`."""

    def __init__(self, *, generalized: bool = False) -> None:
        super().__init__()
        self.generalized = generalized

    def forward(self, boxes1: Tensor, boxes2: Tensor) -> Tensor:
        fn = generalized_box_iou if self.generalized else box_iou
        return fn(boxes1, boxes2)

    def extra_repr(self) -> str:
        return f"generalized={self.generalized}"


def _register() -> None:
    def fake_pairwise(boxes1: Tensor, boxes2: Tensor) -> Tensor:
        _check(boxes1, boxes2)
        return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))

    torch.library.register_fake("trp::box_iou")(fake_pairwise)
    torch.library.register_fake("trp::generalized_box_iou")(fake_pairwise)

    @torch.library.register_fake("trp::box_iou_backward")
    def _(grad: Tensor, boxes1: Tensor, boxes2: Tensor, generalized: bool):
        return torch.empty_like(boxes1), torch.empty_like(boxes2)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def make_backward(generalized: bool):
        def backward(ctx, grad: Tensor):
            boxes1, boxes2 = ctx.saved_tensors
            return tuple(
                torch.ops.trp.box_iou_backward(grad.contiguous(), boxes1, boxes2, generalized)
            )

        return backward

    torch.library.register_autograd(
        "trp::box_iou", make_backward(False), setup_context=setup_context
    )
    torch.library.register_autograd(
        "trp::generalized_box_iou", make_backward(True), setup_context=setup_context
    )


if native_available():
    _register()
