"""Light box and mask heads with plain (dense) cross-attention, for small CPU recipes.

Same interface as the heads of :mod:`trp.heads` (``head(queries, features, query_image_index,
object_index=..., image_size=...) -> dict``) so a recipe can switch between them in its config.
On an 8 x 8 ViT grid dense attention over all 64 cells is as cheap as deformable sampling and
needs no fused op; the prior-art prototype on this machine used exactly this shape of decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trp.heads import MLP, FeatureAdapter, QueryEncoder, quarter_size

__all__ = ["LightBoxHead", "LightMaskHead"]


class _DecoderLayer(nn.Module):
    """Pre-norm: self-attention among an object's tokens, cross-attention to its image, MLP."""

    def __init__(self, *, d_model: int, n_heads: int, dim_feedforward: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model)
        )

    def forward(self, x: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """``x`` [N, T, D] object tokens, ``memory`` [N, S, D] its image, ``memory_pos`` [S, D]."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x)
        # Positions go into the values too: a box is read out of *where* the attention lands,
        # which values without positions cannot tell.
        keys = memory + memory_pos
        x = x + self.cross_attn(h, keys, keys, need_weights=False)[0]
        return x + self.ffn(self.norm3(x))


class _LightDecoder(nn.Module):
    """Queries -> ``num_tokens`` output tokens per object after ``num_layers`` decoder layers."""

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int,
        n_heads: int,
        dim_feedforward: int,
        num_layers: int,
        num_tokens: int,
        pooling: str,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(in_dim=in_dim, d_model=d_model, pooling=pooling)
        self.tokens = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
        self.layers = nn.ModuleList(
            _DecoderLayer(d_model=d_model, n_heads=n_heads, dim_feedforward=dim_feedforward)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def run(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        object_index: Tensor | None,
    ):
        self.adapter.check(features)
        feats = self.adapter(features)
        qb = self.query_encoder(
            queries, query_image_index, num_images=feats.batch_size, object_index=object_index
        )
        # N x T x D: the learned output tokens, each carrying its object's query.
        x = self.tokens[None] + (qb.embed + qb.pos)[:, None, :]
        memory = feats.flat[qb.image_index]  # N x S x D
        for layer in self.layers:
            x = layer(x, memory, feats.flat_pos)
        return self.norm(x), qb, feats


class LightBoxHead(nn.Module):
    """Queries -> one box (normalised cxcywh) and a box-quality score logit per object.

    Args:
        in_dim: LM hidden width of the queries; in_channels: channels of each feature level.
        d_model, n_heads, dim_feedforward, num_layers: decoder size.
        pooling: how the queries of one object (a VRT run) are pooled (``QueryEncoder``).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 128,
        n_heads: int = 4,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        pooling: str = "attention",
    ) -> None:
        super().__init__()
        self.decoder = _LightDecoder(
            in_dim=in_dim,
            in_channels=in_channels,
            d_model=d_model,
            n_heads=n_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            num_tokens=1,
            pooling=pooling,
        )
        self.box_embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=3)
        self.score_embed = nn.Linear(d_model, 1)

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict:
        """``queries`` [Nq, C_lm] -> ``boxes`` [N, 4] (cxcywh in (0, 1)), ``scores`` [N],
        ``image_index`` [N], ``aux`` (empty: one output layer)."""
        x, qb, _ = self.decoder.run(queries, features, query_image_index, object_index)
        token = x[:, 0]  # N x D
        return {
            "boxes": self.box_embed(token).sigmoid(),
            "scores": self.score_embed(token)[:, 0],
            "image_index": qb.image_index,
            "aux": [],
        }


class LightMaskHead(nn.Module):
    """Queries -> one mask logit map per object at 1/4 of the image size.

    The mask token's embedding is dotted with pixel features: the adapted feature map of the
    image (with its positions) upsampled by two 2x transposed convolutions, then resized to
    ``quarter_size(image_size)``.

    Args:
        in_dim, in_channels, d_model, n_heads, dim_feedforward, num_layers, pooling: as
            :class:`LightBoxHead`.
        mask_dim: width of the pixel features and mask embeddings.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 128,
        n_heads: int = 4,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        mask_dim: int = 32,
        pooling: str = "attention",
    ) -> None:
        super().__init__()
        self.decoder = _LightDecoder(
            in_dim=in_dim,
            in_channels=in_channels,
            d_model=d_model,
            n_heads=n_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            num_tokens=1,
            pooling=pooling,
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(d_model, d_model // 2, kernel_size=2, stride=2),
            nn.GroupNorm(1, d_model // 2),
            nn.GELU(),
            nn.ConvTranspose2d(d_model // 2, mask_dim, kernel_size=2, stride=2),
        )
        self.mask_embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=mask_dim, num_layers=3)

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict:
        """``queries`` [Nq, C_lm] -> ``masks`` [N, H/4, W/4] logits, ``mask_embed`` [N, C],
        ``pixel_features`` [B, C, H/4, W/4] (what :class:`trp.losses.MaskCriterion` samples
        points from) and ``image_index`` [N]."""
        x, qb, feats = self.decoder.run(queries, features, query_image_index, object_index)
        level = feats.maps[-1] + feats.pos[-1][None]  # B x D x h x w
        pixels = self.upsample(level)  # B x C x 4h x 4w
        if image_size is not None:
            size = quarter_size(image_size)
            if tuple(pixels.shape[-2:]) != size:
                pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        embed = self.mask_embed(x[:, 0])  # N x C
        masks = torch.einsum("nc,nchw->nhw", embed, pixels[qb.image_index])  # N x h x w
        return {
            "masks": masks,
            "mask_embed": embed,
            "pixel_features": pixels,
            "image_index": qb.image_index,
        }
