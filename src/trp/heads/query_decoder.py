"""``QueryDecoder``: the plumbing every query-based head shares — features adapted to ``d_model``,
queries encoded and packed per image, and a stack of :class:`QueryDecoderLayer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from trp.heads.adapter import AdaptedFeatures, FeatureAdapter
from trp.heads.cross_attention import DeformableCrossAttention, DenseCrossAttention
from trp.heads.decoder_layer import Activation, QueryDecoderLayer, SelfAttention
from trp.heads.inputs import HeadInputs
from trp.heads.queries import Pooling, QueryBatch, QueryEncoder

__all__ = ["CrossAttentionKind", "QueryDecoder"]

CrossAttentionKind = Literal["dense", "deformable"]


class QueryDecoder(nn.Module):
    """:class:`FeatureAdapter` + :class:`QueryEncoder` + ``num_layers`` decoder layers.

    Heads call :meth:`encode` (queries packed per image, features adapted, padding honoured),
    then either :meth:`forward` (all layers, then the final LayerNorm of a pre-norm stack) or
    ``self.layers`` one by one (iterative box refinement between layers).

    Args:
        in_dim: LM hidden width of the queries; in_channels: channels of each feature level.
        d_model, n_heads, dim_feedforward, num_layers, dropout: decoder size.
        cross_attention: ``"deformable"`` (:class:`DeformableCrossAttention`, ``n_points`` per
            head and level) or ``"dense"`` (:class:`DenseCrossAttention`, ``value_pos``).
        self_attention, norm_first, activation: of every :class:`QueryDecoderLayer`.
        pooling, max_queries: of the :class:`QueryEncoder`.
        num_tokens: learned output tokens (``tokens [T, D]``, added to each object's query: the
            light heads' one token per object, the keypoint head's K), 0 for none.
        token_pos: also a learned position per token (``token_pos [T, D]``).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int,
        n_heads: int,
        dim_feedforward: int,
        num_layers: int,
        cross_attention: CrossAttentionKind = "deformable",
        n_points: int = 4,
        value_pos: bool = True,
        self_attention: SelfAttention = "objects",
        norm_first: bool = False,
        activation: Activation = "relu",
        dropout: float = 0.0,
        pooling: Pooling = "attention",
        max_queries: int = 100,
        num_tokens: int = 0,
        token_pos: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if cross_attention not in ("dense", "deformable"):
            raise ValueError(
                f"cross_attention must be 'dense' or 'deformable', got {cross_attention!r}"
            )
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        # Created here, between the encoder and the layers: the order the random initialisation
        # of the former heads drew in, so a seeded recipe starts from the same weights.
        self.tokens = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02) if num_tokens else None
        self.token_pos = (
            nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
            if num_tokens and token_pos
            else None
        )
        n_levels = self.adapter.num_levels

        def cross() -> nn.Module:
            if cross_attention == "dense":
                return DenseCrossAttention(
                    d_model=d_model, n_heads=n_heads, dropout=dropout, value_pos=value_pos
                )
            return DeformableCrossAttention(
                d_model=d_model, n_heads=n_heads, n_levels=n_levels, n_points=n_points
            )

        self.layers = nn.ModuleList(
            QueryDecoderLayer(
                d_model=d_model,
                n_heads=n_heads,
                dim_feedforward=dim_feedforward,
                cross_attention=cross,
                self_attention=self_attention,
                norm_first=norm_first,
                activation=activation,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        # A pre-norm stack leaves its output un-normalised: close it with a LayerNorm.
        self.norm = nn.LayerNorm(d_model) if norm_first else None
        self.d_model = d_model
        self.cross_attention: CrossAttentionKind = cross_attention

    @property
    def num_levels(self) -> int:
        return self.adapter.num_levels

    def encode(self, inputs: HeadInputs) -> tuple[QueryBatch, AdaptedFeatures]:
        """Encode ``inputs.queries`` (pooled per object, packed per image) and adapt
        ``inputs.features`` (with ``inputs.padding_masks``)."""
        self.adapter.check(inputs.features)
        qb = self.query_encoder(
            inputs.queries,
            inputs.image_index,
            num_images=inputs.num_images,
            object_index=inputs.object_index,
        )
        return qb, self.adapter(inputs.features, inputs.padding_masks)

    def forward(
        self,
        tokens: Tensor,
        memory: AdaptedFeatures,
        *,
        pos: Tensor | None = None,
        reference_points: Tensor | None = None,
        object_padding: Tensor | None = None,
    ) -> Tensor:
        """All layers (see :meth:`QueryDecoderLayer.forward`) and the final norm:
        ``tokens`` [B, M, T, D] -> [B, M, T, D]."""
        for layer in self.layers:
            tokens = layer(
                tokens,
                memory,
                pos=pos,
                reference_points=reference_points,
                object_padding=object_padding,
            )
        return tokens if self.norm is None else self.norm(tokens)
