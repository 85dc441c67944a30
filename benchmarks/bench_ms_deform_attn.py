"""trp.ops.ms_deform_attn vs Deformable-DETR's grid_sample version (ms_deform_attn_core_pytorch)
and transformers' ``MultiScaleDeformableAttention`` (its CPU path, also grid_sample based).

Deformable-DETR encoder sizes: M=8 heads, D=32 channels per head, L=4 levels, P=4 points; the
levels of a 512 x 512 image at strides 8-64 (64², 32², 16², 8²: S = 5440) and one query per
position (Lq = S). Each query samples around its own position (offsets up to ±4 pixels of each
level), as the encoder's self-attention does.

    python benchmarks/bench_ms_deform_attn.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import ms_deform_attn, reference

OP = "ms_deform_attn"
HEADS, CHANNELS, POINTS = 8, 32, 4
LEVEL_SHAPES = [(64, 64), (32, 32), (16, 16), (8, 8)]


def cases(quick: bool) -> list[dict]:
    return [{"N": n, "Lq": 5440} for n in ((1,) if quick else (1, 2))]


def _reference_points(shapes: torch.Tensor) -> torch.Tensor:
    """Normalised pixel centres of every position of every level, [S, 2] (x, y)."""
    points = []
    for h, w in shapes.tolist():
        y, x = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    n, lq = case["N"], case["Lq"]
    shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s, levels = int(areas.sum()), len(LEVEL_SHAPES)
    ref = _reference_points(shapes)[:lq]  # Lq x 2
    offsets = (torch.rand(n, lq, HEADS, levels, POINTS, 2, generator=gen) * 8 - 4) / shapes.flip(
        -1
    ).view(1, 1, 1, levels, 1, 2)
    loc = ref.view(1, lq, 1, 1, 1, 2) + offsets  # N x Lq x M x L x P x 2
    logits = torch.randn(n, lq, HEADS, levels * POINTS, generator=gen)
    attn = logits.softmax(-1).view(n, lq, HEADS, levels, POINTS)
    value = torch.randn(n, s, HEADS, CHANNELS, generator=gen)
    grad = mode == "forward+backward"
    return {
        "value": value.requires_grad_(grad),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": loc.requires_grad_(grad),
        "attention_weights": attn.requires_grad_(grad),
    }


def transformers_msda(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """transformers' MultiScaleDeformableAttention (Deformable-DETR / RT-DETR in transformers)."""
    shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
    return _TRANSFORMERS(
        value,
        spatial_shapes,
        shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        im2col_step=64,
    )


SIDES = {"eager": reference.ms_deform_attn, "fused": ms_deform_attn}
try:
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        MultiScaleDeformableAttention,
    )
except ImportError:  # transformers is optional here: the comparison is then left out
    pass
else:
    _TRANSFORMERS = MultiScaleDeformableAttention()
    SIDES["transformers"] = transformers_msda


def check(case: dict) -> float:
    inputs = make_inputs(case, "forward")
    with torch.no_grad():
        return float((ms_deform_attn(**inputs) - reference.ms_deform_attn(**inputs)).abs().max())


if __name__ == "__main__":
    _harness.main(__file__)
