"""trp: composable layers for unified visual decoding in multimodal LLMs.

Two mechanisms, one library: the triplet-based referring paradigm (``trp.grammar``) and visual
reference tokens bound per image (``trp.vrt``), decoded by the heads of ``trp.heads`` whose hot
paths are the fused ops of ``trp.ops`` (a C++/CUDA extension, ``trp._C``, with eager fallbacks).

``import trp`` loads ``trp.ops`` (and so ``trp._C``: ``torch.ops.trp.*`` exist, with their fake
and autograd registrations); the other subpackages load on first access so ``import trp`` stays
cheap (no transformers, no Lightning).
"""

import importlib
from typing import Any

from trp import ops  # noqa: F401  (registers torch.ops.trp.* on import)
from trp.version import __version__

_SUBPACKAGES = (
    "grammar",
    "vrt",
    "ops",
    "heads",
    "losses",
    "metrics",
    "data",
    "models",
    "recipes",
)

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"trp.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'trp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
