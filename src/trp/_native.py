"""Loading of the native extension ``trp._C`` and the global fused/reference switch.

The switch follows timm's ``set_fused_attn``: a process-wide setting, overridable by the
environment (``TRP_FUSED=0`` forces the eager references everywhere) and scoped by
:func:`use_fused`. When ``trp._C`` is missing (a pure-Python install) every op falls back to its
reference in ``trp.ops.reference`` after one warning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

_LOAD_ERROR: Exception | None = None
try:
    from trp import _C  # noqa: F401  (registers torch.ops.trp.*)
except ImportError as exc:  # a source tree without a build, or a pure-Python install
    _LOAD_ERROR = exc

_fused_override: bool | None = None
_warned = False


def native_available() -> bool:
    """True when ``trp._C`` loaded, i.e. ``torch.ops.trp.*`` exist."""
    return _LOAD_ERROR is None


def cuda_kernels_available() -> bool:
    """True when ``trp._C`` was built with its CUDA kernels."""
    return native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "trp::box_iou", "CUDA"
    )


def cpu_capability() -> str | None:
    """The instruction set of the CPU kernels in use: ``"DEFAULT"``, ``"AVX2"`` or ``"AVX512"``.

    Chosen once when ``trp._C`` loads: the best one built that this CPU runs, never above
    ATen's own choice, so ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` lowers it as it lowers
    torch's kernels. ``None`` without ``trp._C``.
    """
    return torch.ops.trp_cpu.capability() if native_available() else None


def _env_fused() -> bool:
    value = os.environ.get("TRP_FUSED", "1").strip().lower()
    if value not in {"0", "1", "true", "false"}:
        raise ValueError(f"TRP_FUSED must be 0 or 1, got {value!r}")
    return value in {"1", "true"}


def fused_enabled() -> bool:
    """Whether fused kernels are requested (they still need ``trp._C`` to run)."""
    return _env_fused() if _fused_override is None else _fused_override


def set_fused(enabled: bool | None) -> None:
    """Force fused kernels on/off for the process; ``None`` returns control to ``TRP_FUSED``."""
    global _fused_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_fused expects a bool or None, got {type(enabled).__name__}")
    _fused_override = enabled


@contextlib.contextmanager
def use_fused(enabled: bool) -> Iterator[None]:
    """Context manager scoping :func:`set_fused`."""
    previous = _fused_override
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)


def should_use_fused(*tensors: torch.Tensor) -> bool:
    """Decide, per call, between the fused op and its eager reference.

    Fused runs when requested, ``trp._C`` is loaded and it has a kernel for the inputs' device.
    """
    global _warned
    if not fused_enabled():
        return False
    if not native_available():
        if not _warned:
            warnings.warn(
                f"trp._C is not available ({_LOAD_ERROR}); trp.ops fall back to their eager "
                "references. Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        return False
    device = tensors[0].device.type if tensors else "cpu"
    if device == "cuda":
        return cuda_kernels_available()
    return device == "cpu"
