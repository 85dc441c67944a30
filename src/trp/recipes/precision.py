"""``trainer.precision: auto``: bf16 autocast where bf16 matmuls are measured to be faster.

Whether bf16 pays on a CPU is not a flag in ``/proc/cpuinfo``: an AMX CPU runs it several times
faster than fp32, one AMD EPYC with AVX512-BF16 twice as fast (0.29 vs 0.59 s per step of the
default recipe), an earlier AVX512-BF16 CPU without AMX slower (1.09 vs 0.85 s, measured with
``sdpa`` attention). So ``auto`` times the LM's typical matmul both ways on the threads the run
will use (~0.1 s) and keeps the faster one. The choice is published in ``TRP_AUTO_PRECISION``:
the processes Lightning launches for DDP inherit it, so every rank trains in the same precision
instead of each timing (and possibly deciding) on its own.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["PRECISIONS", "cpu_bf16_speedup", "resolve_precision"]

# "auto" is trp's, not Lightning's (see resolve_precision); the rest go to Lightning as given.
PRECISIONS: tuple[str, ...] = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed")

# bf16 autocast also pays for casts and runs the losses in fp32: ask for a clear margin.
MIN_BF16_SPEEDUP = 1.25
# Where the CPU decision of "auto" is kept for the rest of the run and its child processes.
AUTO_PRECISION_ENV = "TRP_AUTO_PRECISION"


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_bf16_speedup(
    *, rows: int = 2048, dim: int = 192, hidden: int = 768, repeats: int = 5
) -> float:
    """fp32 time / bf16 time of ``[rows, dim] @ [dim, hidden]`` on this CPU (the best of
    ``repeats`` runs each, after a warm-up): above 1, bf16 is faster."""
    if min(rows, dim, hidden, repeats) < 1:
        raise ValueError("rows, dim, hidden and repeats must be positive")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=generator)
    b = torch.randn(dim, hidden, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    torch.mm(a, b), torch.mm(a16, b16)
    return _best_time(a, b, repeats) / _best_time(a16, b16, repeats)


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision of ``trainer.precision``: ``"auto"`` is ``bf16-mixed`` on a GPU,
    and on a CPU when :func:`cpu_bf16_speedup` is at least ``MIN_BF16_SPEEDUP``, else
    ``32-true`` (decided once per run: a set ``TRP_AUTO_PRECISION`` is used as it is); any
    other value is returned as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda"):
        return "bf16-mixed"
    decided = os.environ.get(AUTO_PRECISION_ENV)
    if decided is None:
        decided = "bf16-mixed" if cpu_bf16_speedup() >= MIN_BF16_SPEEDUP else "32-true"
        os.environ[AUTO_PRECISION_ENV] = decided
    elif decided not in ("bf16-mixed", "32-true"):
        raise ValueError(f"{AUTO_PRECISION_ENV} must be bf16-mixed or 32-true, got {decided!r}")
    return decided
