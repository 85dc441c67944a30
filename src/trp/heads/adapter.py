"""``FeatureAdapter``: multi-scale maps of any vision encoder -> d_model maps with 2-D positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trp.heads.blocks import sine_position_embedding

__all__ = ["AdaptedFeatures", "FeatureAdapter"]


@dataclass(frozen=True)
class AdaptedFeatures:
    """Projected multi-scale features, as maps and flattened for deformable attention.

    Attributes:
        maps: L tensors ``[B, D, H_l, W_l]`` (projected, no position added).
        pos: L tensors ``[D, H_l, W_l]`` 2-D sine-cosine position + learned level embedding
            (shared by every image: positions depend on the grid only).
        flat (Tensor[B, S, D]): ``maps`` flattened level after level, ``S = sum H_l * W_l``.
        flat_pos (Tensor[S, D]): ``pos`` flattened the same way.
        spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)``.
        level_start_index (Tensor[L], int64): offset of each level in ``S``.
    """

    maps: list[Tensor]
    pos: list[Tensor]
    flat: Tensor
    flat_pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.flat.shape[0])


class FeatureAdapter(nn.Module):
    """Project each level to ``d_model`` (1x1 conv + GroupNorm) and attach 2-D positions.

    Works for ViT patch grids (one or several levels of one stride) and CNN pyramids alike.
    Positions are fixed sine-cosine (the prior-art measurement: 2-D positions in the features the
    box head reads are decisive) plus a learned embedding per level.

    Args:
        in_channels: channels ``C_l`` of each input level.
        d_model: output width (divisible by 4 for the sine-cosine embedding).
        num_groups: GroupNorm groups (must divide ``d_model``).
    """

    def __init__(self, *, in_channels: Sequence[int], d_model: int = 256, num_groups: int = 32):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or min(in_channels) <= 0:
            raise ValueError(
                f"in_channels must be a non-empty list of positive ints, got {in_channels}"
            )
        if d_model % 4:
            raise ValueError(f"d_model must be divisible by 4, got {d_model}")
        if d_model % num_groups:
            num_groups = next(g for g in range(min(num_groups, d_model), 0, -1) if d_model % g == 0)
        self.in_channels = tuple(in_channels)
        self.d_model = d_model
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(num_groups, d_model))
            for c in in_channels
        )
        self.level_embed = nn.Parameter(torch.zeros(len(in_channels), d_model))
        nn.init.normal_(self.level_embed, std=0.02)

    @property
    def num_levels(self) -> int:
        return len(self.in_channels)

    def check(self, features: Sequence[Tensor]) -> None:
        """Raise a clear error when ``features`` do not fit this adapter."""
        if isinstance(features, Tensor) or not isinstance(features, Sequence):
            raise TypeError("features must be a list of [B, C_l, H_l, W_l] tensors")
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        batch = None
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if not isinstance(f, Tensor) or not f.is_floating_point():
                raise TypeError(f"features[{i}] must be a floating-point tensor")
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(
                    f"features[{i}] must have shape [B, {c}, H, W], got {list(f.shape)}"
                )
            if f.shape[2] == 0 or f.shape[3] == 0:
                raise ValueError(f"features[{i}] has an empty spatial grid {list(f.shape)}")
            if batch is not None and f.shape[0] != batch:
                raise ValueError(f"features disagree on the batch size: {batch} vs {f.shape[0]}")
            batch = f.shape[0]

    def forward(self, features: Sequence[Tensor]) -> AdaptedFeatures:
        """``features``: L tensors ``[B, C_l, H_l, W_l]`` -> :class:`AdaptedFeatures`."""
        self.check(features)
        maps, pos = [], []
        for level, (f, proj) in enumerate(zip(features, self.proj)):
            m = proj(f)  # B x D x H x W
            h, w = m.shape[-2:]
            p = sine_position_embedding(h, w, self.d_model, device=m.device, dtype=m.dtype)
            maps.append(m)
            pos.append(p + self.level_embed[level].to(m.dtype)[:, None, None])
        shapes = torch.tensor(
            [m.shape[-2:] for m in maps], dtype=torch.int64, device=maps[0].device
        )
        starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        flat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # B x S x D
        flat_pos = torch.cat([p.flatten(1).transpose(0, 1) for p in pos], dim=0)  # S x D
        return AdaptedFeatures(
            maps=maps,
            pos=pos,
            flat=flat,
            flat_pos=flat_pos,
            spatial_shapes=shapes,
            level_start_index=starts,
        )
