"""``KeypointHead``: K keypoint queries per instance, regressed or read from heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from trp.heads.blocks import MLP, inverse_sigmoid
from trp.heads.inputs import HeadInputs
from trp.heads.pixel_decoder import PixelDecoder, quarter_size, resize_valid
from trp.heads.queries import Pooling
from trp.heads.query_decoder import QueryDecoder
from trp.ops.soft_argmax import soft_argmax

__all__ = ["KeypointHead"]

Mode = Literal["regression", "heatmap"]


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
        pooling: Pooling = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        if mode not in ("regression", "heatmap"):
            raise ValueError(f"mode must be 'regression' or 'heatmap', got {mode!r}")
        if num_keypoints < 1 or num_layers < 1:
            raise ValueError("num_keypoints and num_layers must be >= 1")
        # Self-attention among the K tokens of one instance; deformable cross-attention of
        # every keypoint token around its current point.
        self.decoder = QueryDecoder(
            in_dim=in_dim,
            in_channels=in_channels,
            d_model=d_model,
            n_heads=n_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            cross_attention="deformable",
            n_points=n_points,
            self_attention="tokens",
            pooling=pooling,
            max_queries=max_queries,
            # The learned embedding and position of each keypoint: decoder.tokens / token_pos.
            num_tokens=num_keypoints,
            token_pos=True,
        )
        n_levels = self.decoder.num_levels
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

    def forward(self, inputs: HeadInputs) -> dict:
        """Predict keypoints.

        Reads ``queries``, ``features``, ``image_index``, ``object_index``, ``padding_masks`` and
        ``image_size`` (needed in heatmap mode: heatmaps at 1/4 resolution).

        Returns:
            dict with ``keypoints`` (Tensor[N, K, 2], normalised xy in [0, 1]), ``visibility``
            (Tensor[N, K] logits), ``image_index`` (Tensor[N]), ``aux`` (``keypoints`` of earlier
            layers; regression mode) and, in heatmap mode, ``heatmaps`` (Tensor[N, K, h, w]).
        """
        if not isinstance(inputs, HeadInputs):
            raise TypeError(
                f"KeypointHead takes a trp.heads.HeadInputs, got {type(inputs).__name__}"
            )
        image_size = inputs.image_size
        if self.mode == "heatmap" and image_size is None:
            raise ValueError("KeypointHead(mode='heatmap') needs HeadInputs.image_size=(H, W)")
        qb, feats = self.decoder.encode(inputs)
        k = self.num_keypoints
        queries = inputs.queries
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
        inst = qb.pad(qb.embed)  # B x M x D
        tokens = inst[:, :, None, :] + self.decoder.tokens  # B x M x K x D
        pos = qb.pad(qb.pos)[:, :, None, :] + self.decoder.token_pos  # B x M x K x D
        ref = self.init_point(tokens).sigmoid()  # B x M x K x 2
        aux = []
        for layer, point_embed in zip(self.decoder.layers, self.point_embed):
            tokens = layer(tokens, feats, pos=pos, reference_points=ref.detach())
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
        b, m = inst.shape[:2]
        pixels = self.pixel_decoder(
            feats.maps, quarter_size(image_size), padding_masks=inputs.padding_masks
        )  # B x Ch x h x w
        embed = rearrange(self.heatmap_embed(tokens), "b m k c -> b (m k) c")
        # Scaled dot product: unscaled logits saturate the soft-argmax (zero gradient) early.
        heat = torch.einsum("bqc,bchw->bqhw", embed, pixels) * embed.shape[-1] ** -0.5
        if inputs.padding_masks is not None:
            # No mass on padding; points from the canvas frame into each image's own frame.
            finest = max(range(len(feats.maps)), key=lambda i: feats.maps[i].shape[-1])
            valid = resize_valid(~inputs.padding_masks[finest].to(heat.device), heat.shape[-2:])
            heat = heat.masked_fill(~valid[:, None], -1e4)
        xy = soft_argmax(heat, beta=self.beta)  # B x MK x 2
        if inputs.padding_masks is not None:
            h, w = heat.shape[-2:]
            extent = torch.stack([valid.any(1).sum(1) / w, valid.any(2).sum(1) / h], -1)
            xy = xy / extent[:, None].to(xy.dtype)
        xy = rearrange(xy, "b (m k) r -> b m k r", m=m)
        out["keypoints"] = qb.unpad(xy)
        out["heatmaps"] = qb.unpad(rearrange(heat, "b (m k) h w -> b m k h w", m=m))
        out["aux"] = aux
        return out

    @staticmethod
    def postprocess(predictions: dict, image_size: tuple[int, int]) -> Tensor:
        """Keypoints in pixels with visibility probability: ``Tensor[N, K, 3]`` (x, y, p)."""
        h, w = image_size
        xy = predictions["keypoints"] * predictions["keypoints"].new_tensor([w, h])
        return torch.cat([xy, predictions["visibility"].sigmoid()[..., None]], dim=-1)
