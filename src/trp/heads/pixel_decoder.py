"""``PixelDecoder``: a light FPN-style upsampler from adapted levels to 1/4 of the image size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.heads.blocks import masked_group_norm

__all__ = ["PixelDecoder", "quarter_size", "replicate_edges", "resize_valid"]


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

    def forward(
        self,
        maps: Sequence[Tensor],
        out_size: tuple[int, int],
        *,
        padding_masks: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``maps``: L tensors ``[B, D, H_l, W_l]`` -> ``[B, out_dim, *out_size]``.

        ``padding_masks``: L bool ``[B, H_l, W_l]`` (True = padding, below and right of each
        image): normalisation statistics come from the image's cells, padded cells are kept at
        zero (what a 3x3 convolution sees outside an unpadded image) and the image's edge is
        replicated before each bilinear upsampling (what edge clamping gives unpadded), so an
        image's pixel features do not depend on the padding around it.
        """
        order = sorted(range(len(maps)), key=lambda i: maps[i].shape[-2] * maps[i].shape[-1])
        x = None
        valid = None
        for i in order:
            lat = self.lateral[i](maps[i])
            if padding_masks is not None:
                valid = ~padding_masks[i].to(lat.device)
            if x is not None:
                lat = lat + F.interpolate(
                    x, size=lat.shape[-2:], mode="bilinear", align_corners=False
                )
            x = _conv_gn_masked(self.fuse[i], lat, valid)
            if valid is not None:
                x = replicate_edges(x, valid)
        if valid is None:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
            return self.out(x)
        finest = valid
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        valid = resize_valid(finest, out_size)
        x = _conv_gn_masked(self.out[0], x * valid[:, None], valid)
        return self.out[1](x) * valid[:, None]


def resize_valid(valid: Tensor, size: tuple[int, int]) -> Tensor:
    """The image rectangle of ``valid [B, h, w]`` on a ``size`` grid (the same fraction)."""
    h, w = valid.shape[-2:]
    rows = torch.ceil(valid.any(2).sum(1) * (size[0] / h)).long()
    cols = torch.ceil(valid.any(1).sum(1) * (size[1] / w)).long()
    r = torch.arange(size[0], device=valid.device)[None, :, None] < rows[:, None, None]
    c = torch.arange(size[1], device=valid.device)[None, None, :] < cols[:, None, None]
    return r & c


def _conv_gn_masked(block: nn.Sequential, x: Tensor, valid: Tensor | None) -> Tensor:
    """``_conv_gn`` with GroupNorm statistics over the image's cells and zero padding."""
    if valid is None:
        return block(x)
    conv, norm, act = block
    x = conv(x * valid[:, None].to(x.dtype))
    return act(masked_group_norm(x, norm, valid))


def replicate_edges(x: Tensor, valid: Tensor) -> Tensor:
    """``x [B, C, H, W]`` with its padded cells (outside the top-left rectangle ``valid``
    [B, H, W]) set to the nearest image cell, so interpolation at the image's edge sees what
    edge clamping gives for the unpadded image."""
    b, c, h, w = x.shape
    rows = (valid.any(2).sum(1) - 1).clamp(min=0)  # B
    cols = (valid.any(1).sum(1) - 1).clamp(min=0)  # B
    r = torch.minimum(torch.arange(h, device=x.device)[None], rows[:, None])  # B x H
    cl = torch.minimum(torch.arange(w, device=x.device)[None], cols[:, None])  # B x W
    x = torch.gather(x, 2, r[:, None, :, None].expand(b, c, h, w))
    return torch.gather(x, 3, cl[:, None, None, :].expand(b, c, h, w))
