"""Batch parsing of TRP answers from strings and from token ids."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from trp.grammar.errors import TRPParseError
from trp.grammar.scanner import initial_state
from trp.grammar.types import ParseResult
from trp.grammar.units import resolve_units

if TYPE_CHECKING:
    from trp.grammar.tokenizer import TokenVocab

__all__ = ["parse", "parse_ids"]


def _check_legacy_unit(legacy_unit: object) -> str:
    if not isinstance(legacy_unit, str) or not legacy_unit:
        raise ValueError(f"legacy_unit must be a non-empty str, got {legacy_unit!r}")
    return legacy_unit


def parse(
    text: str,
    *,
    strict: bool = True,
    units: Iterable[str] | None = None,
    legacy_unit: str = "box",
) -> ParseResult:
    """Parse a TRP answer string.

    Args:
        text: the answer; VRTs are written ``<|VRT_k|>``.
        strict: raise :class:`TRPParseError` on anything but the canonical grammar
            (docs/grammar.md); otherwise accept legacy forms and repair what can be repaired,
            reporting each in ``diagnostics``. Lenient parsing never raises on malformed text.
        units: unit names ``<Unit>`` accepts (default: the registry).
        legacy_unit: unit given to PaDT-style VRT groups outside triplets (lenient).

    Returns:
        a :class:`ParseResult` with character ``offsets`` of every target token.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    state = initial_state(
        strict=bool(strict), units=resolve_units(units), legacy_unit=_check_legacy_unit(legacy_unit)
    )
    return state.finish_result(text)


def token_positions(
    offsets: tuple[tuple[tuple[int, ...], ...], ...], starts: Sequence[int]
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Map character offsets of target tokens to token indices (``starts[i]``: token i's start)."""
    return tuple(
        tuple(tuple(bisect_right(starts, o) - 1 for o in target) for target in triplet)
        for triplet in offsets
    )


def parse_ids(
    ids: Sequence[int] | Iterable[int],
    *,
    vocab: TokenVocab,
    strict: bool = True,
    units: Iterable[str] | None = None,
    legacy_unit: str = "box",
) -> ParseResult:
    """Parse a TRP answer given as token ids (a list, or a 1-D tensor).

    Ids ``>= vocab.vrt_base`` are VRTs (local patch index ``id - vrt_base``). ``positions`` of the
    result holds the token index of every target token (the ``<REF>`` token, or each VRT of a
    run). A :class:`TRPParseError` carries the token index in ``position``. Other arguments as
    in :func:`parse`.
    """
    if hasattr(ids, "dim"):
        if ids.dim() != 1:  # type: ignore[union-attr]
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")  # type: ignore[union-attr]
        ids = ids.tolist()  # type: ignore[union-attr]
    text, starts = vocab.render(ids)
    state = initial_state(
        strict=bool(strict),
        units=resolve_units(units),
        legacy_unit=_check_legacy_unit(legacy_unit),
        latin1=True,
    )
    try:
        return state.finish_result(text, lambda offsets: token_positions(offsets, starts))
    except TRPParseError as err:
        raise TRPParseError(
            err.offset, err.expected, err.found, max(bisect_right(starts, err.offset) - 1, 0)
        ) from None
