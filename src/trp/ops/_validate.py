"""Input checks shared by the Python entry points of ``trp.ops``.

The C++ ops check the same preconditions with ``TORCH_CHECK``; checking here too gives the eager
fallback (no ``trp._C``, or ``TRP_FUSED=0``) the same clear errors.
"""

from __future__ import annotations

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
    """All tensors on one device (and of one dtype when ``dtype``)."""
    names = list(tensors)
    first = tensors[names[0]]
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
