"""``unit_targets``: dataset annotations -> each unit criterion's targets, grouped per triplet.

Annotations come as datasets give them (pixels, xyxy boxes); the criteria want normalised
cxcywh boxes, normalised keypoints and areas, and the ``group`` of the triplet each target
belongs to (``trp.heads.triplet_group``), so matching stays inside a triplet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trp.heads.box_format import box_convert, normalize_boxes
from trp.heads.router import triplet_group

__all__ = ["unit_targets"]

_KEYS = {"box": "boxes", "mask": "masks", "keypoint": "keypoints", "depth": "depth"}


def unit_targets(
    annotations: Sequence[Mapping[str, Any]], image_sizes: Sequence[tuple[int, int]]
) -> dict[str, dict[str, Tensor]]:
    """Build the targets of :class:`trp.losses.RoutedCriterion`.

    Args:
        annotations: per sample, per triplet: a dict with ``unit`` and its ground truth —
            ``boxes`` (Tensor[N, 4] xyxy pixels), ``masks`` (Tensor[N, H, W]), ``keypoints``
            (Tensor[N, K, 3] pixels + visibility, with ``boxes`` for the object areas) or
            ``depth`` (Tensor[H, W]); optional ``sample`` (default: its index) and
            ``triplet`` (default 0).
        image_sizes: ``(H, W)`` of each sample's image.
    Returns:
        unit -> targets with ``group`` (int64), e.g. ``{"box": {"boxes": [G, 4] cxcywh in
        [0, 1], "group": [G]}}``.
    """
    out: dict[str, dict[str, list[Tensor]]] = {}
    for index, ann in enumerate(annotations):
        unit = ann.get("unit")
        if unit not in _KEYS:
            raise ValueError(
                f"annotation {index}: unit must be one of {sorted(_KEYS)}, got {unit!r}"
            )
        key = _KEYS[unit]
        if key not in ann:
            raise ValueError(f"annotation {index}: a {unit} target needs {key!r}")
        sample = int(ann.get("sample", index))
        if not 0 <= sample < len(image_sizes):
            raise ValueError(f"annotation {index}: sample {sample} has no image size")
        h, w = image_sizes[sample]
        value = torch.as_tensor(ann[key])
        if unit == "depth":
            value = value[None] if value.dim() == 2 else value
        n = value.shape[0]
        group = triplet_group(
            torch.full((n,), sample, dtype=torch.int64),
            torch.full((n,), int(ann.get("triplet", 0)), dtype=torch.int64),
        )
        parts = out.setdefault(unit, {})
        parts.setdefault("group", []).append(group)
        if unit == "box":
            boxes = normalize_boxes(value.float(), (h, w))
            parts.setdefault("boxes", []).append(box_convert(boxes, "xyxy", "cxcywh"))
        elif unit == "mask":
            parts.setdefault("masks", []).append(value.float())
        elif unit == "keypoint":
            if "boxes" not in ann:
                raise ValueError(f"annotation {index}: keypoint targets need boxes (areas)")
            kp = value.float().clone()
            kp[..., 0] /= w
            kp[..., 1] /= h
            boxes = normalize_boxes(torch.as_tensor(ann["boxes"]).float(), (h, w))
            parts.setdefault("keypoints", []).append(kp)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            parts.setdefault("areas", []).append(area)
        else:
            parts.setdefault("depth", []).append(value.float())
    return {unit: {k: torch.cat(v) for k, v in parts.items()} for unit, parts in out.items()}
