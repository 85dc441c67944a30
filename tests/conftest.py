"""Shared fixtures and helpers for the trp test suite."""

from __future__ import annotations

import pytest
import torch

import trp._native as native

requires_native = pytest.mark.skipif(
    not native.native_available(), reason="trp._C is not built"
)


def random_boxes(
    n: int, *, dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Valid xyxy boxes in [0, 1.5] with strictly positive width and height."""
    xy = torch.rand(n, 2, dtype=dtype, generator=generator)
    wh = torch.rand(n, 2, dtype=dtype, generator=generator) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _small_thread_count():
    # The CI machine has 2 cores; oversubscription only makes the suite slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
