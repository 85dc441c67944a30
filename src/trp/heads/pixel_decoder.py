"""``PixelDecoder``: a light FPN-style upsampler from adapted levels to 1/4 of the image size."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PixelDecoder", "quarter_size"]


def quarter_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Output grid of the dense heads: ``ceil(H / 4) x ceil(W / 4)``."""
    if len(image_size) != 2 or min(int(s) for s in image_size) <= 0:
        raise ValueError(f"image_size must be (H, W) with positive sides, got {image_size}")
    h, w = (int(s) for s in image_size)
    return (h + 3) // 4, (w + 3) // 4


def _conv_gn(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU()
    )


class PixelDecoder(nn.Module):
    """Top-down fusion of the levels (coarsest first: upsample, add a 1x1 lateral of the finer
    level, 3x3 conv), then bilinear upsampling to the output grid and a final 3x3 conv.

    Args:
        d_model: width of the input levels; out_dim: width of the output pixel features.
        num_levels: L.
    """

    def __init__(self, *, d_model: int, out_dim: int, num_levels: int, num_groups: int = 8):
        super().__init__()
        groups = next(g for g in range(min(num_groups, d_model), 0, -1) if d_model % g == 0)
        out_groups = next(g for g in range(min(num_groups, out_dim), 0, -1) if out_dim % g == 0)
        self.lateral = nn.ModuleList(nn.Conv2d(d_model, d_model, 1) for _ in range(num_levels))
        self.fuse = nn.ModuleList(_conv_gn(d_model, d_model, groups) for _ in range(num_levels))
        self.out = nn.Sequential(
            _conv_gn(d_model, out_dim, out_groups), nn.Conv2d(out_dim, out_dim, 1)
        )

    def forward(self, maps: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        """``maps``: L tensors ``[B, D, H_l, W_l]`` -> ``[B, out_dim, *out_size]``."""
        order = sorted(range(len(maps)), key=lambda i: maps[i].shape[-2] * maps[i].shape[-1])
        x = None
        for i in order:
            lat = self.lateral[i](maps[i])
            if x is not None:
                lat = lat + F.interpolate(
                    x, size=lat.shape[-2:], mode="bilinear", align_corners=False
                )
            x = self.fuse[i](lat)
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.out(x)
