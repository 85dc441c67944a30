"""``BoxHead``: a Deformable-DETR-style decoder for referring queries (box + score per object)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from trp.heads.adapter import AdaptedFeatures, FeatureAdapter
from trp.heads.blocks import MLP, inverse_sigmoid, merge_reference_boxes
from trp.heads.queries import QueryBatch, QueryEncoder
from trp.ops import MSDeformAttn

__all__ = ["BoxDecoderLayer", "BoxHead"]


class BoxDecoderLayer(nn.Module):
    """Self-attention among the queries of one image, deformable cross-attention, FFN (post-norm).

    ``forward`` has static shapes and no host synchronisation, so it compiles with
    ``fullgraph=True`` (the fused ``ms_deform_attn`` op included).
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        n_heads: int = 8,
        n_levels: int = 4,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor,
    ) -> Tensor:
        """``tgt``/``query_pos`` [B, M, D], ``reference_points`` [B, M, L, 4] (cxcywh in [0, 1]),
        ``value`` [B, S, D], ``key_padding_mask`` [B, M] (True = padding) -> [B, M, D]."""
        q = tgt + query_pos
        attn = self.self_attn(q, q, tgt, key_padding_mask=key_padding_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        cross = self.cross_attn(
            tgt + query_pos, reference_points, value, spatial_shapes, level_start_index
        )
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class BoxHead(nn.Module):
    """Queries -> one box (normalised cxcywh) and one score logit per object.

    A DETR decoder whose cross-attention is multi-scale deformable attention over the adapted
    features, with Deformable-DETR's iterative box refinement: each layer predicts a delta in
    logit space on the previous layer's box, which (detached) is the next layer's reference.
    The first reference is predicted from the query itself (a referring query carries its
    location in its content, unlike DETR's learned object queries).

    Args:
        in_dim: LM hidden width of the queries.
        in_channels: channels of each feature level.
        d_model, n_heads, n_points, dim_feedforward, num_layers: decoder size (DETR: 256, 8, 4,
            1024, 6).
        pooling: pooling of several queries per object (see :class:`QueryEncoder`).
        reference_noise: in training, given ``reference_boxes`` are jittered by
            :func:`trp.heads.jitter_boxes` with this scale (DN-DETR-style), so the refinement
            learns to correct references that are off.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 256,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        num_layers: int = 6,
        dropout: float = 0.0,
        pooling: str = "attention",
        max_queries: int = 100,
        reference_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if reference_noise < 0:
            raise ValueError(f"reference_noise must be >= 0, got {reference_noise}")
        self.reference_noise = reference_noise
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        n_levels = len(self.adapter.in_channels)
        self.layers = nn.ModuleList(
            BoxDecoderLayer(
                d_model=d_model,
                n_heads=n_heads,
                n_levels=n_levels,
                n_points=n_points,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.init_box = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=2)
        self.box_embed = nn.ModuleList(
            MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=3)
            for _ in range(num_layers)
        )
        self.score_embed = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_layers))
        for mlp in self.box_embed:
            # Start each refinement at "no change" so early training keeps the reference box.
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        self.d_model = d_model
        self.num_levels = n_levels

    def _empty(self, ref: Tensor, image_index: Tensor) -> dict:
        boxes, scores = ref.new_zeros(0, 4), ref.new_zeros(0)
        aux = [{"boxes": boxes, "scores": scores} for _ in range(len(self.layers) - 1)]
        return {"boxes": boxes, "scores": scores, "image_index": image_index, "aux": aux}

    def decode(
        self, qb: QueryBatch, feats: AdaptedFeatures, reference_boxes: Tensor | None = None
    ) -> dict:
        """Run the decoder on encoded queries and adapted features (see :meth:`forward`)."""
        if len(qb) == 0:
            return self._empty(feats.flat, qb.image_index)
        tgt = qb.pad(qb.embed)  # B x M x D
        query_pos = qb.pad(qb.pos)  # B x M x D
        padding = qb.attention_padding_mask()  # B x M
        value = feats.flat + feats.flat_pos  # B x S x D
        guess = self.init_box(qb.embed + qb.pos).sigmoid()  # N x 4
        guess = merge_reference_boxes(
            guess, reference_boxes, noise=self.reference_noise, training=self.training
        )
        # Deformable-DETR: the first reference is not detached, so the learned guess trains
        # through the first layer's box; later references are.
        ref = qb.pad(guess)  # B x M x 4
        outputs = []
        for layer, box_embed, score_embed in zip(self.layers, self.box_embed, self.score_embed):
            ref_levels = ref.detach()[:, :, None, :].expand(-1, -1, self.num_levels, -1)
            tgt = layer(
                tgt,
                query_pos,
                ref_levels,
                value,
                feats.spatial_shapes,
                feats.level_start_index,
                padding,
            )
            anchor = ref if not outputs else ref.detach()
            box = (box_embed(tgt) + inverse_sigmoid(anchor)).sigmoid()  # B x M x 4
            outputs.append({"boxes": qb.unpad(box), "scores": qb.unpad(score_embed(tgt))[:, 0]})
            ref = box
        last = outputs[-1]
        return {
            "boxes": last["boxes"],
            "scores": last["scores"],
            "image_index": qb.image_index,
            "aux": outputs[:-1],
        }

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        reference_boxes: Tensor | None = None,
    ) -> dict:
        """Decode boxes.

        Args:
            queries (Tensor[Nq, C_lm]): ``<REF>`` or VRT hidden states.
            features: L maps ``[B, C_l, H_l, W_l]``.
            query_image_index (Tensor[Nq], int64): image of each query in ``[0, B)``.
            object_index (Tensor[Nq], int64, optional): pools the queries of one object.
            image_size: unused (boxes are normalised); accepted for a uniform head interface.
            reference_boxes (Tensor[N, 4], optional): per object, a prior box (cxcywh in
                [0, 1]) the first layer samples around and refines, e.g. the box around the
                patches of a VRT run; NaN rows use the box predicted from the query.
        Returns:
            dict with ``boxes`` (Tensor[N, 4], cxcywh in (0, 1)), ``scores`` (Tensor[N] logits,
            trained towards the box quality), ``image_index`` (Tensor[N]) and ``aux`` (one dict
            of ``boxes``/``scores`` per earlier decoder layer).
        """
        self.adapter.check(features)
        qb = self.query_encoder(
            queries, query_image_index, num_images=features[0].shape[0], object_index=object_index
        )
        return self.decode(qb, self.adapter(features), reference_boxes)
