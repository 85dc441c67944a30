"""Modes, literals and patterns shared by the scanner and its task-block and legacy parts."""

from __future__ import annotations

import re
from functools import lru_cache

from trp.grammar.tokens import TASK_CLOSE, VRT_PREFIX

# Modes of the machine (the scanner state's ``mode``).
BODY, PHRASE, PHRASE_PLAN, OPEN_UNIT, UNIT, TARGETS, LEGACY = range(7)
TASK_HEAD, TASK_ENTRY, TASK_NAME, TASK_UNIT, TASK_NUM, TASK_LINES = range(7, 13)
TASK_MODES = frozenset((TASK_HEAD, TASK_ENTRY, TASK_NAME, TASK_UNIT, TASK_NUM))
TRIPLET_MODES = frozenset((PHRASE, PHRASE_PLAN, OPEN_UNIT, UNIT, TARGETS))
LENIENT_MODES = frozenset((LEGACY, TASK_LINES))

HEAD_TRUE = "\nUnit decode (True). Class name, target unit and number:\n"
HEAD_FALSE = "\nUnit decode (False).\n"
ENTRY_OPEN = "- Name: "
ENTRY_UNIT = " Unit: "
ENTRY_NUM = " Num: "
TASK_END = TASK_CLOSE + "\n"
OPEN_UNIT_LIT = "(<Unit>"
UNIT_END = "</Unit>"

# Longest lookahead a lenient repair needs (bounded regexes stay within it).
LOOKAHEAD = 48

TAG = re.compile(r"<(?:/?(?:Task|Phrase|Unit)>|REF>|\|VRT_(\d+)\|>)")
ANGLE_PREFIXES = (
    "<Task>",
    "</Task>",
    "<Phrase>",
    "</Phrase>",
    "<Unit>",
    "</Unit>",
    "<REF>",
    VRT_PREFIX,
)
VRT_PARTIAL = re.compile(r"<\|VRT_\d*\|?")
VRT_BROKEN = re.compile(r"<\|VRT_(?:\d+\|?)?")

# Returned by a lookahead helper when the text so far cannot decide yet.
WAIT = object()


@lru_cache(maxsize=64)
def unit_literals(units: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], frozenset]:
    """``("box</Unit>", …)``, ``("box Num: ", …)`` and the set of unit names."""
    return (
        tuple(u + UNIT_END for u in units),
        tuple(u + ENTRY_NUM for u in units),
        frozenset(units),
    )


def latin1_to_str(s: str) -> str:
    """Token-id input is scanned as latin-1 so one character is one byte (a token may end inside
    a UTF-8 sequence); text read out of it is decoded back here."""
    return s if s.isascii() else s.encode("latin-1").decode("utf-8", "replace")
