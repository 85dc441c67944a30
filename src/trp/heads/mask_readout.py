"""``MaskReadout``: per-object logit maps at 1/4 of the image size from one decoded token, with an
optional elliptic prior around a reference box (the readout of the light box and mask heads)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from trp.heads.blocks import MLP, masked_group_norm
from trp.heads.pixel_decoder import quarter_size, replicate_edges

__all__ = ["MaskReadout", "box_prior_coefficients", "coordinate_channels"]


def coordinate_channels(
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    extent: Tensor | None = None,
) -> Tensor:
    """``[5, H, W]`` maps ``x², x, y², y, 1`` of the normalised cell centres (x, y in (0, 1)).

    ``extent (Tensor[B, 2])``: per image the ``(rows, cols)`` of the grid that are image (the
    rest is padding): coordinates are then normalised by each image's own extent and the result
    is ``[B, 5, H, W]``.
    """
    y = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    if extent is None:
        yy, xx = torch.meshgrid(y / height, x / width, indexing="ij")
        return torch.stack([xx * xx, xx, yy * yy, yy, torch.ones_like(xx)])
    ext = extent.to(device=device, dtype=torch.float32).clamp(min=1)
    yy = (y[None] / ext[:, :1])[:, :, None].expand(-1, height, width)  # B x H x W
    xx = (x[None] / ext[:, 1:])[:, None, :].expand(-1, height, width)  # B x H x W
    return torch.stack([xx * xx, xx, yy * yy, yy, torch.ones_like(xx)], dim=1)


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
    """Per-object logit maps at 1/4 of the image size: an object's embedding dotted with its
    image's pixel features.

    Pixel features = the coarse decoder map (with its positions) upsampled by two 2x transposed
    convolutions, plus a 1x1 projection of ``fine_features`` (a stride-4 map of the image, e.g.
    :class:`trp.models.ConvStem`) when ``fine_channels > 0``: the coarse ViT grid alone cannot
    place an edge inside a patch. With ``box_prior`` and a reference box per object, a learned
    elliptic logit prior around the box (:func:`box_prior_coefficients`) rides on 5 extra
    channels.

    Args:
        d_model: width of the object tokens and of the coarse map.
        mask_dim: width of the pixel features and embeddings.
        fine_channels: channels of the fine map (0: none).
        box_prior: add the reference-box prior.
    """

    def __init__(
        self, *, d_model: int, mask_dim: int, fine_channels: int = 0, box_prior: bool = False
    ) -> None:
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

    def _upsample(self, coarse: Tensor, valid: Tensor | None) -> Tensor:
        if valid is None:
            return self.upsample(coarse)
        up1, norm, act, up2 = self.upsample
        x = up1(coarse)  # B x D/2 x 2h x 2w
        v = valid.repeat_interleave(2, 1).repeat_interleave(2, 2)
        return up2(act(masked_group_norm(x, norm, v)))

    def forward(
        self,
        token: Tensor,
        coarse: Tensor,
        image_index: Tensor,
        *,
        image_size: tuple[int, int] | None,
        fine_features: Tensor | None = None,
        reference_boxes: Tensor | None = None,
        padding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Read out the maps.

        Args:
            token (Tensor[N, D]): one decoded token per object.
            coarse (Tensor[B, D, h, w]): the coarse map of each image, positions included.
            image_index (Tensor[N], int64): image of each object.
            image_size: ``(H, W)``; the maps are ``quarter_size(image_size)`` (default 4h x 4w).
            fine_features (Tensor[B, C_f, H/4, W/4]): required with ``fine_channels > 0``.
            reference_boxes (Tensor[N, 4], cxcywh, NaN rows: none): where the box prior goes.
            padding (Tensor[B, h, w], bool, optional): padded cells of ``coarse``.
        Returns:
            (logits [N, H/4, W/4], embeddings [N, C'], pixel features [B, C', H/4, W/4]);
            ``C' = mask_dim (+ 5 with the box prior)``.
        """
        valid = None if padding is None else ~padding
        pixels = self._upsample(coarse, valid)  # B x C x 4h x 4w
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
            if valid is not None:
                # Edge clamping at the image's own border, as for the image alone.
                up = valid.repeat_interleave(4, 1).repeat_interleave(4, 2)
                pixels = replicate_edges(pixels, up)
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
            if valid is not None:
                # Each image's own grid: the margin and the coordinates follow its extent.
                rows = valid.any(2).sum(1)[image_index].float()
                cols = valid.any(1).sum(1)[image_index].float()
                margin = (1 / cols, 1 / rows)
            else:
                margin = (1 / grid[1], 1 / grid[0])
            coeffs = box_prior_coefficients(
                ref,
                F.softplus(params[:, 0]),
                params[:, 1],
                margin,  # type: ignore[arg-type]
            )
            h, w = pixels.shape[-2:]
            if valid is None:
                coords = coordinate_channels(h, w, device=pixels.device)
                coords = coords.expand(pixels.shape[0], -1, -1, -1)
            else:
                extent = torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], 1)  # B x 2
                scale = torch.tensor([h / grid[0], w / grid[1]], device=pixels.device)
                coords = coordinate_channels(h, w, device=pixels.device, extent=extent * scale)
            embed = torch.cat([embed.float(), coeffs], dim=1)
            pixels = torch.cat([pixels.float(), coords], 1)
        with torch.autocast(pixels.device.type, enabled=False):
            # Each object dots its own image's pixels (a gather of embeddings, not of maps).
            logits = _per_image_dot(embed.float(), pixels.float(), image_index)
        return logits, embed, pixels


def _per_image_dot(embed: Tensor, pixels: Tensor, image_index: Tensor) -> Tensor:
    """``embed [N, C] · pixels[image_index] [N, C, h, w] -> [N, h, w]`` without materialising
    the per-object copy of the maps: the objects are scattered into per-image slots
    ``[B, K_max, C]`` (K_max: most objects of one image) and one batched matmul dots each image's
    pixels with its own objects, a fixed handful of ops whatever the batch."""
    b, c, h, w = pixels.shape
    n = embed.shape[0]
    if n == 0:
        return embed.new_zeros(0, h, w)
    flat = rearrange(pixels, "b c h w -> b c (h w)")
    counts = torch.bincount(image_index, minlength=b)
    order = torch.argsort(image_index, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(n, device=image_index.device) - starts[image_index[order]]
    slots = embed.new_zeros(b, int(counts.max()), c)
    slots = slots.index_put((image_index, slot), embed)
    out = torch.bmm(slots, flat)[image_index, slot]  # N x (h w)
    return rearrange(out, "n (h w) -> n h w", h=h)
