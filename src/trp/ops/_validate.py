"""Input checks shared by the Python entry points of ``trp.ops``.

The C++ ops check the same preconditions with ``TORCH_CHECK``; checking here too gives the eager
fallback (no ``trp._C``, or ``TRP_FUSED=0``) the same clear errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_floating(t: object, name: str) -> Tensor:
    t = check_tensor(t, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_boxes(t: object, name: str) -> Tensor:
    """``t`` must be a float ``Tensor[N, 4]``."""
    t = check_floating(t, name)
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {list(t.shape)}")
    return t


def check_same(tensors: dict[str, Tensor], *, dtype: bool = True) -> None:
    """All tensors on one device (and of one dtype when ``dtype``).

    Under autocast, float tensors of different dtypes pass: the ops' Autocast kernels (and
    :func:`call_reference`) cast float16/bfloat16 inputs to float32 first.
    """
    names = list(tensors)
    first = tensors[names[0]]
    if dtype and autocast_active(first):
        dtype = not all(t.is_floating_point() for t in tensors.values())
    for name in names[1:]:
        t = tensors[name]
        if t.device != first.device:
            raise ValueError(
                f"{names[0]} and {name} must be on the same device, got {first.device} and "
                f"{t.device}"
            )
        if dtype and t.dtype != first.dtype:
            raise TypeError(
                f"{names[0]} and {name} must have the same dtype, got {first.dtype} and {t.dtype}"
            )


def check_offsets(offsets: object, num_blocks: int, total: int, name: str) -> Tensor:
    """``offsets``: int64 ``[num_blocks + 1]``, from 0, non-decreasing, ending at ``total``."""
    offsets = check_tensor(offsets, name)
    if offsets.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != num_blocks + 1:
        raise ValueError(f"{name} must have shape [{num_blocks + 1}], got {list(offsets.shape)}")
    host = offsets.tolist()
    if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at {total}, got {host}"
        )
    return offsets


def autocast_active(t: Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type.

    The fused ops then compute in float32: their Autocast kernels (``csrc/ops.cpp``) cast every
    float16/bfloat16 input to float32, so inputs of mixed float dtypes are accepted (a bfloat16
    ``value`` from an autocast linear next to float32 sampling locations) and the outputs are
    float32, except where noted per op.
    """
    return torch.is_autocast_enabled(t.device.type)


def _to_fp32(t: object) -> object:
    if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


@contextlib.contextmanager
def reference_autocast(device: torch.device) -> Iterator[bool]:
    """Runs an eager reference under the same contract as the Autocast kernels.

    Yields whether autocast was on; inside, autocast is off, so the reference (which has no
    dispatcher kernel of its own) computes in the float32 its inputs are cast to with
    :func:`fp32_inputs`.
    """
    active = torch.is_autocast_enabled(device.type)
    if not active:
        yield False
        return
    with torch.autocast(device.type, enabled=False):
        yield True


def fp32_inputs(*tensors: object) -> tuple:
    """float16/bfloat16 tensors cast to float32, the rest unchanged (the Autocast kernels' rule)."""
    return tuple(_to_fp32(t) for t in tensors)


def float_dtype(t: Tensor) -> torch.dtype:
    """The dtype the ops compute in for ``t``: float32 for a half tensor under autocast.

    For the auxiliary inputs an API converts to its main input's dtype (areas, sigmas, target
    masks): converting them to bfloat16 first would round them before the float32 math.
    """
    if autocast_active(t) and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def call_reference(fn, *args, cast_back: Tensor | None = None):
    """``fn(*args)`` (an eager reference) under the Autocast kernels' contract: when autocast is
    on for the first tensor's device, float16/bfloat16 tensors go in as float32 with autocast off,
    and the output stays float32 (or takes ``cast_back``'s dtype, as ms_deform_attn does)."""
    first = next(a for a in args if isinstance(a, Tensor))
    with reference_autocast(first.device) as active:
        if not active:
            return fn(*args)
        out = fn(*fp32_inputs(*args))
    return out.to(cast_back.dtype) if cast_back is not None else out


def check_values_here(t: Tensor, fused: bool) -> bool:
    """Whether the Python API should make the checks that read tensor values.

    The C++ ops make the same checks; on CUDA inputs a Python check would add a host sync per
    call, so the fused CUDA path leaves them to the op. CPU inputs and the reference path keep
    them (no sync there, and the messages of the reference path stay the same).
    """
    return not (fused and t.device.type == "cuda")
