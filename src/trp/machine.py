"""What a measurement ran on: the CPU model and the instruction sets in use.

Speeds and, through the precision a CPU makes worthwhile, training results depend on the
machine; benchmarks and training summaries record :func:`machine` with every number.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["ISA_VARIABLES", "cpu_model", "machine"]

# The environment variables that lower the instruction sets of ATen, oneDNN and MKL (and, via
# ATen's choice, trp's CPU kernels): ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2`` runs an AVX-512 machine at AVX2 speed.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


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
