"""Streaming parser: fed one token (or one text chunk) at a time during generation."""

from __future__ import annotations

from collections.abc import Iterable

from trp.grammar.errors import TRPParseError
from trp.grammar.parse import _check_legacy_unit, token_positions
from trp.grammar.scanner import ScanState, initial_state
from trp.grammar.tokenizer import TokenVocab
from trp.grammar.types import ParseResult, Triplet
from trp.grammar.units import resolve_units

__all__ = ["IncrementalParser"]


class IncrementalParser:
    """Parse an answer as it is generated.

    With ``vocab`` it is fed token ids (:meth:`feed_token`) and reports token ``positions``;
    without, it is fed text chunks (:meth:`feed`). Either way :meth:`snapshot` (any time) and
    :meth:`finish` (at the end) return exactly what :func:`~trp.grammar.parse` /
    :func:`~trp.grammar.parse_ids` return for the text fed so far, however it was chunked. In
    strict mode a feed raises :class:`TRPParseError` as soon as the text can no longer become a
    valid answer, and every later call raises the same error. ``state`` is the current
    :class:`~trp.grammar.scanner.ScanState` (an immutable value: keeping it is a checkpoint).
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        units: Iterable[str] | None = None,
        legacy_unit: str = "box",
        vocab: TokenVocab | None = None,
        allow_ref: bool = True,
        allow_vrt: bool = True,
    ) -> None:
        if vocab is not None and not isinstance(vocab, TokenVocab):
            raise TypeError(f"vocab must be a TokenVocab, got {type(vocab).__name__}")
        if not (allow_ref or allow_vrt):
            raise ValueError("at least one of allow_ref / allow_vrt must be True")
        self.vocab = vocab
        self.state: ScanState = initial_state(
            strict=bool(strict),
            units=resolve_units(units),
            legacy_unit=_check_legacy_unit(legacy_unit),
            latin1=vocab is not None,
            allow_ref=allow_ref,
            allow_vrt=allow_vrt,
        )
        self.starts: list[int] = []
        self.error: TRPParseError | None = None
        self.done = False

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.done:
            raise RuntimeError("the parser is finished")

    def _feed(self, chunk: str) -> None:
        self._check()
        try:
            self.state = self.state.feed(chunk)
        except TRPParseError as err:
            self.error = err
            if self.vocab is not None:
                self.error = TRPParseError(
                    err.offset, err.expected, err.found, self._position(err.offset)
                )
            raise self.error from None

    def _position(self, offset: int) -> int:
        return max(token_positions((((offset,),),), self.starts)[0][0][0], 0)

    def copy(self) -> IncrementalParser:
        """An independent parser in the same state (for beam search and probing)."""
        new = IncrementalParser.__new__(IncrementalParser)
        new.vocab = self.vocab
        new.state = self.state  # an immutable value: sharing it is copying it
        new.starts = list(self.starts)
        new.error = self.error
        new.done = self.done
        return new

    def feed(self, text: str) -> None:
        """Append a text chunk (text mode only)."""
        if self.vocab is not None:
            raise TypeError("this parser reads token ids; use feed_token / feed_ids")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self._feed(text)

    def feed_token(self, token_id: int) -> None:
        """Append one token id (token mode only)."""
        if self.vocab is None:
            raise TypeError("this parser reads text; pass vocab= to read token ids")
        piece = self.vocab.piece(int(token_id))
        self.starts.append(len(self.state.text))
        self._feed(piece)

    def feed_ids(self, ids: Iterable[int]) -> None:
        """Append token ids one by one."""
        for i in ids:
            self.feed_token(i)

    @property
    def triplets(self) -> tuple[Triplet, ...]:
        """The triplets completed so far."""
        return self.state.out.triplets

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete valid (strict) answer."""
        return self.error is None and self.state.accepting

    def _result(self) -> ParseResult:
        try:
            final = self.state.finish()
        except TRPParseError as err:
            if self.vocab is None:
                raise
            raise TRPParseError(
                err.offset, err.expected, err.found, self._position(err.offset)
            ) from None
        positions = None
        if self.vocab is not None:
            positions = token_positions(final.out.offsets, self.starts)
        return final.result(positions)

    def snapshot(self) -> ParseResult:
        """Parse of the text so far as if it ended here; the parser can keep going."""
        self._check()
        return self._result()

    def finish(self) -> ParseResult:
        """Parse of the whole text; the parser cannot be fed afterwards."""
        self._check()
        self.done = True
        return self._result()
