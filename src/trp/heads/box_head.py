"""``BoxHead``: referring queries -> one box (normalised cxcywh) and a score per object.

Two decoders, one :class:`QueryDecoder` plumbing:

* ``decoder="detr"`` (default) — Deformable-DETR: post-norm layers, self-attention among an
  image's queries, box refined after every layer (``aux`` outputs);
* ``decoder="light"`` — the small-recipe head: pre-norm GELU layers over each object's own
  token, the reference box embedded into the query, one refinement after the last layer,
  optionally from the extent of a predicted box-region map (:class:`MaskReadout`).

``cross_attention`` (``"deformable"`` or ``"dense"``) is independent of the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trp.heads.adapter import AdaptedFeatures
from trp.heads.blocks import MLP, inverse_sigmoid, merge_reference_boxes
from trp.heads.inputs import HeadInputs
from trp.heads.mask_head import masks_to_boxes
from trp.heads.mask_readout import MaskReadout
from trp.heads.pixel_decoder import quarter_size, replicate_edges
from trp.heads.queries import Pooling, QueryBatch
from trp.heads.query_decoder import CrossAttentionKind, QueryDecoder

__all__ = ["BoxHead"]

BoxDecoder = Literal["detr", "light"]


class BoxHead(nn.Module):
    """Queries -> one box (normalised cxcywh in the image's own frame) and one score logit per
    object.

    ``decoder="detr"``: each layer predicts a delta in logit space on the previous layer's box,
    which (detached) is the next layer's reference; the first reference is predicted from the
    query (a referring query carries its location in its content) and is not detached, so that
    prediction trains through the first layer's box.

    ``decoder="light"``: the reference is, in order of preference: with ``region``, the extent
    of the object's predicted box region (a :class:`MaskReadout` logit map at 1/4 of the image
    size, trained to cover the target box, ``region_logits`` in the output; its box is read at
    pixel precision, which regressing from a coarse token cannot reach quickly); else the given
    ``reference_boxes``; else a box predicted from the query. The given (or predicted) reference
    is also embedded into the query, so the decoder's attention starts where it points.

    Args:
        in_dim: LM hidden width of the queries; in_channels: channels of each feature level.
        d_model, n_heads, n_points, dim_feedforward, num_layers, dropout: decoder size (DETR:
            256, 8, 4, 1024, 6).
        decoder: ``"detr"`` or ``"light"`` (see above).
        cross_attention: ``"deformable"`` (``trp.ops.MSDeformAttn`` around each reference box)
            or ``"dense"`` (every cell of the image).
        pooling, max_queries: of the :class:`QueryEncoder`.
        reference_noise: in training, given ``reference_boxes`` are jittered by
            :func:`trp.heads.jitter_boxes` with this scale (DN-DETR-style), so the refinement
            learns to correct references that are off.
        region, mask_dim, fine_channels, extent_scale (``decoder="light"`` only): predict the
            box-region map (of a :class:`MaskReadout` with ``mask_dim`` channels, reading
            ``fine_features`` with ``fine_channels``) and read its extent from the logits
            bilinearly upsampled ``extent_scale`` times (4 = image resolution for a 1/4 map).
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
        decoder: BoxDecoder = "detr",
        cross_attention: CrossAttentionKind = "deformable",
        pooling: Pooling = "attention",
        max_queries: int = 100,
        reference_noise: float = 0.0,
        region: bool = False,
        mask_dim: int = 32,
        fine_channels: int = 0,
        extent_scale: int = 1,
    ) -> None:
        super().__init__()
        if decoder not in ("detr", "light"):
            raise ValueError(f"decoder must be 'detr' or 'light', got {decoder!r}")
        if reference_noise < 0:
            raise ValueError(f"reference_noise must be >= 0, got {reference_noise}")
        if isinstance(extent_scale, bool) or not isinstance(extent_scale, int) or extent_scale < 1:
            raise ValueError(f"extent_scale must be an int >= 1, got {extent_scale!r}")
        if decoder == "detr" and (region or fine_channels or extent_scale != 1):
            raise ValueError(
                "region, fine_channels and extent_scale belong to BoxHead(decoder='light')"
            )
        light = decoder == "light"
        self.decoder_kind: BoxDecoder = decoder
        self.reference_noise = reference_noise
        self.extent_scale = extent_scale
        self.decoder = QueryDecoder(
            in_dim=in_dim,
            in_channels=in_channels,
            d_model=d_model,
            n_heads=n_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            cross_attention=cross_attention,
            n_points=n_points,
            # DETR's values are position-free only inside its self-attention; both decoders
            # read positions out of the image (see DenseCrossAttention).
            value_pos=True,
            self_attention="tokens" if light else "objects",
            norm_first=light,
            activation="gelu" if light else "relu",
            dropout=dropout,
            pooling=pooling,
            max_queries=max_queries,
            num_tokens=1 if light else 0,
        )
        self.init_box = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=2)
        # (Module order = the order the initialisation draws in, kept from the former head.)
        self.ref_embed = (
            MLP(in_dim=4, hidden_dim=d_model, out_dim=d_model, num_layers=2) if light else None
        )
        n_out = 1 if light else num_layers
        self.box_embed = nn.ModuleList(
            MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=3) for _ in range(n_out)
        )
        self.score_embed = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_out))
        for mlp in self.box_embed:
            # Start each refinement at "no change" so early training keeps the reference box.
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        self.region = (
            MaskReadout(
                d_model=d_model, mask_dim=mask_dim, fine_channels=fine_channels, box_prior=True
            )
            if region
            else None
        )
        self.d_model = d_model

    def _empty(self, inputs: HeadInputs, image_index: Tensor) -> dict:
        boxes, scores = inputs.queries.new_zeros(0, 4), inputs.queries.new_zeros(0)
        n_aux = len(self.decoder.layers) - 1 if self.decoder_kind == "detr" else 0
        out = {
            "boxes": boxes,
            "scores": scores,
            "image_index": image_index,
            "aux": [{"boxes": boxes, "scores": scores} for _ in range(n_aux)],
        }
        if self.region is not None and inputs.image_size is not None:
            out["region_logits"] = inputs.queries.new_zeros(0, *quarter_size(inputs.image_size))
        return out

    def forward(self, inputs: HeadInputs) -> dict:
        """Decode boxes.

        Reads ``queries``, ``features``, ``image_index``, ``object_index``, ``padding_masks``,
        ``reference_boxes`` (per object a prior box, cxcywh in [0, 1]; NaN rows: none) and, with
        ``region``, ``image_size`` and ``fine_features``.

        Returns:
            dict with ``boxes`` (Tensor[N, 4], cxcywh in (0, 1)), ``scores`` (Tensor[N] logits,
            trained towards the box quality), ``image_index`` (Tensor[N]), ``aux`` (one dict of
            ``boxes``/``scores`` per earlier decoder layer; empty for ``"light"``) and, with
            ``region``, ``region_logits`` (Tensor[N, H/4, W/4]).
        """
        if not isinstance(inputs, HeadInputs):
            raise TypeError(f"BoxHead takes a trp.heads.HeadInputs, got {type(inputs).__name__}")
        qb, feats = self.decoder.encode(inputs)
        if len(qb) == 0:
            return self._empty(inputs, qb.image_index)
        guess = self.init_box(qb.embed + qb.pos).sigmoid()  # N x 4
        ref = merge_reference_boxes(
            guess, inputs.reference_boxes, noise=self.reference_noise, training=self.training
        )
        if self.decoder_kind == "light":
            return self._light(inputs, qb, feats, ref)
        return self._detr(qb, feats, ref)

    def _detr(self, qb: QueryBatch, feats: AdaptedFeatures, guess: Tensor) -> dict:
        tgt = qb.pad(qb.embed)[:, :, None]  # B x M x 1 x D
        query_pos = qb.pad(qb.pos)[:, :, None]  # B x M x 1 x D
        padding = qb.attention_padding_mask()  # B x M
        # Deformable-DETR: the first reference is not detached, so the learned guess trains
        # through the first layer's box; later references are.
        ref = qb.pad(guess)[:, :, None]  # B x M x 1 x 4
        outputs = []
        for layer, box_embed, score_embed in zip(
            self.decoder.layers, self.box_embed, self.score_embed
        ):
            tgt = layer(
                tgt, feats, pos=query_pos, reference_points=ref.detach(), object_padding=padding
            )
            anchor = ref if not outputs else ref.detach()
            box = (box_embed(tgt) + inverse_sigmoid(anchor)).sigmoid()  # B x M x 1 x 4
            outputs.append(
                {"boxes": qb.unpad(box[:, :, 0]), "scores": qb.unpad(score_embed(tgt))[:, 0, 0]}
            )
            ref = box
        last = outputs[-1]
        return {
            "boxes": last["boxes"],
            "scores": last["scores"],
            "image_index": qb.image_index,
            "aux": outputs[:-1],
        }

    def _light(
        self, inputs: HeadInputs, qb: QueryBatch, feats: AdaptedFeatures, ref: Tensor
    ) -> dict:
        # The learned guess trains through the box it anchors; the query sees it detached.
        query = qb.embed + qb.pos + self.ref_embed(ref.detach())  # N x D
        tokens = qb.pad(self.decoder.tokens[None] + query[:, None, :])  # B x M x 1 x D
        refs = qb.pad(ref)[:, :, None]  # B x M x 1 x 4 (read by deformable attention only)
        x = self.decoder(tokens, feats, reference_points=refs.detach())
        token = qb.unpad(x)[:, 0]  # N x D
        out = {
            "scores": self.score_embed[0](token)[:, 0],
            "image_index": qb.image_index,
            "aux": [],
        }
        base = ref
        if self.region is not None:
            padding = None
            if feats.padding is not None:
                h, w = feats.maps[-1].shape[-2:]
                padding = feats.padding[:, -h * w :].reshape(-1, h, w)
            logits, _, _ = self.region(
                token,
                feats.maps[-1] + feats.pos[-1],
                qb.image_index,
                image_size=inputs.image_size,
                fine_features=inputs.fine_features,
                reference_boxes=inputs.reference_boxes,
                padding=padding,
            )
            out["region_logits"] = logits
            grid = logits.detach().float()
            pad = None
            if padding is not None:
                cell = padding[qb.image_index].float()[:, None]  # N x 1 x h x w
                pad = F.interpolate(cell, size=grid.shape[-2:], mode="nearest")[:, 0] > 0
                grid = replicate_edges(grid[:, None], ~pad)[:, 0]
            if self.extent_scale > 1:
                grid = F.interpolate(
                    grid[:, None], scale_factor=self.extent_scale, mode="bilinear"
                )[:, 0]
                if pad is not None:
                    pad = pad.repeat_interleave(self.extent_scale, 1)
                    pad = pad.repeat_interleave(self.extent_scale, 2)
            if pad is not None:
                # Padding never counts as region: the extent stays inside the image.
                grid = grid.masked_fill(pad, -1.0)
            extent = masks_to_boxes(grid > 0)
            if feats.valid_ratios is not None:
                # Canvas frame -> the image's own frame.
                ratio = feats.valid_ratios[qb.image_index, -1].float()  # N x 2 (x, y)
                extent = extent / torch.cat([ratio, ratio], 1)
            found = extent[:, 2:].amin(1, keepdim=True) > 0
            base = torch.where(found, extent.to(base.dtype), base)
        out["boxes"] = (self.box_embed[0](token) + inverse_sigmoid(base)).sigmoid()
        return out
