"""Light box and mask heads with plain (dense) cross-attention, for small CPU recipes.

Same interface as the heads of :mod:`trp.heads` (``head(queries, features, query_image_index,
object_index=..., image_size=...) -> dict``) so a recipe can switch between them in its config.
On an 8 x 8 ViT grid dense attention over all 64 cells is as cheap as deformable sampling and
needs no fused op; the prior-art prototype on this machine used exactly this shape of decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trp.heads import (
    MLP,
    FeatureAdapter,
    QueryEncoder,
    inverse_sigmoid,
    masks_to_boxes,
    merge_reference_boxes,
    quarter_size,
)

__all__ = [
    "LightBoxHead",
    "LightMaskHead",
    "MaskReadout",
    "box_prior_coefficients",
    "coordinate_channels",
]


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
        query_bias: Callable[[Tensor], Tensor] | None = None,
    ):
        """Decode; ``query_bias(query [N, D]) -> [N, D]`` is added to each object's query
        before the layers (e.g. the embedding of a reference box)."""
        self.adapter.check(features)
        feats = self.adapter(features)
        qb = self.query_encoder(
            queries, query_image_index, num_images=feats.batch_size, object_index=object_index
        )
        query = qb.embed + qb.pos
        if query_bias is not None:
            query = query + query_bias(query)
        # N x T x D: the learned output tokens, each carrying its object's query.
        x = self.tokens[None] + query[:, None, :]
        memory = feats.flat[qb.image_index]  # N x S x D
        for layer in self.layers:
            x = layer(x, memory, feats.flat_pos)
        return self.norm(x), qb, feats


class LightBoxHead(nn.Module):
    """Queries -> one box (normalised cxcywh) and a box-quality score logit per object.

    Each box refines a reference box (Deformable-DETR's ``sigmoid(delta + logit(reference))``,
    the delta starting at zero). The reference is, in order of preference: with ``region``, the
    extent of the object's predicted *box region* (a :class:`MaskReadout` logit map at 1/4 of
    the image size, trained to cover the target box, ``region_logits`` in the output; its box
    is read at pixel precision, which regressing from a coarse token cannot reach quickly);
    else the ``reference_boxes`` given per object (for a VRT run, the box around the patches it
    names); else a box predicted from the query alone. The given (or predicted) reference is
    also embedded into the query, so the decoder's attention starts where it points.

    Args:
        in_dim: LM hidden width of the queries; in_channels: channels of each feature level.
        d_model, n_heads, dim_feedforward, num_layers: decoder size.
        pooling: how the queries of one object (a VRT run) are pooled (``QueryEncoder``).
        reference_noise: in training, given reference boxes are jittered by
            :func:`trp.heads.jitter_boxes` with this scale, so the refinement learns to correct
            references that are off (a VRT run that names part of an object gives a box that
            is too small).
        region: predict the box region map and refine its extent.
        mask_dim, fine_channels: of the region map's :class:`MaskReadout`.
        extent_scale: read the region's extent from its logits bilinearly upsampled by this
            factor (4 = the image resolution for a 1/4 map): the zero crossing falls between
            cells, where the 1/4 map alone quantises every edge to 4 pixels.
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
        reference_noise: float = 0.0,
        region: bool = False,
        mask_dim: int = 32,
        fine_channels: int = 0,
        extent_scale: int = 1,
    ) -> None:
        super().__init__()
        if reference_noise < 0:
            raise ValueError(f"reference_noise must be >= 0, got {reference_noise}")
        if isinstance(extent_scale, bool) or not isinstance(extent_scale, int) or extent_scale < 1:
            raise ValueError(f"extent_scale must be an int >= 1, got {extent_scale!r}")
        self.reference_noise = reference_noise
        self.extent_scale = extent_scale
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
        self.init_box = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=2)
        self.ref_embed = MLP(in_dim=4, hidden_dim=d_model, out_dim=d_model, num_layers=2)
        self.box_embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=3)
        # Start at "no change": early training keeps the reference box.
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)
        self.score_embed = nn.Linear(d_model, 1)
        self.region = (
            MaskReadout(
                d_model=d_model, mask_dim=mask_dim, fine_channels=fine_channels, box_prior=True
            )
            if region
            else None
        )

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        reference_boxes: Tensor | None = None,
        fine_features: Tensor | None = None,
    ) -> dict:
        """``queries`` [Nq, C_lm] -> ``boxes`` [N, 4] (cxcywh in (0, 1)), ``scores`` [N],
        ``image_index`` [N], ``aux`` (empty: one output layer) and, with ``region``,
        ``region_logits`` [N, H/4, W/4]. ``reference_boxes`` [N, 4] (cxcywh in [0, 1], NaN
        rows: none) are the priors the boxes refine; ``fine_features`` [B, C_f, H/4, W/4] are
        required when built with ``fine_channels``."""
        refs: list[Tensor] = []

        def bias(query: Tensor) -> Tensor:
            ref = merge_reference_boxes(
                self.init_box(query).sigmoid(),
                reference_boxes,
                noise=self.reference_noise,
                training=self.training,
            )
            refs.append(ref)  # the learned guess trains through the box it anchors
            return self.ref_embed(ref.detach())

        x, qb, feats = self.decoder.run(queries, features, query_image_index, object_index, bias)
        token = x[:, 0]  # N x D
        base = refs[0]
        out = {"scores": self.score_embed(token)[:, 0], "image_index": qb.image_index, "aux": []}
        if self.region is not None:
            logits, _, _ = self.region(
                token,
                feats.maps[-1] + feats.pos[-1][None],
                qb.image_index,
                image_size=image_size,
                fine_features=fine_features,
                reference_boxes=reference_boxes,
            )
            out["region_logits"] = logits
            grid = logits.detach().float()
            if self.extent_scale > 1 and grid.shape[0]:
                grid = F.interpolate(
                    grid[:, None], scale_factor=self.extent_scale, mode="bilinear"
                )[:, 0]
            extent = masks_to_boxes(grid > 0)
            found = extent[:, 2:].amin(1, keepdim=True) > 0
            base = torch.where(found, extent.to(base.dtype), base)
        out["boxes"] = (self.box_embed(token) + inverse_sigmoid(base)).sigmoid()
        return out


def coordinate_channels(height: int, width: int, *, device=None) -> Tensor:
    """``[5, H, W]`` maps ``x², x, y², y, 1`` of the normalised cell centres (x, y in (0, 1))."""
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx * xx, xx, yy * yy, yy, torch.ones_like(xx)])


def box_prior_coefficients(
    reference_boxes: Tensor, scale: Tensor, bias: Tensor, margin: tuple[float, float]
) -> Tensor:
    """Coefficients ``[N, 5]`` over :func:`coordinate_channels` of the logit prior
    ``bias - scale * ((x - cx)² / rx² + (y - cy)² / ry²)`` of each reference box (cxcywh; NaN
    rows give a zero prior), with radii ``rx = w/2 + margin[0]``, ``ry = h/2 + margin[1]``
    (a reference built from patches is coarse by about one patch).

    A quadratic in the coordinates is a dot product with fixed channels, so the prior rides in
    the mask embedding and the point-sampled loss (which dots embeddings with pixel features)
    sees it too. Radii are floored at 1/32 to keep the coefficients bounded.
    """
    ref = reference_boxes.float()
    known = ~ref.isnan().any(1, keepdim=True)
    ref = torch.where(known, ref, torch.full_like(ref, 0.5))
    cx, cy = ref[:, 0], ref[:, 1]
    ix = 1 / (ref[:, 2] / 2 + margin[0]).clamp(min=1 / 32) ** 2
    iy = 1 / (ref[:, 3] / 2 + margin[1]).clamp(min=1 / 32) ** 2
    a, b = scale.float(), bias.float()
    coeffs = torch.stack(
        [-a * ix, 2 * a * cx * ix, -a * iy, 2 * a * cy * iy, b - a * (cx * cx * ix + cy * cy * iy)],
        dim=1,
    )
    return coeffs * known


class MaskReadout(nn.Module):
    """Per-object logit maps at 1/4 of the image size: an object's embedding dotted with pixel
    features.

    Pixel features = the coarse decoder map (with its positions) upsampled by two 2x transposed
    convolutions, plus a 1x1 projection of ``fine_features`` (a stride-4 map of the image, e.g.
    :class:`ConvStem`) when ``fine_channels > 0``: the coarse ViT grid alone cannot place an
    edge inside a patch. With ``box_prior`` and a reference box per object, a learned elliptic
    logit prior around the box (:func:`box_prior_coefficients`) rides on 5 extra channels.

    Args:
        d_model: width of the object tokens and of the coarse map.
        mask_dim: width of the pixel features and embeddings.
        fine_channels: channels of the fine map (0: none).
        box_prior: add the reference-box prior.
    """

    def __init__(self, *, d_model: int, mask_dim: int, fine_channels: int, box_prior: bool):
        super().__init__()
        if fine_channels < 0:
            raise ValueError(f"fine_channels must be >= 0, got {fine_channels}")
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(d_model, d_model // 2, kernel_size=2, stride=2),
            nn.GroupNorm(1, d_model // 2),
            nn.GELU(),
            nn.ConvTranspose2d(d_model // 2, mask_dim, kernel_size=2, stride=2),
        )
        self.fine = nn.Conv2d(fine_channels, mask_dim, kernel_size=1) if fine_channels else None
        self.embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=mask_dim, num_layers=3)
        # softplus(1.85) ~ 2: the prior starts at +2 in the box centre and 0 on its border.
        self.prior_params = nn.Linear(d_model, 2) if box_prior else None
        if self.prior_params is not None:
            nn.init.zeros_(self.prior_params.weight)
            with torch.no_grad():
                self.prior_params.bias.copy_(torch.tensor([1.85, 2.0]))

    def forward(
        self,
        token: Tensor,
        coarse: Tensor,
        image_index: Tensor,
        *,
        image_size: tuple[int, int] | None,
        fine_features: Tensor | None,
        reference_boxes: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``token`` [N, D] per object, ``coarse`` [B, D, h, w] (positions included) ->
        (logits [N, H/4, W/4], embeddings [N, C'], pixel features [B, C', H/4, W/4])."""
        pixels = self.upsample(coarse)  # B x C x 4h x 4w
        size = quarter_size(image_size) if image_size is not None else tuple(pixels.shape[-2:])
        if self.fine is not None:
            if fine_features is None:
                raise ValueError("this head was built with fine_channels > 0: pass fine_features")
            if fine_features.shape[0] != coarse.shape[0] or fine_features.dim() != 4:
                raise ValueError(
                    f"fine_features must be [{coarse.shape[0]}, C, H/4, W/4], got "
                    f"{list(fine_features.shape)}"
                )
            size = tuple(fine_features.shape[-2:])
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        if self.fine is not None:
            pixels = pixels + self.fine(fine_features.to(pixels.dtype))
        embed = self.embed(token)  # N x C
        if self.prior_params is not None:
            # fp32: the expanded quadratic cancels large terms, which bf16 cannot carry.
            params = self.prior_params(token).float()
            ref = (
                reference_boxes.to(device=token.device, dtype=torch.float32)
                if reference_boxes is not None
                else embed.new_full((embed.shape[0], 4), float("nan"), dtype=torch.float32)
            )
            grid = coarse.shape[-2:]  # one patch of margin around the reference
            coeffs = box_prior_coefficients(
                ref, F.softplus(params[:, 0]), params[:, 1], (1 / grid[1], 1 / grid[0])
            )
            coords = coordinate_channels(*pixels.shape[-2:], device=pixels.device)
            embed = torch.cat([embed.float(), coeffs], dim=1)
            pixels = torch.cat([pixels.float(), coords.expand(pixels.shape[0], -1, -1, -1)], 1)
        with torch.autocast(pixels.device.type, enabled=False):
            logits = torch.einsum("nc,nchw->nhw", embed.float(), pixels.float()[image_index])
        return logits, embed, pixels


def _check_reference(reference_boxes: Tensor | None, n: int) -> None:
    if reference_boxes is not None and reference_boxes.shape != (n, 4):
        raise ValueError(
            f"reference_boxes must be [{n}, 4] (one per object), got {list(reference_boxes.shape)}"
        )


class LightMaskHead(nn.Module):
    """Queries -> one mask logit map per object at 1/4 of the image size (:class:`MaskReadout`
    of the decoded mask token).

    Args:
        in_dim, in_channels, d_model, n_heads, dim_feedforward, num_layers, pooling: as
            :class:`LightBoxHead`.
        mask_dim: width of the pixel features and mask embeddings.
        fine_channels: channels of the stride-4 ``fine_features`` added to the pixel features
            (0: none).
        box_prior: with ``reference_boxes``, add to each mask's logits a learned elliptic
            prior around its reference box (:func:`box_prior_coefficients`; 5 extra channels of
            ``mask_embed`` / ``pixel_features``), and embed the box into the query.
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
        fine_channels: int = 0,
        box_prior: bool = True,
    ) -> None:
        super().__init__()
        self.box_prior = box_prior
        self.ref_embed = MLP(in_dim=4, hidden_dim=d_model, out_dim=d_model, num_layers=2)
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
        self.readout = MaskReadout(
            d_model=d_model, mask_dim=mask_dim, fine_channels=fine_channels, box_prior=box_prior
        )

    def forward(
        self,
        queries: Tensor,
        features: Sequence[Tensor],
        query_image_index: Tensor,
        *,
        object_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        reference_boxes: Tensor | None = None,
        fine_features: Tensor | None = None,
    ) -> dict:
        """``queries`` [Nq, C_lm] -> ``masks`` [N, H/4, W/4] logits, ``mask_embed`` [N, C'],
        ``pixel_features`` [B, C', H/4, W/4] (what :class:`trp.losses.MaskCriterion` samples
        points from; C' = C + 5 with the box prior) and ``image_index`` [N].
        ``reference_boxes`` [N, 4] (cxcywh, NaN rows: none) place the box prior;
        ``fine_features`` [B, C_f, H/4, W/4] are required when built with ``fine_channels``."""
        use_ref = reference_boxes is not None and self.box_prior

        def bias(query: Tensor) -> Tensor:
            if not use_ref:
                return torch.zeros_like(query)
            _check_reference(reference_boxes, query.shape[0])
            ref = reference_boxes.to(device=query.device, dtype=torch.float32)
            known = ~ref.isnan().any(1, keepdim=True)
            return self.ref_embed(ref.nan_to_num(0.0).to(query.dtype)) * known

        x, qb, feats = self.decoder.run(queries, features, query_image_index, object_index, bias)
        masks, embed, pixels = self.readout(
            x[:, 0],
            feats.maps[-1] + feats.pos[-1][None],
            qb.image_index,
            image_size=image_size,
            fine_features=fine_features,
            reference_boxes=reference_boxes if use_ref else None,
        )
        return {
            "masks": masks,
            "mask_embed": embed,
            "pixel_features": pixels,
            "image_index": qb.image_index,
        }
