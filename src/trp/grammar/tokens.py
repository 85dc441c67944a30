"""TRP special tokens and the textual form of visual reference tokens (VRTs).

A VRT names one image patch. In token-id sequences a VRT is ``vrt_base + local_patch_index``
(the text vocabulary has no per-patch rows; :mod:`trp.vrt` binds them per image); in strings it
is written ``<|VRT_k|>`` with ``k`` the local patch index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "IMAGE",
    "PHRASE_CLOSE",
    "PHRASE_OPEN",
    "REF",
    "TASK_CLOSE",
    "TASK_OPEN",
    "TRP_SPECIAL_TOKENS",
    "UNIT_CLOSE",
    "UNIT_OPEN",
    "VPT",
    "parse_vrt",
    "render_vrt",
    "vrt_token",
]

TASK_OPEN = "<Task>"
TASK_CLOSE = "</Task>"
PHRASE_OPEN = "<Phrase>"
PHRASE_CLOSE = "</Phrase>"
UNIT_OPEN = "<Unit>"
UNIT_CLOSE = "</Unit>"
REF = "<REF>"
VPT = "[VPT]"
IMAGE = "<image>"

# The tags of the answer grammar; ``[VPT]`` is an input-side placeholder and ``<image>`` belongs
# to the host VLM, so neither is a grammar tag.
GRAMMAR_TAGS: tuple[str, ...] = (
    TASK_OPEN,
    TASK_CLOSE,
    PHRASE_OPEN,
    PHRASE_CLOSE,
    UNIT_OPEN,
    UNIT_CLOSE,
    REF,
)
TRP_SPECIAL_TOKENS: tuple[str, ...] = (*GRAMMAR_TAGS, VPT)

VRT_PREFIX = "<|VRT_"
VRT_PATTERN = re.compile(r"<\|VRT_(\d+)\|>")


def vrt_token(index: int) -> str:
    """``<|VRT_index|>`` for a local patch index ``index >= 0``."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"VRT index must be an int, got {type(index).__name__}")
    if index < 0:
        raise ValueError(f"VRT index must be >= 0, got {index}")
    return f"<|VRT_{index}|>"


def render_vrt(ids: Iterable[int], *, vrt_base: int = 0) -> str:
    """Render VRT token ids (``>= vrt_base``) as ``<|VRT_k|>`` text, ``k = id - vrt_base``.

    With the default ``vrt_base=0`` the ids are local patch indices.
    """
    if vrt_base < 0:
        raise ValueError(f"vrt_base must be >= 0, got {vrt_base}")
    parts = []
    for i in ids:
        i = int(i)
        if i < vrt_base:
            raise ValueError(f"id {i} is not a VRT id (vrt_base={vrt_base})")
        parts.append(f"<|VRT_{i - vrt_base}|>")
    return "".join(parts)


def parse_vrt(text: str, *, vrt_base: int = 0) -> list[int]:
    """The VRT ids written in ``text`` (``vrt_base + k`` for each ``<|VRT_k|>``), in order.

    ``text`` must consist of VRT tokens only (whitespace between them is not allowed either).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids: list[int] = []
    pos = 0
    while pos < len(text):
        m = VRT_PATTERN.match(text, pos)
        if m is None:
            raise ValueError(f"not a VRT token at offset {pos}: {text[pos : pos + 16]!r}")
        ids.append(vrt_base + int(m.group(1)))
        pos = m.end()
    return ids


def check_free_text(text: str, what: str, *, forbid: Sequence[str] = ()) -> str:
    """Reject ``text`` that would not read back as plain text (it holds a tag or a VRT)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    for tag in (*GRAMMAR_TAGS, *forbid):
        if tag in text:
            raise ValueError(f"{what} must not contain {tag!r}: {text!r}")
    if VRT_PATTERN.search(text):
        raise ValueError(f"{what} must not contain a VRT token: {text!r}")
    return text
