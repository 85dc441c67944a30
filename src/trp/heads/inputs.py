"""``HeadInputs``: the one object every decoder head of :mod:`trp.heads` takes.

A head reads the fields it needs and ignores the rest, so a router (or a user) builds one
``HeadInputs`` per batch and hands the same object to the box, mask, keypoint and depth heads;
adding a field never changes a head's signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["HeadInputs"]


@dataclass(frozen=True)
class HeadInputs:
    """What the heads decode from.

    Attributes:
        queries (Tensor[Nq, C_lm]): ``<REF>`` or VRT hidden states, one row per target token.
        features: L maps ``[B_img, C_l, H_l, W_l]`` (the images of the batch, never copied per
            query).
        image_index (Tensor[Nq], int64): image of each query in ``[0, B_img)``.
        object_index (Tensor[Nq], int64, optional): object of each query in ``[0, Q)`` (the
            queries of one VRT run pool into one object); ``None``: one object per query.
        image_size: ``(H, W)`` of the input images in pixels (dense heads size their output by
            it; box heads predict normalised boxes and ignore it).
        reference_boxes (Tensor[Q, 4], optional): per object a prior box (normalised cxcywh),
            e.g. the box around the patches a VRT run names; NaN rows: no prior.
        fine_features (Tensor[B_img, C_f, H/4, W/4], optional): a stride-4 map for pixel-level
            readouts.
        padding_masks: L bool maps ``[B_img, H_l, W_l]``, ``True`` where a level is padding
            (images of different sizes batched together, each image top-left with the padding
            below and to its right); ``None``: no padding. Heads then predict in each image's
            own normalised frame (boxes, keypoints) and ignore the padded cells.

    Raises ``TypeError`` for index tensors that are not int64 and ``ValueError`` for shapes.
    """

    queries: Tensor
    features: Sequence[Tensor]
    image_index: Tensor
    object_index: Tensor | None = None
    image_size: tuple[int, int] | None = None
    reference_boxes: Tensor | None = None
    fine_features: Tensor | None = None
    padding_masks: Sequence[Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.queries, Tensor) or self.queries.dim() != 2:
            raise ValueError("HeadInputs.queries must be a Tensor[Nq, C]")
        if isinstance(self.features, Tensor):
            raise TypeError("HeadInputs.features must be a list of [B, C, H, W] maps, not a Tensor")
        if not self.features or any(
            not isinstance(f, Tensor) or f.dim() != 4 for f in self.features
        ):
            raise ValueError("HeadInputs.features must be a non-empty list of [B, C, H, W] maps")
        nq = self.queries.shape[0]
        for name in ("image_index", "object_index"):
            index = getattr(self, name)
            if index is None and name == "object_index":
                continue
            if not isinstance(index, Tensor) or index.dtype != torch.int64:
                raise TypeError(f"HeadInputs.{name} must be an int64 tensor [{nq}]")
            if index.shape != (nq,):
                raise ValueError(
                    f"HeadInputs.{name} must have shape [{nq}], got {list(index.shape)}"
                )
        if self.image_size is not None and (
            len(self.image_size) != 2 or min(int(s) for s in self.image_size) <= 0
        ):
            raise ValueError(f"HeadInputs.image_size must be (H, W) > 0, got {self.image_size}")
        if self.reference_boxes is not None and (
            not isinstance(self.reference_boxes, Tensor)
            or self.reference_boxes.dim() != 2
            or self.reference_boxes.shape[-1] != 4
        ):
            raise ValueError("HeadInputs.reference_boxes must be a Tensor[Q, 4]")
        if self.fine_features is not None and (
            not isinstance(self.fine_features, Tensor)
            or self.fine_features.dim() != 4
            or self.fine_features.shape[0] != self.features[0].shape[0]
        ):
            raise ValueError(
                f"HeadInputs.fine_features must be a Tensor[{self.features[0].shape[0]}, C_f, "
                "H/4, W/4] (one row per image)"
            )
        if self.padding_masks is not None:
            if len(self.padding_masks) != len(self.features):
                raise ValueError("HeadInputs.padding_masks needs one mask per feature level")
            for f, m in zip(self.features, self.padding_masks):
                if (
                    not isinstance(m, Tensor)
                    or m.dtype != torch.bool
                    or tuple(m.shape) != (f.shape[0], *f.shape[-2:])
                ):
                    raise ValueError(
                        "each padding mask must be bool [B_img, H_l, W_l] matching its level"
                    )

    @property
    def num_images(self) -> int:
        return int(self.features[0].shape[0])

    def replace(self, **changes) -> HeadInputs:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)
