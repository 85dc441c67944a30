"""Soft-argmax of heatmaps (``torch.ops.trp.soft_argmax``), differentiable.

``coords[b, k] = Σ_ij softmax(beta · heatmaps[b, k])_ij · ((j + 0.5) / W, (i + 0.5) / H)``: the
expected pixel centre under the softmax, as (x, y) in normalised [0, 1] coordinates. The fused
kernel makes one online-softmax pass per (b, k) and keeps only the inputs, the outputs and the
logsumexp [B, K] for the backward, which recomputes the probabilities on the fly; the eager
reference materialises the [B, K, H, W] probabilities (twice, with autograd).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import autocast_active, check_floating, fp32_inputs, reference_autocast

__all__ = ["SoftArgmax", "soft_argmax"]


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    return float(beta)


def soft_argmax(heatmaps: Tensor, *, beta: float = 1.0) -> Tensor:
    """Expected (x, y) location of each heatmap under ``softmax(beta · heatmap)``.

    Args:
        heatmaps (Tensor[B, K, H, W]): logits of K keypoints per image, H, W >= 1.
        beta (float): inverse temperature; larger is closer to the hard argmax.
    Returns:
        Tensor[B, K, 2]: (x, y) in [0, 1], pixel (i, j) at ((j + 0.5) / W, (i + 0.5) / H), in the
        dtype of ``heatmaps`` (float32 under autocast). float16/bfloat16 heatmaps are
        accumulated in float32 and the statistics the backward reads are kept in float32.
    """
    check_floating(heatmaps, "heatmaps")
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must have shape [B, K, H, W], got {list(heatmaps.shape)}")
    if heatmaps.shape[2] == 0 or heatmaps.shape[3] == 0:
        raise ValueError(f"heatmaps must have a non-empty H x W grid, got {list(heatmaps.shape)}")
    beta = _check_beta(beta)
    if should_use_fused(heatmaps):
        coords = torch.ops.trp.soft_argmax(heatmaps, beta)[0]  # float32 for half inputs
        return coords if autocast_active(heatmaps) else coords.to(heatmaps.dtype)
    with reference_autocast(heatmaps.device) as active:
        if active:
            (heatmaps,) = fp32_inputs(heatmaps)
        return reference.soft_argmax(heatmaps, beta)


class SoftArgmax(nn.Module):
    """Module form of :func:`soft_argmax` holding ``beta``."""

    def __init__(self, *, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = _check_beta(beta)

    def forward(self, heatmaps: Tensor) -> Tensor:
        return soft_argmax(heatmaps, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type, in which coords and logsumexp are returned."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _register() -> None:
    @torch.library.register_fake("trp::soft_argmax")
    def _(heatmaps, beta):
        check_floating(heatmaps, "heatmaps")
        if heatmaps.dim() != 4:
            raise ValueError(f"heatmaps must be 4-D, got shape {list(heatmaps.shape)}")
        b, k = heatmaps.shape[:2]
        dtype = _stats_dtype(heatmaps.dtype)
        return heatmaps.new_empty((b, k, 2), dtype=dtype), heatmaps.new_empty((b, k), dtype=dtype)

    @torch.library.register_fake("trp::soft_argmax_backward")
    def _(grad_coords, grad_lse, heatmaps, coords, lse, beta):
        return torch.empty_like(heatmaps)

    def setup_context(ctx, inputs, output) -> None:
        heatmaps, beta = inputs
        ctx.save_for_backward(heatmaps, *output)
        ctx.beta = beta

    def backward(ctx, grad_coords: Tensor | None, grad_lse: Tensor | None):
        heatmaps, coords, lse = ctx.saved_tensors
        grad_coords = torch.zeros_like(coords) if grad_coords is None else grad_coords
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad = torch.ops.trp.soft_argmax_backward(
            grad_coords, grad_lse, heatmaps, coords, lse, ctx.beta
        )
        return grad, None

    torch.library.register_autograd("trp::soft_argmax", backward, setup_context=setup_context)


if native_available():
    _register()
