"""Lenient mode: the legacy forms real checkpoints emit and the repairs of broken answers.

:func:`recover` is called by the scanner at each point strict mode raises; it either repairs
(reporting a :class:`Diagnostic`) and lets the machine go on, or returns False to wait for
more text. Repairs that need lookahead wait until ``LOOKAHEAD`` characters are available or the
input ended, so they do not depend on how the text was chunked. :func:`legacy_run` is the mode
handler for PaDT-style VRT runs outside a triplet (``The "car" refers to <|VRT_3|>…``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from trp.grammar.errors import TRPParseError
from trp.grammar.literals import (
    BODY,
    LEGACY,
    LOOKAHEAD,
    OPEN_UNIT,
    PHRASE,
    TAG,
    TARGETS,
    TASK_LINES,
    TASK_MODES,
    UNIT,
    VRT_PARTIAL,
)
from trp.grammar.tokens import PHRASE_CLOSE, VRT_PATTERN, VRT_PREFIX
from trp.grammar.types import Target

if TYPE_CHECKING:
    from trp.grammar.scanner import Machine

__all__ = ["legacy_concept", "legacy_run", "recover"]

_R_OPEN_UNIT = re.compile(r"\s{0,3}\(\s{0,3}<Unit>")
_R_UNIT = re.compile(r"\s{0,3}([^<>\n]{1,32}?)\s{0,3}</Unit>")
_R_SEP = re.compile(r"\s{0,3},?\s{0,3}and\s{1,3}|\s{0,3},\s{0,3}")
_R_WS = re.compile(r"\s{1,8}")
_R_REF_FIRST = re.compile(r"<REF>\s{0,3}\[(\d{1,9})\]")
_R_SLOT_REF = re.compile(r"\[(\d{1,9})\]\s{0,3}<REF>")
_R_BARE_REF = re.compile(r"<REF>")
_R_LEGACY_SEP = re.compile(r"(?:\s{0,3},?\s{0,3}and\s{1,3}|\s{0,3},\s{0,3})(?=<\|VRT_\d)")
_R_CATEGORY = re.compile(r'(\d{1,9})\s*"([^"]*)"\s*\(\s*$')
_R_QUOTED = re.compile(r'"([^"]*)"')
_R_CLAUSE = re.compile(r"[.;:!?\n]")


def legacy_concept(span: str) -> tuple[str, int | None]:
    """Concept (and announced count) of a PaDT-style VRT group from the text before it."""
    m = _R_CATEGORY.search(span)
    if m is not None:
        return m.group(2), int(m.group(1))
    quoted = _R_QUOTED.findall(span)
    if quoted:
        return quoted[-1], None
    tail = span.rstrip().rstrip("(").rstrip()
    cut = max((m.end() for m in _R_CLAUSE.finditer(tail)), default=0)
    return tail[cut:].strip(), None


def legacy_run(m: Machine, final: bool) -> bool:
    """Mode handler: VRTs (repeats dropped) and separators of a PaDT group, then its end."""
    text, p = m.text, m.pos
    vrt = VRT_PATTERN.match(text, p)
    if vrt is not None:
        k = int(vrt.group(1))
        if k in m.run_ids:
            m.diag(p, "legacy", f"repeated VRT id {k} dropped")
        else:
            m.run_ids.append(k)
            m.run_offs.append(p)
        m.pos = vrt.end()
        return True
    if not final and (
        len(text) - p < LOOKAHEAD
        or text.startswith(VRT_PREFIX, p)
        and VRT_PARTIAL.fullmatch(text, p)
    ):
        return False
    if m.run_ids:
        sep = _R_LEGACY_SEP.match(text, p)
        if sep is not None:
            m.close_run()
            m.pos = sep.end()
            return True
    announced = m.g_count
    m.finish_triplet(p)
    given = len(m.triplets[-1].targets)
    if announced is not None and announced != given:
        m.diag(p, "error", f"{announced} objects announced, {given} given")
    return True


def recover(m: Machine, err: TRPParseError, final: bool) -> bool:
    """Repair at the point strict mode raised ``err``; False: wait for more text."""
    mode = m.mode
    if mode == BODY:
        return _recover_body(m, err)
    if mode in TASK_MODES:
        m.pos = m.line_start
        m.mode = TASK_LINES
        return True
    return _recover_triplet(m, err, final)


def _recover_body(m: Machine, err: TRPParseError) -> bool:
    text, i = m.text, err.offset
    tag = TAG.match(text, i)
    if tag is not None and tag.group(1) is not None:
        concept, count = legacy_concept(text[m.span_start : i])
        m.reset_triplet(i)
        m.concept = concept
        m.unit = m.legacy_unit
        m.g_count = count
        m.mode = LEGACY
        m.pos = i
        m.diag(i, "legacy", "VRT run outside a triplet (PaDT form)")
        return True
    m.diag(i, "error", f"stray {tag.group(0) if tag else text[i : i + 8]!r} kept as text")
    m.pos = tag.end() if tag is not None else i + 1
    return True


def _abandon(m: Machine, err: TRPParseError) -> bool:
    # Only what was expected: what was "found" depends on how much text had arrived.
    m.diag(err.offset, "error", f"expected {err.expected}; triplet dropped")
    m.mode = BODY
    m.pos = min(err.offset, len(m.text))
    m.reset_triplet(m.pos)
    return True


def _recover_triplet(m: Machine, err: TRPParseError, final: bool) -> bool:
    text, p, mode = m.text, m.pos, m.mode
    n = len(text)
    if final and err.offset >= n:
        return _abandon(m, err)
    if mode == PHRASE:
        if err.offset == m.c_start and text.startswith(PHRASE_CLOSE, err.offset):
            m.diag(err.offset, "error", "empty phrase")
            m.pos = err.offset + len(PHRASE_CLOSE)
            m.mode = OPEN_UNIT
            return True
        return _abandon(m, err)
    if not final and n - p < LOOKAHEAD:
        return False
    if mode == OPEN_UNIT:
        ws = _R_OPEN_UNIT.match(text, p)
        if ws is None:
            return _abandon(m, err)
        m.diag(p, "error", "whitespace around '('")
        m.pos = ws.end()
        m.mode = UNIT
        return True
    if mode == UNIT:
        name = _R_UNIT.match(text, p)
        if name is None:
            return _abandon(m, err)
        m.unit = name.group(1).strip()
        if m.unit in m.units:
            m.diag(p, "error", "whitespace around the unit name")
        else:
            m.diag(p, "error", f"unknown unit {m.unit!r}")
        m.pos = name.end()
        m.mode = TARGETS
        return True
    return _recover_targets(m, err)


def _recover_targets(m: Machine, err: TRPParseError) -> bool:
    text, p = m.text, m.pos
    count = len(m.targets) + (1 if m.run_ids else 0)
    vrt = VRT_PATTERN.match(text, p)
    if vrt is not None and int(vrt.group(1)) in m.run_ids:
        m.diag(p, "legacy", f"repeated VRT id {vrt.group(1)} dropped")
        m.pos = vrt.end()
        return True
    if count:
        sep = _R_SEP.match(text, p)
        if sep is not None and (sep.group(0) != ", " or m.after_sep):
            m.close_run()
            m.after_sep = True
            m.diag(p, "legacy" if "and" in sep.group(0) else "error", "irregular separator")
            m.pos = sep.end()
            return True
        if text.startswith(")", p):
            m.diag(p, "error", "trailing separator before ')'")
            m.finish_triplet(p + 1)
            return True
    ws = _R_WS.match(text, p)
    if ws is not None:
        m.diag(p, "error", "whitespace between targets")
        m.pos = ws.end()
        return True
    for rx, ref_first in ((_R_REF_FIRST, True), (_R_SLOT_REF, False)):
        ref = rx.match(text, p)
        if ref is not None:
            _add_ref(m, int(ref.group(1)), ref.start() if ref_first else ref.end() - 5, ref.end())
            m.diag(
                p,
                "legacy" if ref_first else "error",
                "'<REF>[i]' order" if ref_first else f"slot [{ref.group(1)}] out of order",
            )
            return True
    bare = _R_BARE_REF.match(text, p)
    if bare is not None:
        _add_ref(m, count, p, bare.end())
        m.diag(p, "error", "'<REF>' without a slot index")
        return True
    return _abandon(m, err)


def _add_ref(m: Machine, slot: int, offset: int, end: int) -> None:
    m.close_run()
    m.targets.append(Target(slot=slot))
    m.t_offsets.append((offset,))
    m.after_sep = False
    m.pos = end
