"""``KeypointHead``: K keypoint queries per instance, regressed or read from heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from trp.heads.adapter import FeatureAdapter
from trp.heads.blocks import MLP, inverse_sigmoid
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import QueryEncoder
from trp.ops import MSDeformAttn
from trp.ops.soft_argmax import soft_argmax

__all__ = ["KeypointDecoderLayer", "KeypointHead"]

Mode = Literal["regression", "heatmap"]


class KeypointDecoderLayer(nn.Module):
    """Self-attention among the K (+1 instance) tokens of one instance, deformable
    cross-attention of every keypoint token around its reference point, FFN (post-norm).

    Static shapes, no host synchronisation: compiles with ``fullgraph=True``.
    """

    def __init__(
        self, *, d_model: int, n_heads: int, n_levels: int, n_points: int, dim_feedforward: int
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Linear(dim_feedforward, d_model)
        )
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """``tokens``/``pos`` [B, M, K, D]; ``reference_points`` [B, M·K, L, 2] (xy in [0, 1]);
        ``value`` [B, S, D] -> [B, M, K, D]."""
        b, m, k, d = tokens.shape
        t = tokens.reshape(b * m, k, d)
        p = pos.reshape(b * m, k, d)
        attn = self.self_attn(t + p, t + p, t, need_weights=False)[0]
        t = self.norm1(t + attn).reshape(b, m * k, d)
        cross = self.cross_attn(
            t + pos.reshape(b, m * k, d), reference_points, value, spatial_shapes, level_start_index
        )
        t = self.norm2(t + cross)
        t = self.norm3(t + self.ffn(t))
        return t.reshape(b, m, k, d)


class KeypointHead(nn.Module):
    """Instance queries -> K keypoints (normalised xy) and K visibility logits per instance.

    Keypoint tokens are the instance query plus a learned embedding per keypoint; each layer
    lets the K tokens of an instance talk to each other and sample the features around their
    current point (multi-scale deformable attention), then refines the point in logit space.
    ``mode="heatmap"`` instead reads the final points as ``trp.ops.soft_argmax`` of per-keypoint
    heatmaps (keypoint embedding · pixel features at 1/4 resolution).

    Args:
        in_dim, in_channels, d_model, n_heads, n_points, dim_feedforward, pooling, max_queries:
            as :class:`BoxHead`.
        num_keypoints: K (COCO: 17). num_layers: decoder layers.
        mode: ``"regression"`` or ``"heatmap"``. beta: soft-argmax temperature.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        num_keypoints: int = 17,
        mode: Mode = "regression",
        d_model: int = 256,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        num_layers: int = 3,
        heatmap_dim: int = 64,
        beta: float = 1.0,
        pooling: str = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        if mode not in ("regression", "heatmap"):
            raise ValueError(f"mode must be 'regression' or 'heatmap', got {mode!r}")
        if num_keypoints < 1 or num_layers < 1:
            raise ValueError("num_keypoints and num_layers must be >= 1")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        n_levels = self.adapter.num_levels
        self.keypoint_embed = nn.Parameter(torch.randn(num_keypoints, d_model) * 0.02)
        self.keypoint_pos = nn.Parameter(torch.randn(num_keypoints, d_model) * 0.02)
        self.layers = nn.ModuleList(
            KeypointDecoderLayer(
                d_model=d_model,
                n_heads=n_heads,
                n_levels=n_levels,
                n_points=n_points,
                dim_feedforward=dim_feedforward,
            )
            for _ in range(num_layers)
        )
        self.init_point = nn.Linear(d_model, 2)
        self.point_embed = nn.ModuleList(
            MLP(in_dim=d_model, hidden_dim=d_model, out_dim=2, num_layers=2)
            for _ in range(num_layers)
        )
        self.visibility = nn.Linear(d_model, 1)
        self.mode: Mode = mode
        self.num_keypoints = num_keypoints
        self.num_levels = n_levels
        self.beta = beta
        if mode == "heatmap":
            self.pixel_decoder = PixelDecoder(
                d_model=d_model, out_dim=heatmap_dim, num_levels=n_levels
            )
            self.heatmap_embed = MLP(
                in_dim=d_model, hidden_dim=d_model, out_dim=heatmap_dim, num_layers=2
            )

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict:
        """Predict keypoints.

        Args:
            queries, features, query_image_index, object_index: as :meth:`BoxHead.forward`.
            image_size: (H, W); needed in heatmap mode (heatmaps at 1/4 resolution).
        Returns:
            dict with ``keypoints`` (Tensor[N, K, 2], normalised xy in [0, 1]), ``visibility``
            (Tensor[N, K] logits), ``image_index`` (Tensor[N]), ``aux`` (``keypoints`` of earlier
            layers; regression mode) and, in heatmap mode, ``heatmaps`` (Tensor[N, K, h, w]).
        """
        if self.mode == "heatmap" and image_size is None:
            raise ValueError("KeypointHead(mode='heatmap') needs image_size=(H, W)")
        self.adapter.check(features)
        qb = self.query_encoder(
            queries, query_image_index, num_images=features[0].shape[0], object_index=object_index
        )
        k = self.num_keypoints
        if len(qb) == 0:
            out = {
                "keypoints": queries.new_zeros(0, k, 2),
                "visibility": queries.new_zeros(0, k),
                "image_index": qb.image_index,
                "aux": [],
            }
            if self.mode == "heatmap":
                out["heatmaps"] = queries.new_zeros(0, k, *quarter_size(image_size))
            return out
        feats = self.adapter(features)
        value = feats.flat + feats.flat_pos  # B x S x D
        inst = qb.pad(qb.embed)  # B x M x D
        b, m, d = inst.shape
        tokens = inst[:, :, None, :] + self.keypoint_embed  # B x M x K x D
        pos = qb.pad(qb.pos)[:, :, None, :] + self.keypoint_pos  # B x M x K x D
        ref = self.init_point(tokens).sigmoid()  # B x M x K x 2
        aux = []
        for layer, point_embed in zip(self.layers, self.point_embed):
            ref_levels = ref.detach().reshape(b, m * k, 1, 2).expand(-1, -1, self.num_levels, -1)
            tokens = layer(
                tokens, pos, ref_levels, value, feats.spatial_shapes, feats.level_start_index
            )
            ref = (point_embed(tokens) + inverse_sigmoid(ref.detach())).sigmoid()
            aux.append({"keypoints": qb.unpad(ref)})
        out = {
            "visibility": qb.unpad(self.visibility(tokens))[..., 0],
            "image_index": qb.image_index,
        }
        if self.mode == "regression":
            out["keypoints"] = aux[-1]["keypoints"]
            out["aux"] = aux[:-1]
            return out
        pixels = self.pixel_decoder(feats.maps, quarter_size(image_size))  # B x Ch x h x w
        embed = self.heatmap_embed(tokens).reshape(b, m * k, -1)  # B x MK x Ch
        # Scaled dot product: unscaled logits saturate the soft-argmax (zero gradient) early.
        heat = torch.einsum("bqc,bchw->bqhw", embed, pixels) * embed.shape[-1] ** -0.5
        xy = soft_argmax(heat, beta=self.beta).reshape(b, m, k, 2)
        out["keypoints"] = qb.unpad(xy)
        out["heatmaps"] = qb.unpad(heat.reshape(b, m, k, *heat.shape[-2:]))
        out["aux"] = aux
        return out

    @staticmethod
    def postprocess(predictions: dict, image_size: tuple[int, int]) -> Tensor:
        """Keypoints in pixels with visibility probability: ``Tensor[N, K, 3]`` (x, y, p)."""
        h, w = image_size
        xy = predictions["keypoints"] * predictions["keypoints"].new_tensor([w, h])
        return torch.cat([xy, predictions["visibility"].sigmoid()[..., None]], dim=-1)
