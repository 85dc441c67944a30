"""The ``<Task>`` block: strict line-by-line scanning and the lenient whole-line reading.

Each handler takes the scanner's working machine (:class:`trp.grammar.scanner.Machine`), moves
it forward and returns whether it made progress (False: it needs more text). Strict handlers
raise :class:`TRPParseError` at the first character that breaks the block; in lenient mode the
scanner then falls back to :func:`task_lines`, which reads whole lines with regexes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from trp.grammar.literals import (
    BODY,
    ENTRY_NUM,
    ENTRY_OPEN,
    ENTRY_UNIT,
    HEAD_FALSE,
    HEAD_TRUE,
    TASK_END,
    TASK_ENTRY,
    TASK_NAME,
    TASK_NUM,
    TASK_UNIT,
    WAIT,
)
from trp.grammar.tokens import TASK_CLOSE
from trp.grammar.types import TaskEntry

if TYPE_CHECKING:
    from trp.grammar.scanner import Machine

__all__ = [
    "entry_choices",
    "task_entry",
    "task_head",
    "task_lines",
    "task_name",
    "task_num",
    "task_unit",
]

_NAME_STOP = re.compile(r"[<\n ]")
_NUM = re.compile(r"[1-9]\d*")
_R_HEADER = re.compile(r"Unit decode \((True|False)\)")
_R_ENTRY = re.compile(r"-?\s*Name:\s*(.*?)\s+Unit:\s*(\S+)\s+Num:\s*(\d{1,9})\s*")
_R_TAGS = re.compile(r"</?(?:Phrase|Unit)>")


# ---------------------------------------------------------------- strict
def task_head(m: Machine, final: bool) -> bool:
    c = m.expect((HEAD_TRUE, HEAD_FALSE), final)
    if c is None:
        return False
    m.task_decode = c == HEAD_TRUE
    m.pos += len(c)
    m.line_start = m.pos
    m.mode = TASK_ENTRY
    return True


def entry_choices(m: Machine) -> tuple[str, ...]:
    """What may open the next task line: an entry, or the end of the block."""
    if not m.task_decode:
        return (TASK_END,)
    return (TASK_END, ENTRY_OPEN) if m.entries else (ENTRY_OPEN,)


def task_entry(m: Machine, final: bool) -> bool:
    c = m.expect(entry_choices(m), final)
    if c is None:
        return False
    m.pos += len(c)
    if c == ENTRY_OPEN:
        m.name_start = m.pos
        m.mode = TASK_NAME
    else:
        end_task(m, m.pos)
    return True


def end_task(m: Machine, end: int) -> None:
    m.pos = m.span_start = end
    m.mode = BODY
    if m.strict:
        # The entries become the plan the triplets must follow one to one.
        m.plan = tuple(m.entries)


def task_name(m: Machine, final: bool) -> bool:
    text = m.text
    q = m.pos
    while True:
        hit = _NAME_STOP.search(text, q)
        if hit is None:
            m.pos = len(text)
            if final:
                raise m.err(len(text), "class name text or ' Unit: '")
            return False
        i = hit.start()
        ch = text[i]
        if ch == " ":
            if text.startswith(ENTRY_UNIT, i):
                if i == m.name_start:
                    raise m.err(i, "a class name")
                m.e_name = text[m.name_start : i]
                m.pos = i + len(ENTRY_UNIT)
                m.mode = TASK_UNIT
                return True
            if not final and ENTRY_UNIT.startswith(text[i:]):
                m.pos = i
                return False
            q = i + 1
            continue
        if ch == "\n":
            m.pos = i
            raise m.err(i, "class name text or ' Unit: '")
        angle = m.angle(i, final)
        if angle is None:
            q = i + 1
            continue
        m.pos = i
        if angle is WAIT:
            return False
        raise m.err(i, "class name text or ' Unit: '")


def task_unit(m: Machine, final: bool) -> bool:
    c = m.expect(m.task_unit_choices, final)
    if c is None:
        return False
    m.e_unit = c[: -len(ENTRY_NUM)]
    m.pos += len(c)
    m.mode = TASK_NUM
    return True


def task_num(m: Machine, final: bool) -> bool:
    text, p = m.text, m.pos
    n = len(text)
    if p == n:
        if final:
            raise m.err(n, "a count >= 1")
        return False
    num = _NUM.match(text, p)
    if num is None:
        raise m.err(p, "a count >= 1")
    e = num.end()
    if e == n:
        if final:
            raise m.err(n, "a digit or '\\n'")
        return False
    if text[e] != "\n":
        raise m.err(e, "a digit or '\\n'")
    m.entries.append(TaskEntry(m.e_name, m.e_unit, int(num.group(0))))
    m.pos = m.line_start = e + 1
    m.mode = TASK_ENTRY
    return True


# ---------------------------------------------------------------- lenient
def task_lines(m: Machine, final: bool) -> bool:
    """Lenient: read the rest of the block line by line (legacy tagged names, irregular lines)."""
    text, p = m.text, m.pos
    n = len(text)
    nl = text.find("\n", p)
    line_end = n if nl < 0 else nl
    close = text.find(TASK_CLOSE, p, line_end)
    if close >= 0:
        q = close + len(TASK_CLOSE)
        if q >= n and not final:
            return False
        _task_line(m, text[p:close], p)
        if q < n and text[q] == "\n":
            q += 1
        else:
            m.diag(q, "error", "expected a newline after '</Task>'")
        _finish_lenient_task(m, q)
        return True
    if nl < 0:
        if not final:
            return False
        _task_line(m, text[p:], p)
        m.diag(n, "error", "unclosed task block")
        _finish_lenient_task(m, n)
        return True
    _task_line(m, text[p:nl], p)
    m.pos = nl + 1
    return True


def _finish_lenient_task(m: Machine, end: int) -> None:
    if m.task_decode is None:
        m.task_decode = bool(m.entries)
        m.diag(end, "error", "task block without a 'Unit decode (…).' line")
    end_task(m, end)


def _task_line(m: Machine, line: str, offset: int) -> None:
    if not line.strip():
        if line:
            m.diag(offset, "error", "blank line in the task block")
        return
    head = _R_HEADER.search(line)
    if head is not None:
        m.task_decode = head.group(1) == "True"
        canonical = (HEAD_TRUE if m.task_decode else HEAD_FALSE).strip("\n")
        if line != canonical:
            m.diag(offset, "error", f"irregular task header {line!r}")
        return
    untagged = _R_TAGS.sub("", line)
    row = _R_ENTRY.fullmatch(untagged)
    if row is None:
        m.diag(offset, "error", f"unrecognised task line {line!r}")
        return
    entry = TaskEntry(row.group(1), row.group(2), int(row.group(3)))
    m.entries.append(entry)
    if line != f"{ENTRY_OPEN}{entry.name}{ENTRY_UNIT}{entry.unit}{ENTRY_NUM}{entry.num}":
        tagged = untagged != line
        m.diag(
            offset,
            "legacy" if tagged else "error",
            "task line with tagged names" if tagged else f"irregular task line {line!r}",
        )
