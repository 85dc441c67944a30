"""Small layers shared by the decoder heads: MLP, 2-D sine-cosine positions, inverse sigmoid,
reference-box noise."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "MLP",
    "inverse_sigmoid",
    "jitter_boxes",
    "masked_group_norm",
    "merge_reference_boxes",
    "sine_position_embedding",
]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box MLP)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor) -> Tensor:
    """``norm`` (a ``GroupNorm``) of ``x [B, C, H, W]`` with its statistics taken over the cells
    where ``valid [B, H, W]`` is True only, and zeros elsewhere: an image padded onto a larger
    grid is normalised exactly as it is alone (padding must not shift the statistics)."""
    b, c, h, w = x.shape
    g = norm.num_groups
    xs = x.float().reshape(b, g, c // g, h * w)
    v = valid.reshape(b, 1, 1, h * w).to(xs.dtype)
    n = v.sum(-1, keepdim=True).clamp(min=1) * (c // g)
    mean = (xs * v).sum((-2, -1), keepdim=True) / n
    var = (((xs - mean) * v) ** 2).sum((-2, -1), keepdim=True) / n
    y = ((xs - mean) / torch.sqrt(var + norm.eps)).reshape(b, c, h, w).to(x.dtype)
    if norm.affine:
        y = y * norm.weight[:, None, None] + norm.bias[:, None, None]
    return y * valid[:, None].to(y.dtype)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) clamped away from 0 and 1 so refinement deltas stay finite."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def jitter_boxes(boxes: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """DN-DETR-style noise on reference boxes ``[N, 4]`` (cxcywh in [0, 1]) for training a
    refinement: centres move by up to ``± scale / 2`` of the size, sizes are multiplied by
    ``1 ± scale``; the result is clamped to the image. NaN rows stay NaN. ``scale = 0`` returns
    ``boxes`` unchanged."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if scale == 0 or boxes.numel() == 0:
        return boxes
    u = torch.rand(boxes.shape, generator=generator, dtype=torch.float32)
    u = (2 * u - 1).to(device=boxes.device, dtype=boxes.dtype)  # [-1, 1)
    wh = boxes[:, 2:]
    centre = boxes[:, :2] + u[:, :2] * wh * (scale / 2)
    size = wh * (1 + u[:, 2:] * scale)
    return torch.cat([centre, size], dim=1).clamp(0.0, 1.0)


def merge_reference_boxes(
    guess: Tensor, reference_boxes: Tensor | None, *, noise: float = 0.0, training: bool = False
) -> Tensor:
    """The reference box of each object ``[N, 4]``: the given ``reference_boxes`` where a row is
    not NaN (jittered by :func:`jitter_boxes` with scale ``noise`` when ``training``), else the
    head's own ``guess``."""
    if reference_boxes is None:
        return guess
    if reference_boxes.shape != guess.shape:
        raise ValueError(
            f"reference_boxes must be [{guess.shape[0]}, 4] (one per object), got "
            f"{list(reference_boxes.shape)}"
        )
    given = reference_boxes.to(guess)
    if training:
        given = jitter_boxes(given, noise)
    return torch.where(given.isnan(), guess, given)


def sine_position_embedding(
    height: int,
    width: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    valid: Tensor | None = None,
) -> Tensor:
    """2-D sine-cosine position embedding of an ``height x width`` grid, ``Tensor[dim, H, W]``.

    DETR's ``PositionEmbeddingSine(normalize=True)``: half of the channels encode y, half x,
    from normalised cell centres, so grids of different sizes share one coordinate frame.

    ``valid (Tensor[B, 2], int64)``: per image the ``(rows, cols)`` that are not padding (the
    image sits top-left of the padded grid); cell centres are then normalised by each image's
    own extent, so a padded image gets the positions it has unpadded. Returns
    ``Tensor[B, dim, H, W]`` in that case.
    """
    if dim % 4:
        raise ValueError(f"position embedding dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    freq = temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    if valid is None:
        y = (rows / height)[None]  # 1 x H
        x = (cols / width)[None]  # 1 x W
    else:
        extent = valid.to(device=device, dtype=torch.float32).clamp(min=1)
        y = rows[None] / extent[:, :1]  # B x H
        x = cols[None] / extent[:, 1:]  # B x W
    py = y[..., None] * (2 * math.pi) / freq  # b x H x dim/4
    px = x[..., None] * (2 * math.pi) / freq  # b x W x dim/4
    py = torch.cat([py.sin(), py.cos()], dim=-1)  # b x H x dim/2
    px = torch.cat([px.sin(), px.cos()], dim=-1)  # b x W x dim/2
    b = py.shape[0]
    pos = torch.cat(
        [
            py[:, :, None, :].expand(b, height, width, -1),
            px[:, None, :, :].expand(b, height, width, -1),
        ],
        dim=-1,
    )  # b x H x W x dim
    pos = rearrange(pos, "b h w c -> b c h w").to(dtype)
    return pos[0] if valid is None else pos
