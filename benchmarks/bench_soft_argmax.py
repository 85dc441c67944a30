"""trp.ops.soft_argmax vs the eager softmax expectation over H·W.

python benchmarks/bench_soft_argmax.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import reference, soft_argmax

OP = "soft_argmax"
BETA = 2.0


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "K": 17, "H": 64, "W": 64}]
    return [{"B": 32, "K": 17, "H": s, "W": s} for s in (64, 128)]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    heatmaps = torch.randn(case["B"], case["K"], case["H"], case["W"], generator=gen)
    return {"heatmaps": heatmaps.requires_grad_(mode == "forward+backward")}


def eager(heatmaps: torch.Tensor) -> torch.Tensor:
    return reference.soft_argmax(heatmaps, BETA)


def fused(heatmaps: torch.Tensor) -> torch.Tensor:
    return soft_argmax(heatmaps, beta=BETA)


SIDES = {"eager": eager, "fused": fused}


def check(case: dict) -> float:
    x = make_inputs(case, "forward")["heatmaps"]
    return float((eager(x) - fused(x)).abs().max())


if __name__ == "__main__":
    _harness.main(__file__)
