"""trp.ops.oks vs a DETR-style dense OKS over [B·Q, ΣG] that is then split per image.

python benchmarks/bench_oks_cost.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import COCO_KEYPOINT_SIGMAS, oks

OP = "oks_cost"
MODES = ("forward",)  # matching costs are never differentiated
TARGETS_PER_IMAGE = 20
K = 17


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "Q": 100}]
    return [{"B": 32, "Q": q} for q in (100, 300)]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, q = case["B"], case["Q"]
    g = b * TARGETS_PER_IMAGE
    return {
        "pred_keypoints": torch.rand(b, q, K, 2, generator=gen) * 640,
        "tgt_keypoints": torch.rand(g, K, 2, generator=gen) * 640,
        "tgt_visibility": torch.randint(0, 3, (g, K), generator=gen).float(),
        "tgt_areas": torch.rand(g, generator=gen) * 10000 + 100,
        "tgt_offsets": torch.arange(b + 1) * TARGETS_PER_IMAGE,
    }


def dense_eager(pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, tgt_offsets):
    """OKS of every prediction of the batch against every target, then the diagonal blocks."""
    bs, nq = pred_keypoints.shape[:2]
    variances = (2 * torch.tensor(COCO_KEYPOINT_SIGMAS)) ** 2
    pred = pred_keypoints.flatten(0, 1)  # B·Q x K x 2
    d2 = ((pred[:, None] - tgt_keypoints[None]) ** 2).sum(-1)  # B·Q x ΣG x K
    e = d2 / variances / (tgt_areas[None, :, None] + 2.220446049250313e-16) / 2
    visible = tgt_visibility > 0
    values = (torch.exp(-e) * visible).sum(-1) / visible.sum(-1).clamp(min=1)
    sizes = (tgt_offsets[1:] - tgt_offsets[:-1]).tolist()
    values = values.view(bs, nq, -1)
    return [v[i] for i, v in enumerate(values.split(sizes, -1))]


def fused(pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, tgt_offsets):
    return oks(pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, tgt_offsets).costs


SIDES = {"eager": dense_eager, "fused": fused}


def check(case: dict) -> float:
    inputs = make_inputs(case, "forward")
    return max(
        float((a - b).abs().max()) for a, b in zip(dense_eager(**inputs), oks(**inputs).blocks())
    )


if __name__ == "__main__":
    _harness.main(__file__)
