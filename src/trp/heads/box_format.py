"""Box formats both ways: ``xyxy``, ``xywh``, ``cxcywh``, normalised to [0, 1] or in pixels.

The heads predict and the criteria take normalised ``cxcywh``; datasets store pixel ``xyxy``
(RefCOCO, torchvision) or ``xywh`` (COCO json); IoU ops take ``xyxy``. Every conversion in trp
goes through this module, built on ``torchvision.ops.box_convert``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BOX_FORMATS",
    "BoxFormat",
    "box_convert",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "denormalize_boxes",
    "normalize_boxes",
]

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh")


def _check(boxes: object, name: str = "boxes") -> Tensor:
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [..., 4]")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {list(boxes.shape)}")
    return boxes


def box_convert(boxes: Tensor, in_fmt: BoxFormat, out_fmt: BoxFormat) -> Tensor:
    """``boxes [..., 4]`` from ``in_fmt`` to ``out_fmt`` (``"xyxy"``, ``"xywh"``, ``"cxcywh"``).

    Units are kept (normalised stays normalised, pixels stay pixels).
    """
    _check(boxes)
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"box format must be one of {BOX_FORMATS}, got {fmt!r}")
    if in_fmt == out_fmt:
        return boxes
    # Imported on first use: torchvision's package import costs seconds, which `import
    # trp.heads` need not pay.
    from torchvision.ops import box_convert as tv_box_convert

    return tv_box_convert(boxes, in_fmt=in_fmt, out_fmt=out_fmt)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` cxcywh -> xyxy."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> cxcywh."""
    return box_convert(boxes, "xyxy", "cxcywh")


def _scale(image_size: Sequence[int] | Tensor, like: Tensor) -> Tensor:
    size = torch.as_tensor(image_size, dtype=like.dtype, device=like.device)
    if size.shape[-1:] != (2,) or bool((size <= 0).any()):
        raise ValueError(f"image_size must be (H, W) > 0 (or [N, 2]), got {image_size!r}")
    h, w = size[..., 0], size[..., 1]
    return torch.stack([w, h, w, h], dim=-1)  # 4, or N x 4 (one size per box)


def normalize_boxes(boxes: Tensor, image_size: Sequence[int] | Tensor) -> Tensor:
    """Pixel boxes -> [0, 1] of the image: x / W, y / H (any of the three formats).

    ``image_size``: ``(H, W)``, or ``Tensor[N, 2]`` one size per box of ``boxes [N, 4]``.
    """
    _check(boxes)
    return boxes / _scale(image_size, boxes)


def denormalize_boxes(boxes: Tensor, image_size: Sequence[int] | Tensor) -> Tensor:
    """[0, 1] boxes -> pixels: x · W, y · H (inverse of :func:`normalize_boxes`)."""
    _check(boxes)
    return boxes * _scale(image_size, boxes)
