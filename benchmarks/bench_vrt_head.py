"""Per-token decode latency of trp.vrt.VRTHead vs the concatenated-table LM head (PaDT's way:
``h @ cat(W_text, P_batch).T`` then mask other samples' patches, rebuilt at every step), and vs
the plain text LM head (``vs text_head`` < 1: VRTHead is slower than text-only decoding).

    python benchmarks/bench_vrt_head.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.vrt import ImageBinding, VRTHead

OP = "vrt_head"
MODES = ("forward",)  # one decoding step
# fused and text_head differ by a few percent: time them in turn for longer.
MIN_RUN_TIME = 8.0


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"B": b, "V": 32768, "D": 512, "P": 256} for b in (1, 8)]
    return [{"B": b, "V": 151936, "D": 2048, "P": 1024} for b in (1, 8)]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, v, d, p = case["B"], case["V"], case["D"], case["P"]
    side = int(p**0.5)
    lm_head = nn.Linear(d, v, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(v, d, generator=gen) * 0.02)
    binding = ImageBinding.from_grids([[side, p // side]] * b, [1] * b, vrt_base=v)
    return {
        "hidden": torch.randn(b, 1, d, generator=gen),  # one new token per sample
        "prototypes": torch.randn(b * p, d, generator=gen) * 0.02,
        "head": VRTHead(text_head=lm_head),
        "binding": binding,
    }


def concatenated(hidden, prototypes, head, binding):
    table = torch.cat([head.weight, prototypes])  # (V + ΣP) x D, every step
    logits = hidden @ table.T  # B x 1 x (V + ΣP)
    vocab = head.vrt_base
    patch_sample = torch.repeat_interleave(
        torch.arange(binding.num_samples), binding.patches_per_sample
    )
    other = torch.arange(binding.num_samples)[:, None] != patch_sample[None, :]  # B x ΣP
    logits[..., vocab:] = logits[..., vocab:].masked_fill(other[:, None, :], float("-inf"))
    return logits


def vrt_head(hidden, prototypes, head, binding):
    return head(hidden, prototypes=prototypes, binding=binding)


def text_head(hidden, prototypes, head, binding):
    """The plain LM head over the text vocabulary only: what a step costs without VRTs."""
    return head.text_logits(hidden)


SIDES = {"eager": concatenated, "fused": vrt_head, "text_head": text_head}


def check(case: dict) -> float:
    inputs = make_inputs(case, "forward")
    with torch.no_grad():
        full, own = concatenated(**inputs), vrt_head(**inputs)
    binding, vocab = inputs["binding"], inputs["head"].vrt_base
    err = float((full[..., :vocab] - own[..., :vocab]).abs().max())
    for s in range(binding.num_samples):
        lo, hi = int(binding.sample_offsets[s]), int(binding.sample_offsets[s + 1])
        err = max(
            err,
            float(
                (full[s, :, vocab + lo : vocab + hi] - own[s, :, vocab : vocab + hi - lo])
                .abs()
                .max()
            ),
        )
    return err


if __name__ == "__main__":
    _harness.main(__file__)
