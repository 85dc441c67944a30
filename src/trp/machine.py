"""What a measurement ran on: the CPU model and the instruction sets in use.

Speeds and, through the precision a CPU makes worthwhile, training results depend on the
machine; benchmarks and training summaries record :func:`machine` with every number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["ISA_VARIABLES", "cpu_model", "keep_freed_memory", "machine"]

# The environment variables that lower the instruction sets of ATen, oneDNN and MKL (and, via
# ATen's choice, trp's CPU kernels): ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2`` runs an AVX-512 machine at AVX2 speed.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


# glibc's mallopt parameters (malloc.h) and the size below which freed blocks stay in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 1 GiB for reuse instead of handing them
    back to the kernel; returns whether it took effect (False off glibc, which is left alone).

    By default glibc serves a block of more than ~32 MiB (less early in a process) with a
    fresh ``mmap`` and unmaps it when freed, so every training step's large activations and
    gradients are new pages the kernel must fault in and zero again. On a 2-core AMD EPYC
    the demo's steps ran 6% faster with the blocks kept (steps 25-150, three interleaved
    pairs: 0.492 vs 0.524 s/step on average). The cost: the process keeps its peak heap
    instead of shrinking after it (as with the jemalloc / tcmalloc set-ups PyTorch's CPU
    performance guide recommends).
    """
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "confstr"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(name)
    except (OSError, ValueError):
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW)
    )


def cpu_model() -> str | None:
    """The CPU's model name, as ``lscpu`` gives it (``/proc/cpuinfo`` without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, Any]:
    """``cpu_model``, ``trp_cpu_capability`` (trp's CPU kernels), ``aten_cpu_capability``
    (torch's), ``isa_limits`` (the :data:`ISA_VARIABLES` set) and ``threads``."""
    from trp.ops import cpu_capability

    return {
        "cpu_model": cpu_model(),
        "trp_cpu_capability": cpu_capability(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        "threads": torch.get_num_threads(),
    }
