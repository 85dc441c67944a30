"""The exception strict parsing raises."""

from __future__ import annotations

__all__ = ["TRPParseError"]


class TRPParseError(ValueError):
    """Malformed TRP text.

    ``offset`` is the character offset (into the parsed string, or into the text the token ids
    decode to) where the text stops being a prefix of any valid answer; ``expected`` says what
    would have been accepted there and ``found`` what was there instead (``"end of input"`` at the
    end). For token-id input ``position`` is the index of the token holding that character
    (``None`` for string input). Subclasses ``ValueError`` so callers that treat bad text as bad
    input catch it too.
    """

    def __init__(self, offset: int, expected: str, found: str, position: int | None = None) -> None:
        self.offset = offset
        self.expected = expected
        self.found = found
        self.position = position
        where = f"offset {offset}" if position is None else f"offset {offset} (token {position})"
        super().__init__(f"at {where}: expected {expected}, found {found}")
