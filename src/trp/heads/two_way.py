"""``TwoWayBlock``: SAM's two-way attention between object queries and image tokens."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TwoWayBlock"]


class TwoWayBlock(nn.Module):
    """Query self-attention -> query-to-image cross-attention -> MLP -> image-to-query
    cross-attention, each with a residual and a LayerNorm (segment-anything's block).

    Queries are an image's padded objects ``[B, M, D]``; image tokens ``[B, S, D]``. Positions
    are added to queries and keys at every attention, values stay position-free.
    """

    def __init__(self, *, d_model: int, n_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_q2i = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, d_model)
        )
        self.norm3 = nn.LayerNorm(d_model)
        self.cross_i2q = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm4 = nn.LayerNorm(d_model)

    def forward(
        self,
        queries: Tensor,
        query_pos: Tensor,
        image: Tensor,
        image_pos: Tensor,
        query_padding: Tensor,
        image_padding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``queries``/``query_pos`` [B, M, D], ``image`` [B, S, D], ``image_pos`` [S, D] or
        [B, S, D], ``query_padding`` [B, M] (True = ignore; never a full row), ``image_padding``
        [B, S] (True at padded cells: ignored as keys, kept at zero) -> (queries, image).
        """
        q = queries + query_pos
        attn = self.self_attn(q, q, queries, key_padding_mask=query_padding, need_weights=False)[0]
        queries = self.norm1(queries + attn)
        keys = image + image_pos
        attn = self.cross_q2i(
            queries + query_pos, keys, image, key_padding_mask=image_padding, need_weights=False
        )[0]
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))
        attn = self.cross_i2q(
            keys, queries + query_pos, queries, key_padding_mask=query_padding, need_weights=False
        )[0]
        image = self.norm4(image + attn)
        if image_padding is not None:
            # Padded cells stay zero, as the pixel decoder's convolutions see outside an image.
            image = image.masked_fill(image_padding[..., None], 0.0)
        return queries, image
