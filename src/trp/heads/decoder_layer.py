"""``QueryDecoderLayer``: self-attention, cross-attention to the image, FFN — the one decoder layer
of the box, keypoint and light heads, with a pluggable cross-attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from einops import rearrange
from torch import Tensor, nn

from trp.heads.adapter import AdaptedFeatures

__all__ = ["QueryDecoderLayer"]

SelfAttention = Literal["objects", "tokens"]
Activation = Literal["relu", "gelu"]


class QueryDecoderLayer(nn.Module):
    """One decoder layer over object tokens ``[B, M, T, D]`` (image b's M padded objects, T
    tokens each).

    * self-attention among the tokens of one image (``"objects"``: DETR's queries talking to each
      other, padded objects masked) or among the T tokens of one object (``"tokens"``: the K
      keypoint tokens of an instance; with T = 1 a per-object map);
    * cross-attention of every token to its own image (``cross_attention``: a
      :class:`DenseCrossAttention` or :class:`DeformableCrossAttention`);
    * FFN (Linear, activation, dropout, Linear).

    ``norm_first=False`` is DETR's post-norm (``x = norm(x + f(x))``), ``True`` pre-norm
    (``x = x + f(norm(x))``; the stack then ends with its own LayerNorm). ``forward`` has static
    shapes and no host synchronisation, so the layer compiles with ``fullgraph=True`` (the fused
    ``ms_deform_attn`` included).

    Args:
        d_model, n_heads, dim_feedforward, dropout: layer sizes.
        cross_attention: the module tokens read their image with, or a zero-argument factory
            of it (timm's ``*_layer`` style), called after the self-attention is built so the
            random initialisation draws in the layer's order.
        self_attention: ``"objects"`` or ``"tokens"``.
        norm_first: pre-norm instead of post-norm.
        activation: of the FFN, ``"relu"`` or ``"gelu"``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        dim_feedforward: int,
        cross_attention: nn.Module | Callable[[], nn.Module],
        self_attention: SelfAttention = "objects",
        norm_first: bool = False,
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if self_attention not in ("objects", "tokens"):
            raise ValueError(
                f"self_attention must be 'objects' or 'tokens', got {self_attention!r}"
            )
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = (
            cross_attention if isinstance(cross_attention, nn.Module) else cross_attention()
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.ReLU() if activation == "relu" else nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.self_attention: SelfAttention = self_attention
        self.norm_first = norm_first

    def _self_attend(self, x: Tensor, pos: Tensor | None, padding: Tensor | None) -> Tensor:
        b, m, t, _ = x.shape
        q = x if pos is None else x + pos
        if self.self_attention == "tokens":
            # Padded objects attend among their own tokens: no mask needed, output unused.
            flat = "b m t c -> (b m) t c"
            out = self.self_attn(
                rearrange(q, flat), rearrange(q, flat), rearrange(x, flat), need_weights=False
            )[0]
            return rearrange(out, "(b m) t c -> b m t c", b=b)
        flat = "b m t c -> b (m t) c"
        mask = None if padding is None else padding[:, :, None].expand(b, m, t).reshape(b, m * t)
        out = self.self_attn(
            rearrange(q, flat),
            rearrange(q, flat),
            rearrange(x, flat),
            key_padding_mask=mask,
            need_weights=False,
        )[0]
        return rearrange(out, "b (m t) c -> b m t c", m=m)

    def _cross_attend(self, x: Tensor, memory: AdaptedFeatures, ref: Tensor | None) -> Tensor:
        m = x.shape[1]
        ref = None if ref is None else rearrange(ref, "b m t r -> b (m t) r")
        out = self.cross_attn(rearrange(x, "b m t c -> b (m t) c"), memory, ref)
        return rearrange(out, "b (m t) c -> b m t c", m=m)

    def forward(
        self,
        tokens: Tensor,
        memory: AdaptedFeatures,
        *,
        pos: Tensor | None = None,
        reference_points: Tensor | None = None,
        object_padding: Tensor | None = None,
    ) -> Tensor:
        """Run the layer.

        Args:
            tokens (Tensor[B, M, T, D]): object tokens, packed per image.
            memory: the images' :class:`AdaptedFeatures` (row b = image b).
            pos (Tensor[B, M, T, D], optional): query positions, added to the queries and keys
                of both attentions (never to the values).
            reference_points (Tensor[B, M, T, 2 or 4], optional): per token a point (xy) or box
                (cxcywh) in [0, 1]; needed by deformable cross-attention.
            object_padding (Tensor[B, M], bool, optional): True at padded objects (key padding
                of ``"objects"`` self-attention; never a whole row, see
                :meth:`QueryBatch.attention_padding_mask`).
        Returns:
            Tensor[B, M, T, D].
        """
        if self.norm_first:
            x = tokens
            x = x + self.dropout(self._self_attend(self.norm1(x), pos, object_padding))
            h = self.norm2(x)
            x = x + self.dropout(
                self._cross_attend(h if pos is None else h + pos, memory, reference_points)
            )
            return x + self.dropout(self.ffn(self.norm3(x)))
        x = self.norm1(tokens + self.dropout(self._self_attend(tokens, pos, object_padding)))
        cross = self._cross_attend(x if pos is None else x + pos, memory, reference_points)
        x = self.norm2(x + self.dropout(cross))
        return self.norm3(x + self.dropout(self.ffn(x)))
