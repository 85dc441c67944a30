"""``ImageEncoding``: what a host VLM's vision side hands the rest of the model, once per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["ImageEncoding"]


@dataclass(frozen=True)
class ImageEncoding:
    """The images of a batch, encoded once.

    Attributes:
        flat_tokens (Tensor[ΣP, D]): every image's patch tokens at the LM width, image by image
            (what the VRT prototypes are made from; the binding's layout).
        grids: the ``(h, w)`` token grid of each image.
        maps: feature maps ``[B_img, C_l, h_l, w_l]`` the heads read (images of different
            sizes padded to the largest, see ``padding_masks``).
        image_size: ``(H, W)`` in pixels of the area the maps cover (the heads' output frame).
        fine (Tensor[B_img, C_f, H/4, W/4], optional): a stride-4 map for pixel readouts.
        padding_masks: per map ``[B_img, h_l, w_l]`` bool (True = padding), or ``None``.
        host_inputs: keyword arguments that let the host's ``forward`` / ``generate`` reuse
            this encoding instead of running its vision tower again.
    """

    flat_tokens: Tensor
    grids: tuple[tuple[int, int], ...]
    maps: tuple[Tensor, ...]
    image_size: tuple[int, int]
    fine: Tensor | None = None
    padding_masks: tuple[Tensor, ...] | None = None
    host_inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.grids)
