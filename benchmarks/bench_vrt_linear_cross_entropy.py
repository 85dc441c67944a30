"""trp.ops.vrt_linear_cross_entropy vs the eager bound-vocabulary loss (PaDT's way: the full
``h @ cat(W, P).T`` logits, other samples' patches masked, then ``F.cross_entropy``).

    python benchmarks/bench_vrt_linear_cross_entropy.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import vrt_linear_cross_entropy

OP = "vrt_linear_cross_entropy"
MODES = ("forward+backward",)
SAMPLES, PATCHES = 4, 256  # 4 samples of 256 merged patches (a 16 x 16 grid each)


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"T": 512, "V": 32768, "D": 512}]
    return [{"T": 2048, "V": v, "D": d} for v in (32768, 151936) for d in (512, 1024)]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    t, v, d = case["T"], case["V"], case["D"]
    grad = mode == "forward+backward"
    offsets = torch.arange(SAMPLES + 1) * PATCHES
    sample = torch.arange(t) * SAMPLES // t  # tokens sample-major, like a flattened batch
    labels = torch.randint(0, v, (t,), generator=gen)
    vrt = torch.rand(t, generator=gen) < 0.1
    labels[vrt] = v + torch.randint(0, PATCHES, (int(vrt.sum()),), generator=gen)
    labels[torch.rand(t, generator=gen) < 0.3] = -100  # prompt tokens
    global_labels = torch.where(labels >= v, labels + offsets[sample], labels)
    return {
        "hidden": (torch.randn(t, d, generator=gen) * 0.5).requires_grad_(grad),
        "text_weight": (torch.randn(v, d, generator=gen) * 0.02).requires_grad_(grad),
        "prototypes": (torch.randn(SAMPLES * PATCHES, d, generator=gen) * 0.02).requires_grad_(
            grad
        ),
        "sample_index": sample,
        "proto_offsets": offsets,
        "labels": labels,
        "global_labels": global_labels,
    }


def eager(hidden, text_weight, prototypes, sample_index, proto_offsets, labels, global_labels):
    vocab = text_weight.shape[0]
    logits = hidden @ torch.cat([text_weight, prototypes]).T  # T x (V + ΣP)
    patch_sample = torch.repeat_interleave(
        torch.arange(proto_offsets.numel() - 1), proto_offsets[1:] - proto_offsets[:-1]
    )
    other = sample_index[:, None] != patch_sample[None, :]  # T x ΣP
    logits = torch.cat([logits[:, :vocab], logits[:, vocab:].masked_fill(other, float("-inf"))], 1)
    return F.cross_entropy(logits, global_labels, ignore_index=-100)


def fused(hidden, text_weight, prototypes, sample_index, proto_offsets, labels, global_labels):
    return vrt_linear_cross_entropy(
        hidden, text_weight, prototypes, sample_index, proto_offsets, labels
    )


SIDES = {"eager": eager, "fused": fused}


def check(case: dict) -> float:
    inputs = make_inputs(case, "forward")
    with torch.no_grad():
        return float((eager(**inputs) - fused(**inputs)).abs())


if __name__ == "__main__":
    _harness.main(__file__)
