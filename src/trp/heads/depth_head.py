"""``DepthHead``: a dense depth map per query, conditioned by cross-attention and FiLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from trp.heads.adapter import FeatureAdapter
from trp.heads.blocks import masked_group_norm
from trp.heads.cross_attention import DenseCrossAttention
from trp.heads.inputs import HeadInputs
from trp.heads.pixel_decoder import PixelDecoder, quarter_size, resize_valid
from trp.heads.queries import Pooling, QueryEncoder

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
        pooling: Pooling = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        if activation not in ("softplus", "exp"):
            raise ValueError(f"activation must be 'softplus' or 'exp', got {activation!r}")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        self.read = DenseCrossAttention(d_model=d_model, n_heads=n_heads, value_pos=False)
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

    def _decode(self, x: Tensor, valid: Tensor | None) -> Tensor:
        if valid is None:
            return self.decoder(x)[:, 0]
        conv0, norm, act0, conv1, act1, conv2 = self.decoder
        v = valid[:, None].to(x.dtype)  # N x 1 x h x w
        # Zero outside the image before every 3x3 conv (what it sees outside an unpadded image).
        x = act0(masked_group_norm(conv0(x * v), norm, valid))
        x = act1(conv1(x * v))
        return conv2(x * v)[:, 0]

    def forward(self, inputs: HeadInputs) -> dict:
        """Predict depth.

        Reads ``queries``, ``features``, ``image_index``, ``object_index``, ``padding_masks``
        and ``image_size`` (required: the output grid is ``ceil(H/4) x ceil(W/4)``).

        Returns:
            dict with ``depth`` (Tensor[N, ceil(H/4), ceil(W/4)], > 0) and ``image_index``.
        """
        if not isinstance(inputs, HeadInputs):
            raise TypeError(f"DepthHead takes a trp.heads.HeadInputs, got {type(inputs).__name__}")
        if inputs.image_size is None:
            raise ValueError("DepthHead needs HeadInputs.image_size=(H, W)")
        out_size = quarter_size(inputs.image_size)
        self.adapter.check(inputs.features)
        qb = self.query_encoder(
            inputs.queries,
            inputs.image_index,
            num_images=inputs.num_images,
            object_index=inputs.object_index,
        )
        if len(qb) == 0:
            return {"depth": inputs.queries.new_zeros(0, *out_size), "image_index": qb.image_index}
        feats = self.adapter(inputs.features, inputs.padding_masks)
        q = qb.pad(qb.embed + qb.pos)  # B x M x D
        ctx = self.read(q, feats)
        q = qb.unpad(self.read_norm(q + ctx))  # N x D
        pixels = self.pixel_decoder(
            feats.maps, out_size, padding_masks=inputs.padding_masks
        )  # B x Ch x h x w
        gamma, beta = self.film(q).chunk(2, dim=-1)  # N x Ch each
        # Depth is per query: its FiLM-modulated maps are the output's own size.
        x = pixels[qb.image_index] * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        valid = None
        if inputs.padding_masks is not None:
            finest = max(range(len(feats.maps)), key=lambda i: feats.maps[i].shape[-1])
            valid = resize_valid(~inputs.padding_masks[finest].to(x.device), out_size)
            valid = valid[qb.image_index]
        raw = self._decode(x, valid)  # N x h x w
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
