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
    merge_reference_boxes,
    quarter_size,
)

__all__ = ["LightBoxHead", "LightMaskHead", "box_prior_coefficients", "coordinate_channels"]


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
    the delta starting at zero): the ``reference_boxes`` given per object (for a VRT run, the box
    around the patches it names) or, for rows that are NaN or when none are given, a box
    predicted from the query alone. The reference is embedded into the query, so the decoder's
    attention starts where the reference points.

    Args:
        in_dim: LM hidden width of the queries; in_channels: channels of each feature level.
        d_model, n_heads, dim_feedforward, num_layers: decoder size.
        pooling: how the queries of one object (a VRT run) are pooled (``QueryEncoder``).
        reference_noise: in training, given reference boxes are jittered by
            :func:`trp.heads.jitter_boxes` with this scale, so the refinement learns to correct
            references that are off (a VRT run that names part of an object gives a box that
            is too small).
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
    ) -> None:
        super().__init__()
        if reference_noise < 0:
            raise ValueError(f"reference_noise must be >= 0, got {reference_noise}")
        self.reference_noise = reference_noise
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
        """``queries`` [Nq, C_lm] -> ``boxes`` [N, 4] (cxcywh in (0, 1)), ``scores`` [N],
        ``image_index`` [N], ``aux`` (empty: one output layer). ``reference_boxes`` [N, 4]
        (cxcywh in [0, 1], NaN rows: none) are the priors the boxes refine."""
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

        x, qb, _ = self.decoder.run(queries, features, query_image_index, object_index, bias)
        token = x[:, 0]  # N x D
        return {
            "boxes": (self.box_embed(token) + inverse_sigmoid(refs[0])).sigmoid(),
            "scores": self.score_embed(token)[:, 0],
            "image_index": qb.image_index,
            "aux": [],
        }


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


class LightMaskHead(nn.Module):
    """Queries -> one mask logit map per object at 1/4 of the image size.

    The mask token's embedding is dotted with pixel features: the adapted feature map of the
    image (with its positions) upsampled by two 2x transposed convolutions, then resized to
    ``quarter_size(image_size)``.

    Args:
        in_dim, in_channels, d_model, n_heads, dim_feedforward, num_layers, pooling: as
            :class:`LightBoxHead`.
        mask_dim: width of the pixel features and mask embeddings.
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
        box_prior: bool = True,
    ) -> None:
        super().__init__()
        self.box_prior = box_prior
        self.ref_embed = MLP(in_dim=4, hidden_dim=d_model, out_dim=d_model, num_layers=2)
        # softplus(1.85) ~ 2: the prior starts at +2 in the box centre and 0 on its border.
        self.prior_params = nn.Linear(d_model, 2)
        nn.init.zeros_(self.prior_params.weight)
        with torch.no_grad():
            self.prior_params.bias.copy_(torch.tensor([1.85, 2.0]))
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
        reference_boxes: Tensor | None = None,
    ) -> dict:
        """``queries`` [Nq, C_lm] -> ``masks`` [N, H/4, W/4] logits, ``mask_embed`` [N, C'],
        ``pixel_features`` [B, C', H/4, W/4] (what :class:`trp.losses.MaskCriterion` samples
        points from; C' = C + 5 with the box prior) and ``image_index`` [N].
        ``reference_boxes`` [N, 4] (cxcywh, NaN rows: none) place the box prior."""
        refs: list[Tensor] = []

        def bias(query: Tensor) -> Tensor:
            if reference_boxes is None or not self.box_prior:
                return torch.zeros_like(query)
            if reference_boxes.shape != (query.shape[0], 4):
                raise ValueError(
                    f"reference_boxes must be [{query.shape[0]}, 4] (one per object), got "
                    f"{list(reference_boxes.shape)}"
                )
            ref = reference_boxes.to(device=query.device, dtype=torch.float32)
            refs.append(ref)
            known = ~ref.isnan().any(1, keepdim=True)
            return self.ref_embed(ref.nan_to_num(0.0).to(query.dtype)) * known

        x, qb, feats = self.decoder.run(queries, features, query_image_index, object_index, bias)
        level = feats.maps[-1] + feats.pos[-1][None]  # B x D x h x w
        pixels = self.upsample(level)  # B x C x 4h x 4w
        if image_size is not None:
            size = quarter_size(image_size)
            if tuple(pixels.shape[-2:]) != size:
                pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        embed = self.mask_embed(x[:, 0])  # N x C
        if self.box_prior:
            # fp32: the expanded quadratic cancels large terms, which bf16 cannot carry.
            params = self.prior_params(x[:, 0]).float()
            ref = refs[0] if refs else embed.new_full((embed.shape[0], 4), float("nan"))
            grid = feats.maps[-1].shape[-2:]  # one patch of margin around the reference
            coeffs = box_prior_coefficients(
                ref.float(), F.softplus(params[:, 0]), params[:, 1], (1 / grid[1], 1 / grid[0])
            )
            coords = coordinate_channels(*pixels.shape[-2:], device=pixels.device)
            embed = torch.cat([embed.float(), coeffs], dim=1)
            pixels = torch.cat([pixels.float(), coords.expand(pixels.shape[0], -1, -1, -1)], 1)
        with torch.autocast(pixels.device.type, enabled=False):
            masks = torch.einsum("nc,nchw->nhw", embed.float(), pixels.float()[qb.image_index])
        return {
            "masks": masks,
            "mask_embed": embed,
            "pixel_features": pixels,
            "image_index": qb.image_index,
        }
