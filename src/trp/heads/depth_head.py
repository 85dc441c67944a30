"""``DepthHead``: a dense depth map per query, conditioned by cross-attention and FiLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from trp.heads.adapter import FeatureAdapter
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import QueryEncoder

__all__ = ["DepthHead"]


class DepthHead(nn.Module):
    """Queries -> one positive depth map per object at 1/4 of the image resolution.

    The pixel decoder runs once per image. Each query first reads its image (one cross-attention
    over the adapted multi-scale tokens), then modulates its image's pixel features by FiLM
    (``x · (1 + γ) + β``) and a small conv decoder predicts depth; ``softplus`` or ``exp`` keeps
    it positive. Depth queries are typically one per image, so the per-query dense tensors this
    creates are the output itself.

    Args:
        in_dim, in_channels, d_model, pooling, max_queries: as :class:`BoxHead`.
        hidden_dim: width of the pixel features and conv decoder.
        activation: ``"softplus"`` or ``"exp"`` (log-depth output).
        min_depth: added to the output, so depth > 0 even where the activation saturates.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 256,
        hidden_dim: int = 64,
        n_heads: int = 8,
        activation: Literal["softplus", "exp"] = "softplus",
        min_depth: float = 1e-3,
        pooling: str = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        if activation not in ("softplus", "exp"):
            raise ValueError(f"activation must be 'softplus' or 'exp', got {activation!r}")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        self.read = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.read_norm = nn.LayerNorm(d_model)
        self.pixel_decoder = PixelDecoder(
            d_model=d_model, out_dim=hidden_dim, num_levels=self.adapter.num_levels
        )
        self.film = nn.Linear(d_model, 2 * hidden_dim)
        # Near-identity FiLM at the start (small, not zero, so queries get gradients at once).
        nn.init.normal_(self.film.weight, std=0.01)
        nn.init.zeros_(self.film.bias)
        groups = next(g for g in range(min(8, hidden_dim), 0, -1) if hidden_dim % g == 0)
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.GroupNorm(groups, hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, 1, 1),
        )
        self.activation = activation
        self.min_depth = min_depth
        self.hidden_dim = hidden_dim

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        image_size: tuple[int, int],
        object_index: Tensor | None = None,
    ) -> dict:
        """Predict depth.

        Args:
            queries, features, query_image_index, object_index: as :meth:`BoxHead.forward`.
            image_size: (H, W) of the input images; the output grid is ``ceil(H/4) x ceil(W/4)``.
        Returns:
            dict with ``depth`` (Tensor[N, ceil(H/4), ceil(W/4)], > 0) and ``image_index``.
        """
        if image_size is None:
            raise ValueError("DepthHead needs image_size=(H, W)")
        out_size = quarter_size(image_size)
        self.adapter.check(features)
        qb = self.query_encoder(
            queries, query_image_index, num_images=features[0].shape[0], object_index=object_index
        )
        if len(qb) == 0:
            return {"depth": queries.new_zeros(0, *out_size), "image_index": qb.image_index}
        feats = self.adapter(features)
        q = qb.pad(qb.embed + qb.pos)  # B x M x D
        keys = feats.flat + feats.flat_pos  # B x S x D
        ctx = self.read(q, keys, feats.flat, need_weights=False)[0]
        q = qb.unpad(self.read_norm(q + ctx))  # N x D
        pixels = self.pixel_decoder(feats.maps, out_size)  # B x Ch x h x w
        gamma, beta = self.film(q).chunk(2, dim=-1)  # N x Ch each
        x = pixels[qb.image_index] * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        raw = self.decoder(x)[:, 0]  # N x h x w
        depth = F.softplus(raw) if self.activation == "softplus" else raw.clamp(max=20).exp()
        return {"depth": depth + self.min_depth, "image_index": qb.image_index}

    @staticmethod
    def postprocess(predictions: dict, image_size: tuple[int, int]) -> Tensor:
        """Depth upsampled (bilinear) to ``image_size``: ``Tensor[N, H, W]``."""
        depth = predictions["depth"]
        if depth.shape[0] == 0:
            return depth.new_zeros(0, *image_size)
        return F.interpolate(
            depth[:, None], size=tuple(image_size), mode="bilinear", align_corners=False
        )[:, 0]
