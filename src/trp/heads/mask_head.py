"""``MaskHead``: a two-way (SAM-style) or light query decoder and dot-product masks at 1/4
resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from trp.heads.adapter import FeatureAdapter
from trp.heads.blocks import MLP
from trp.heads.inputs import HeadInputs
from trp.heads.mask_readout import MaskReadout
from trp.heads.pixel_decoder import PixelDecoder, quarter_size
from trp.heads.queries import Pooling, QueryEncoder
from trp.heads.query_decoder import CrossAttentionKind, QueryDecoder
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

    ``decoder="two_way"`` (default, SAM): two-way blocks let the queries of an image and that
    image's multi-scale tokens attend to each other; the updated tokens go through an FPN-style
    pixel decoder to 1/4 resolution; the mask logits are the dot product of each query's
    embedding (MLP) with its image's pixel features (computed per image over the padded queries,
    never copying features per query).

    ``decoder="light"``: a :class:`QueryDecoder` (pre-norm GELU layers over each object's token,
    ``cross_attention`` dense or deformable) decodes one token per object, and a
    :class:`MaskReadout` dots it with the coarse map upsampled to 1/4 (plus ``fine_features``
    with ``fine_channels``); with ``box_prior`` and ``reference_boxes`` a learned elliptic prior
    around each reference box rides on 5 extra channels and the box is embedded into the query.

    Args:
        in_dim, in_channels, d_model, n_heads, pooling, max_queries: as :class:`BoxHead`.
        decoder: ``"two_way"`` or ``"light"``.
        num_blocks, mlp_dim (``"two_way"``): two-way blocks (SAM: 2) and their MLP width.
        dim_feedforward, num_layers, cross_attention, n_points, fine_channels, box_prior
            (``"light"``): the decoder's size and the readout's inputs.
        mask_dim: width of the pixel features.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        in_channels: Sequence[int],
        d_model: int = 256,
        n_heads: int = 8,
        decoder: Literal["two_way", "light"] = "two_way",
        num_blocks: int = 2,
        mlp_dim: int = 1024,
        mask_dim: int = 64,
        pooling: Pooling = "attention",
        max_queries: int = 100,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        cross_attention: CrossAttentionKind = "dense",
        n_points: int = 4,
        fine_channels: int = 0,
        box_prior: bool = True,
    ) -> None:
        super().__init__()
        if decoder not in ("two_way", "light"):
            raise ValueError(f"decoder must be 'two_way' or 'light', got {decoder!r}")
        if decoder == "two_way" and fine_channels:
            raise ValueError("fine_channels belongs to MaskHead(decoder='light')")
        self.decoder_kind = decoder
        self.mask_dim = mask_dim
        self.box_prior = box_prior and decoder == "light"
        if decoder == "light":
            # (Module order = the order the initialisation draws in, kept from the former head.)
            self.ref_embed = MLP(in_dim=4, hidden_dim=d_model, out_dim=d_model, num_layers=2)
            self.decoder = QueryDecoder(
                in_dim=in_dim,
                in_channels=in_channels,
                d_model=d_model,
                n_heads=n_heads,
                dim_feedforward=dim_feedforward,
                num_layers=num_layers,
                cross_attention=cross_attention,
                n_points=n_points,
                self_attention="tokens",
                norm_first=True,
                activation="gelu",
                pooling=pooling,
                max_queries=max_queries,
                num_tokens=1,
            )
            self.readout = MaskReadout(
                d_model=d_model,
                mask_dim=mask_dim,
                fine_channels=fine_channels,
                box_prior=box_prior,
            )
            return
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

    def _empty(self, inputs: HeadInputs, image_index: Tensor, out_size: tuple[int, int]) -> dict:
        q = inputs.queries
        dim = self.mask_dim + (5 if self.box_prior else 0)
        return {
            "masks": q.new_zeros(0, *out_size),
            "mask_embed": q.new_zeros(0, dim),
            "pixel_features": q.new_zeros(inputs.num_images, dim, *out_size),
            "image_index": image_index,
        }

    def forward(self, inputs: HeadInputs) -> dict:
        """Predict masks.

        Reads ``queries``, ``features``, ``image_index``, ``object_index``, ``image_size``
        (required: masks are ``ceil(H/4) x ceil(W/4)``), ``padding_masks`` and, for
        ``"light"``, ``reference_boxes`` and ``fine_features``.

        Returns:
            dict with ``masks`` (Tensor[N, h, w] logits), ``mask_embed`` (Tensor[N, C']),
            ``pixel_features`` (Tensor[B, C', h, w]) and ``image_index`` (Tensor[N]) — the last
            three are what :class:`trp.losses.MaskCriterion` samples points from
            (``C' = mask_dim``, + 5 with the light head's box prior).
        """
        if not isinstance(inputs, HeadInputs):
            raise TypeError(f"MaskHead takes a trp.heads.HeadInputs, got {type(inputs).__name__}")
        if inputs.image_size is None:
            raise ValueError("MaskHead needs HeadInputs.image_size=(H, W)")
        out_size = quarter_size(inputs.image_size)
        if self.decoder_kind == "light":
            return self._light(inputs, out_size)
        self.adapter.check(inputs.features)
        qb = self.query_encoder(
            inputs.queries,
            inputs.image_index,
            num_images=inputs.num_images,
            object_index=inputs.object_index,
        )
        if len(qb) == 0:
            return self._empty(inputs, qb.image_index, out_size)
        feats = self.adapter(inputs.features, inputs.padding_masks)
        q, q_pos = qb.pad(qb.embed), qb.pad(qb.pos)  # B x M x D
        padding = qb.attention_padding_mask()
        image = feats.flat  # B x S x D
        for block in self.blocks:
            q, image = block(q, q_pos, image, feats.flat_pos, padding, feats.padding)
        sizes = [int(h) * int(w) for h, w in feats.spatial_shapes.tolist()]
        maps = [
            rearrange(level, "b (h w) c -> b c h w", h=m.shape[-2])
            for level, m in zip(image.split(sizes, dim=1), feats.maps)
        ]
        pixels = self.pixel_decoder(maps, out_size, padding_masks=inputs.padding_masks)
        embed = self.mask_embed(q)  # B x M x Cm
        masks = torch.einsum("bmc,bchw->bmhw", embed, pixels)
        return {
            "masks": qb.unpad(masks),
            "mask_embed": qb.unpad(embed),
            "pixel_features": pixels,
            "image_index": qb.image_index,
        }

    def _light(self, inputs: HeadInputs, out_size: tuple[int, int]) -> dict:
        qb, feats = self.decoder.encode(inputs)
        if len(qb) == 0:
            return self._empty(inputs, qb.image_index, out_size)
        reference_boxes = inputs.reference_boxes
        use_ref = reference_boxes is not None and self.box_prior
        query = qb.embed + qb.pos  # N x D
        if use_ref:
            if reference_boxes.shape != (len(qb), 4):
                raise ValueError(
                    f"reference_boxes must be [{len(qb)}, 4] (one per object), got "
                    f"{list(reference_boxes.shape)}"
                )
            ref = reference_boxes.to(device=query.device, dtype=torch.float32)
            known = ~ref.isnan().any(1, keepdim=True)
            query = query + self.ref_embed(ref.nan_to_num(0.0).to(query.dtype)) * known
        tokens = qb.pad(self.decoder.tokens[None] + query[:, None, :])  # B x M x 1 x D
        refs = None
        if self.decoder.cross_attention == "deformable":
            # Deformable attention samples around the reference box, else the image centre.
            centre = query.new_tensor([0.5, 0.5, 1.0, 1.0]).expand(len(qb), 4)
            if use_ref:
                centre = torch.where(known, ref.nan_to_num(0.5).to(query.dtype), centre)
            refs = qb.pad(centre)[:, :, None]
        x = self.decoder(tokens, feats, reference_points=refs)
        padding = None
        if feats.padding is not None:
            h, w = feats.maps[-1].shape[-2:]
            padding = feats.padding[:, -h * w :].reshape(-1, h, w)
        masks, embed, pixels = self.readout(
            qb.unpad(x)[:, 0],
            feats.maps[-1] + feats.pos[-1],
            qb.image_index,
            image_size=inputs.image_size,
            fine_features=inputs.fine_features,
            reference_boxes=reference_boxes if use_ref else None,
            padding=padding,
        )
        return {
            "masks": masks,
            "mask_embed": embed,
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
