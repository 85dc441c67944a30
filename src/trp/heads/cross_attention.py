"""Cross-attention of object tokens to their own image: dense (every cell) or deformable.

Both take the same call, so :class:`trp.heads.QueryDecoderLayer` is one layer with a pluggable
cross-attention::

    out = cross_attention(query, memory, reference_points=None)   # B x Nt x D

``query [B, Nt, D]`` holds the tokens of image b in row b (objects padded per image, see
:class:`trp.heads.QueryBatch`), ``memory`` is that batch's :class:`AdaptedFeatures`: a token
only ever reads its own image's row, so image features are never copied per query. Padded cells
(``memory.padding``) are ignored: masked keys for dense attention, zeroed values and reference
points scaled into the padded grid for deformable attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trp.heads.adapter import AdaptedFeatures
from trp.ops import MSDeformAttn

__all__ = ["DeformableCrossAttention", "DenseCrossAttention"]


class DenseCrossAttention(nn.Module):
    """``nn.MultiheadAttention`` over all cells of the image (keys = features + positions).

    On a small ViT grid (8 x 8) dense attention is as cheap as deformable sampling and needs no
    fused op.

    Args:
        d_model, n_heads, dropout: of the attention.
        value_pos: add the positions to the values too: a box is read out of *where* the
            attention lands, which position-free values cannot tell (the light heads); False:
            DETR's position-free values.
    """

    def __init__(
        self, *, d_model: int, n_heads: int, dropout: float = 0.0, value_pos: bool = True
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.value_pos = value_pos

    def forward(
        self, query: Tensor, memory: AdaptedFeatures, reference_points: Tensor | None = None
    ) -> Tensor:
        """``query`` [B, Nt, D] -> [B, Nt, D]; ``reference_points`` are not used."""
        keys = memory.flat + memory.flat_pos  # B x S x D
        values = keys if self.value_pos else memory.flat
        return self.attn(query, keys, values, key_padding_mask=memory.padding, need_weights=False)[
            0
        ]


class DeformableCrossAttention(nn.Module):
    """Multi-scale deformable attention (:class:`trp.ops.MSDeformAttn`) around each token's
    reference point or box; values are features + positions.

    Args:
        d_model, n_heads, n_levels, n_points: of :class:`trp.ops.MSDeformAttn`.
    """

    def __init__(self, *, d_model: int, n_heads: int, n_levels: int, n_points: int = 4) -> None:
        super().__init__()
        self.attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.n_levels = n_levels

    def forward(
        self, query: Tensor, memory: AdaptedFeatures, reference_points: Tensor | None = None
    ) -> Tensor:
        """``query`` [B, Nt, D], ``reference_points`` [B, Nt, 2] (xy) or [B, Nt, 4] (cxcywh), in
        [0, 1] of each image's own extent -> [B, Nt, D]."""
        if reference_points is None:
            raise ValueError("deformable cross-attention needs reference_points [B, Nt, 2 or 4]")
        ref = reference_points[:, :, None, :].expand(-1, -1, self.n_levels, -1)  # B x Nt x L x R
        if memory.valid_ratios is not None:
            # An image's own frame -> the padded grid's frame (Deformable-DETR's valid ratios);
            # widths and heights scale like the centre.
            ratio = memory.valid_ratios[:, None].to(ref.dtype)  # B x 1 x L x 2
            ref = ref * (ratio if ref.shape[-1] == 2 else torch.cat([ratio, ratio], -1))
        value = memory.flat + memory.flat_pos  # B x S x D
        return self.attn(
            query,
            ref,
            value,
            memory.spatial_shapes,
            memory.level_start_index,
            memory.padding,
        )
