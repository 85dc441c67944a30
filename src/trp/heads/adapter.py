"""``FeatureAdapter``: multi-scale maps of any vision encoder -> d_model maps with 2-D positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from trp.heads.blocks import masked_group_norm, sine_position_embedding

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
        padding (Tensor[B, S], bool, optional): True at padded cells (keys to ignore, values to
            zero); ``None``: no padding. With padding, ``pos`` is per image ``[B, D, H_l, W_l]``
            and ``flat_pos`` ``[B, S, D]`` (each image's positions span its own extent); both
            broadcast against ``maps`` / ``flat`` either way.
        valid_ratios (Tensor[B, L, 2], optional): per image and level the ``(x, y)`` fraction of
            the grid that is image (Deformable-DETR's valid ratios): a point in an image's own
            normalised frame is ``point * ratio`` in the padded grid's frame.
    """

    maps: list[Tensor]
    pos: list[Tensor]
    flat: Tensor
    flat_pos: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    padding: Tensor | None = None
    valid_ratios: Tensor | None = None

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

    def check_padding(
        self, features: Sequence[Tensor], padding_masks: Sequence[Tensor] | None
    ) -> None:
        """Raise when ``padding_masks`` do not match ``features`` (one bool ``[B, H_l, W_l]`` per
        level, the image top-left with padding below and to the right, DETR's layout)."""
        if padding_masks is None:
            return
        if isinstance(padding_masks, Tensor) or len(padding_masks) != len(features):
            raise ValueError(f"padding_masks needs one [B, H, W] mask per level ({len(features)})")
        for i, (f, m) in enumerate(zip(features, padding_masks)):
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise TypeError(f"padding_masks[{i}] must be a bool tensor")
            if tuple(m.shape) != (f.shape[0], *f.shape[-2:]):
                raise ValueError(
                    f"padding_masks[{i}] must have shape {[f.shape[0], *f.shape[-2:]]}, got "
                    f"{list(m.shape)}"
                )
            valid = ~m
            rows, cols = valid.any(2).sum(1), valid.any(1).sum(1)  # B, B
            h, w = m.shape[-2:]
            r = torch.arange(h, device=m.device)[None, :, None] < rows[:, None, None]
            c = torch.arange(w, device=m.device)[None, None, :] < cols[:, None, None]
            if not torch.equal(valid, r & c) or bool((rows == 0).any()):
                raise ValueError(
                    f"padding_masks[{i}]: each image must be a non-empty top-left rectangle "
                    "(padding below and to the right)"
                )

    def forward(
        self, features: Sequence[Tensor], padding_masks: Sequence[Tensor] | None = None
    ) -> AdaptedFeatures:
        """``features``: L tensors ``[B, C_l, H_l, W_l]`` -> :class:`AdaptedFeatures`.

        ``padding_masks``: L bool ``[B, H_l, W_l]`` (True = padding), for images of different
        sizes batched on one grid: normalisation statistics and positions then come from each
        image's own cells, padded cells are zero and marked in ``padding``.
        """
        self.check(features)
        self.check_padding(features, padding_masks)
        maps, pos, ratios = [], [], []
        for level, (f, proj) in enumerate(zip(features, self.proj)):
            h, w = f.shape[-2:]
            embed = self.level_embed[level]
            if padding_masks is None:
                m = proj(f)  # B x D x H x W
                p = sine_position_embedding(h, w, self.d_model, device=m.device, dtype=m.dtype)
                p = p + embed.to(m.dtype)[:, None, None]  # D x H x W
            else:
                valid = ~padding_masks[level].to(f.device)  # B x H x W
                m = masked_group_norm(proj[0](f), proj[1], valid)
                extent = torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], 1)  # B x 2
                p = sine_position_embedding(
                    h, w, self.d_model, device=m.device, dtype=m.dtype, valid=extent
                )
                p = p + embed.to(m.dtype)[None, :, None, None]  # B x D x H x W
                ratios.append(extent.flip(-1).to(m.dtype) / m.new_tensor([w, h]))  # B x 2 (x, y)
            maps.append(m)
            pos.append(p)
        shapes = torch.tensor(
            [m.shape[-2:] for m in maps], dtype=torch.int64, device=maps[0].device
        )
        starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        flat = torch.cat([rearrange(m, "b c h w -> b (h w) c") for m in maps], dim=1)  # B x S x D
        flat_pos = torch.cat(
            [rearrange(p, "... c h w -> ... (h w) c") for p in pos], dim=-2
        )  # S x D, or B x S x D with padding
        padding = valid_ratios = None
        if padding_masks is not None:
            padding = torch.cat([m.to(flat.device).flatten(1) for m in padding_masks], dim=1)
            valid_ratios = torch.stack(ratios, dim=1)  # B x L x 2
        return AdaptedFeatures(
            maps=maps,
            pos=pos,
            flat=flat,
            flat_pos=flat_pos,
            spatial_shapes=shapes,
            level_start_index=starts,
            padding=padding,
            valid_ratios=valid_ratios,
        )
