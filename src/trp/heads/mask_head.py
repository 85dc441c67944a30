"""``MaskHead``: a two-way (SAM-style) decoder and dot-product masks at 1/4 resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.heads.adapter import FeatureAdapter
from trp.heads.blocks import MLP
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import QueryEncoder
from trp.heads.two_way import TwoWayBlock

__all__ = ["MaskHead", "masks_to_boxes"]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of binary masks, normalised cxcywh (REC from masks).

    Args:
        masks (Tensor[N, H, W], bool or probabilities thresholded at 0.5).
    Returns:
        Tensor[N, 4] in [0, 1]; an empty mask gives the zero box.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError("masks must be a Tensor[N, H, W]")
    m = masks if masks.dtype == torch.bool else masks > 0.5
    n, h, w = m.shape
    if n == 0:
        return torch.zeros(0, 4, device=m.device)
    rows, cols = m.any(2), m.any(1)  # N x H, N x W
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], 1)
    return torch.where(rows.any(1)[:, None], boxes.float(), torch.zeros_like(boxes.float()))


class MaskHead(nn.Module):
    """Queries -> one mask per object at 1/4 of the image resolution.

    Two-way blocks let the queries of an image and that image's multi-scale tokens attend to
    each other; the updated tokens go through an FPN-style pixel decoder to 1/4 resolution; the
    mask logits are the dot product of each query's embedding (MLP) with its image's pixel
    features (computed per image over the padded queries, never copying features per query).

    Args:
        in_dim, in_channels, d_model, n_heads, pooling, max_queries: as :class:`BoxHead`.
        num_blocks: two-way blocks (SAM: 2). mask_dim: width of the pixel features.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 256,
        n_heads: int = 8,
        num_blocks: int = 2,
        mlp_dim: int = 1024,
        mask_dim: int = 64,
        pooling: str = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        self.adapter = FeatureAdapter(in_channels=in_channels, d_model=d_model)
        self.query_encoder = QueryEncoder(
            in_dim=in_dim, d_model=d_model, pooling=pooling, max_queries=max_queries
        )
        self.blocks = nn.ModuleList(
            TwoWayBlock(d_model=d_model, n_heads=n_heads, mlp_dim=mlp_dim)
            for _ in range(num_blocks)
        )
        self.pixel_decoder = PixelDecoder(
            d_model=d_model, out_dim=mask_dim, num_levels=self.adapter.num_levels
        )
        self.mask_embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=mask_dim, num_layers=3)
        self.mask_dim = mask_dim

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        image_size: tuple[int, int],
        object_index: Tensor | None = None,
    ) -> dict:
        """Predict masks.

        Args:
            queries, features, query_image_index, object_index: as :meth:`BoxHead.forward`.
            image_size: (H, W) of the input images; masks are ``ceil(H/4) x ceil(W/4)``.
        Returns:
            dict with ``masks`` (Tensor[N, h, w] logits), ``mask_embed`` (Tensor[N, mask_dim]),
            ``pixel_features`` (Tensor[B, mask_dim, h, w]) and ``image_index`` (Tensor[N]) —
            the last three are what :class:`trp.losses.MaskCriterion` samples points from.
        """
        if image_size is None:
            raise ValueError("MaskHead needs image_size=(H, W)")
        out_size = quarter_size(image_size)
        self.adapter.check(features)
        batch = features[0].shape[0]
        qb = self.query_encoder(
            queries, query_image_index, num_images=batch, object_index=object_index
        )
        if len(qb) == 0:
            empty = queries.new_zeros(0, *out_size)
            return {
                "masks": empty,
                "mask_embed": queries.new_zeros(0, self.mask_dim),
                "pixel_features": queries.new_zeros(batch, self.mask_dim, *out_size),
                "image_index": qb.image_index,
            }
        feats = self.adapter(features)
        q, q_pos = qb.pad(qb.embed), qb.pad(qb.pos)  # B x M x D
        padding = qb.attention_padding_mask()
        image = feats.flat  # B x S x D
        for block in self.blocks:
            q, image = block(q, q_pos, image, feats.flat_pos, padding)
        sizes = [int(h) * int(w) for h, w in feats.spatial_shapes.tolist()]
        maps = [
            level.transpose(1, 2).reshape(m.shape)
            for level, m in zip(image.split(sizes, dim=1), feats.maps)
        ]
        pixels = self.pixel_decoder(maps, out_size)  # B x Cm x h x w
        embed = self.mask_embed(q)  # B x M x Cm
        masks = torch.einsum("bmc,bchw->bmhw", embed, pixels)
        return {
            "masks": qb.unpad(masks),
            "mask_embed": qb.unpad(embed),
            "pixel_features": pixels,
            "image_index": qb.image_index,
        }

    @staticmethod
    def postprocess(
        predictions: dict, image_size: tuple[int, int], *, threshold: float = 0.5
    ) -> dict:
        """Masks at the image size: ``probs`` (Tensor[N, H, W]), binary ``masks`` and
        mask-derived ``boxes`` (Tensor[N, 4], normalised cxcywh)."""
        logits = predictions["masks"]
        if logits.shape[0] == 0:
            probs = logits.new_zeros(0, *image_size)
        else:
            probs = F.interpolate(
                logits[:, None], size=tuple(image_size), mode="bilinear", align_corners=False
            )[:, 0].sigmoid()
        masks = probs > threshold
        return {"probs": probs, "masks": masks, "boxes": masks_to_boxes(masks)}
