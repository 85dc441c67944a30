"""trp.ops.point_mask_loss vs Mask2Former's eager mask loss, summed over decoder layers.

Eager (Mask2Former): per layer, full [Q, H, W] mask logits by einsum, uncertainty-based point
selection on them, ``point_sample`` of logits and targets, sigmoid-CE + dice. Fused: the same
sampling and losses through ``trp.ops.point_mask_loss`` without the [Q, H, W] logits.

    python benchmarks/bench_point_mask_loss.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import point_mask_loss, point_mask_loss_per_query, reference, sample_points

OP = "point_mask_loss"
MODES = ("forward+backward",)  # a training loss


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"L": 1, "Q": 50, "C": 256, "B": 2, "H": 128, "W": 128, "P": 2000}]
    return [{"L": 10, "Q": 200, "C": 256, "B": 2, "H": 256, "W": 256, "P": 12544}]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, c, b, h, w = case["Q"], case["C"], case["B"], case["H"], case["W"]
    grad = mode == "forward+backward"
    # Targets at twice the feature resolution, like Mask2Former's (stride-4 features, targets
    # at a higher resolution): normalised points address both grids.
    targets = torch.rand(q, 2 * h, 2 * w, generator=gen) > 0.5
    return {
        "mask_embed": (torch.randn(case["L"], q, c, generator=gen) / c**0.5).requires_grad_(grad),
        "pixel_features": torch.randn(b, c, h, w, generator=gen).requires_grad_(grad),
        "image_index": torch.arange(q) % b,
        "target_masks": targets.float(),
        "num_points": torch.tensor(case["P"]),
    }


def eager(mask_embed, pixel_features, image_index, target_masks, num_points) -> torch.Tensor:
    """Mask2Former's loss_masks (with get_uncertain_point_coords_with_randomness) per layer."""
    gen = torch.Generator().manual_seed(0)
    p = int(num_points)
    q = mask_embed.shape[1]
    total = mask_embed.new_zeros(())
    for embed in mask_embed:  # one decoder layer at a time
        logits = reference.mask_logits(embed, pixel_features, image_index)  # Q x H x W
        with torch.no_grad():
            candidates = torch.rand(q, 3 * p, 2, generator=gen)
            uncertainty = -reference.point_sample(logits, candidates).abs()
            keep = torch.topk(uncertainty, k=int(0.75 * p), dim=1).indices
            points = torch.cat(
                [
                    torch.gather(candidates, 1, keep[:, :, None].expand(-1, -1, 2)),
                    torch.rand(q, p - int(0.75 * p), 2, generator=gen),
                ],
                dim=1,
            )
            labels = reference.point_sample(target_masks, points)
        losses = reference.point_losses(reference.point_sample(logits, points), labels)
        total = total + losses.sum() / q
    return total


def fused(mask_embed, pixel_features, image_index, target_masks, num_points) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    total = mask_embed.new_zeros(())
    for embed in mask_embed:
        losses = point_mask_loss(
            embed,
            pixel_features,
            image_index,
            target_masks,
            num_points=int(num_points),
            generator=gen,
        )
        total = total + losses["loss_mask"] + losses["loss_dice"]
    return total


SIDES = {"eager": eager, "fused": fused}


def check(case: dict) -> float:
    """Max abs difference of the per-query losses of one layer at the same points."""
    x = make_inputs(case, "forward")
    args = (x["mask_embed"][0], x["pixel_features"], x["image_index"])
    points = sample_points(*args, num_points=case["P"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = point_mask_loss_per_query(*args, x["target_masks"], points)
        ref = reference.point_mask_loss(*args, x["target_masks"], points)
    return float((ours - ref).abs().max())


if __name__ == "__main__":
    _harness.main(__file__)
