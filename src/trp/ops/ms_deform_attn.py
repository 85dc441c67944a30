"""Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021) as one fused op
(``torch.ops.trp.ms_deform_attn``), differentiable in value, sampling locations and attention
weights, with the :class:`MSDeformAttn` layer around it.

Each query q of head m reads, in every level l, P bilinear samples of that head's value map at
``sampling_locations[n, q, m, l, p]`` and sums them with ``attention_weights``. The eager way
(one ``grid_sample`` per level) materialises every sample ([N·M, D, Lq, L·P]) before the sum; the
fused kernel accumulates them in registers. Unlike Deformable-DETR's and mmcv's kernels, which are
CUDA only, trp's also runs on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import (
    autocast_active,
    check_floating,
    check_same,
    check_tensor,
    check_values_here,
    fp32_inputs,
    reference_autocast,
)

__all__ = ["MSDeformAttn", "ms_deform_attn"]


def _check_metadata(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    same_dtype: bool = True,
) -> None:
    """Shapes, dtypes and devices (no data read: shared with the fake kernels)."""
    value = check_floating(value, "value")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if check_tensor(t, name).dtype != torch.int64:
            raise TypeError(f"{name} must have dtype torch.int64, got {t.dtype}")
    check_floating(sampling_locations, "sampling_locations")
    check_floating(attention_weights, "attention_weights")
    if value.dim() != 4:
        raise ValueError(f"value must be 4-D [N, S, M, D], got shape {list(value.shape)}")
    check_same(
        {
            "value": value,
            "sampling_locations": sampling_locations,
            "attention_weights": attention_weights,
        },
        dtype=same_dtype,
    )
    check_same(
        {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index},
        dtype=False,
    )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(
            f"spatial_shapes must have shape [L, 2] with L >= 1, got {list(spatial_shapes.shape)}"
        )
    num_levels = spatial_shapes.shape[0]
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must have shape [{num_levels}], got {list(level_start_index.shape)}"
        )
    n, _, m, _ = value.shape
    loc = sampling_locations
    if loc.dim() != 6 or (loc.shape[0], *loc.shape[2:4], loc.shape[5]) != (n, m, num_levels, 2):
        raise ValueError(
            f"sampling_locations must have shape [N, Lq, M, L, P, 2] = [{n}, Lq, {m}, "
            f"{num_levels}, P, 2], got {list(loc.shape)}"
        )
    expected = (n, loc.shape[1], m, num_levels, loc.shape[4])
    if attention_weights.shape != expected:
        raise ValueError(
            f"attention_weights must have shape [N, Lq, M, L, P] = {list(expected)}, got "
            f"{list(attention_weights.shape)}"
        )


def _check_levels(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> None:
    """The data-dependent checks (read on the host, as the C++ op does)."""
    total = 0
    for level, ((h, w), start) in enumerate(
        zip(spatial_shapes.tolist(), level_start_index.tolist())
    ):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes must be positive, got ({h}, {w}) at level {level}")
        if start != total:
            raise ValueError(
                f"level_start_index[{level}] must be {total} (the sum of H * W of the levels "
                f"before it), got {start}"
            )
        total += h * w
    if value.shape[1] != total:
        raise ValueError(
            f"value.shape[1] must equal sum(H * W) over levels = {total}, got {value.shape[1]}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value (Tensor[N, S, M, D]): per-head values of all levels, flattened level after level
            (S = sum of H_l * W_l).
        spatial_shapes (Tensor[L, 2], int64): (H_l, W_l) of each level.
        level_start_index (Tensor[L], int64): where level l starts in S (exclusive cumsum).
        sampling_locations (Tensor[N, Lq, M, L, P, 2]): (x, y), normalised to [0, 1] in each
            level; bilinear with align_corners=False, outside the level reads 0.
        attention_weights (Tensor[N, Lq, M, L, P]): already normalised by the caller.
    Returns:
        Tensor[N, Lq, M * D].

    CPU: float32 / float64; CUDA: also float16 / bfloat16 (accumulated in float32). Under
    autocast the three float inputs may differ in dtype (a bfloat16 ``value`` from an autocast
    linear, float32 locations): the math runs in float32 and the output takes ``value``'s dtype.
    """
    autocast = autocast_active(value)
    _check_metadata(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        same_dtype=not autocast,
    )
    fused = should_use_fused(value)
    # The level checks read spatial_shapes / level_start_index: on CUDA the C++ op makes them,
    # so the Python side adds no host sync there.
    if not torch.compiler.is_compiling() and check_values_here(value, fused):
        _check_levels(value, spatial_shapes, level_start_index)
    if fused:
        return torch.ops.trp.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    with reference_autocast(value.device) as active:
        inputs = (value, sampling_locations, attention_weights)
        v, loc, attn = fp32_inputs(*inputs) if active else inputs
        out = reference.ms_deform_attn(v, spatial_shapes, level_start_index, loc, attn)
    return out.to(value.dtype) if active else out


class MSDeformAttn(nn.Module):
    """Deformable-DETR's multi-scale deformable attention layer.

    Projects the flattened multi-level input to per-head values, predicts from each query
    ``n_points`` sampling offsets per head and level (around its reference point) and their
    softmaxed attention weights, applies :func:`ms_deform_attn` and projects the result back.
    """

    def __init__(
        self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        if min(d_model, n_levels, n_heads, n_points) < 1:
            raise ValueError("d_model, n_levels, n_heads and n_points must be positive")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation: head h starts sampling along direction 2πh/M, point p
        at distance p + 1 (in pixels of each level); uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # M x 2
        grid = grid / grid.abs().max(-1, keepdim=True).values  # onto the unit square's border
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query (Tensor[N, Lq, C]): C = d_model.
            reference_points (Tensor[N, Lq, L, 2] or Tensor[N, Lq, L, 4]): (x, y) in [0, 1], or
                cxcywh boxes, whose half width/height scales the offsets.
            input_flatten (Tensor[N, S, C]): all levels flattened, level after level.
            input_spatial_shapes (Tensor[L, 2], int64), input_level_start_index (Tensor[L],
                int64): as in :func:`ms_deform_attn`.
            input_padding_mask (Tensor[N, S], bool, optional): True at padded positions, whose
                values are zeroed.
        Returns:
            Tensor[N, Lq, C].
        """
        check_floating(query, "query")
        check_floating(input_flatten, "input_flatten")
        check_floating(reference_points, "reference_points")
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(
                f"query must have shape [N, Lq, {self.d_model}], got {list(query.shape)}"
            )
        n, lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[::2] != (n, self.d_model):
            raise ValueError(
                f"input_flatten must have shape [{n}, S, {self.d_model}], got "
                f"{list(input_flatten.shape)}"
            )
        s = input_flatten.shape[1]
        if reference_points.shape not in ((n, lq, self.n_levels, 2), (n, lq, self.n_levels, 4)):
            raise ValueError(
                f"reference_points must have shape [{n}, {lq}, {self.n_levels}, 2 or 4], got "
                f"{list(reference_points.shape)}"
            )
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must have shape [{self.n_levels}, 2], got "
                f"{list(input_spatial_shapes.shape)}"
            )

        value = self.value_proj(input_flatten)  # N x S x C
        if input_padding_mask is not None:
            if input_padding_mask.dtype != torch.bool or input_padding_mask.shape != (n, s):
                raise ValueError(
                    f"input_padding_mask must be a bool tensor of shape [{n}, {s}], got "
                    f"{input_padding_mask.dtype} {list(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)  # N x S x M x D
        offsets = self.sampling_offsets(query).view(
            n, lq, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            n, lq, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            normalizer = input_spatial_shapes.flip(-1).to(offsets.dtype)  # L x 2
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )  # N x Lq x M x L x P x 2
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights
        )  # N x Lq x C
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}"
        )


def _register() -> None:
    @torch.library.register_fake("trp::ms_deform_attn")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _check_metadata(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("trp::ms_deform_attn_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, loc, attn):
        _check_metadata(value, spatial_shapes, level_start_index, loc, attn)
        return value.new_empty(value.shape), loc.new_empty(loc.shape), attn.new_empty(attn.shape)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad: Tensor):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.trp.ms_deform_attn_backward(
            grad.contiguous(), value, shapes, starts, loc, attn
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd("trp::ms_deform_attn", backward, setup_context=setup_context)


if native_available():
    _register()
