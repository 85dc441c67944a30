"""The resumable scanner behind every TRP parser.

One state machine serves the batch parser (fed the whole text once), the streaming parser (fed
one token's text at a time) and the constrained decoder (which probes candidate tokens). It is
fed text chunks of any size: whatever cannot be decided yet (a partial tag, a partial literal, a
number that may grow) stays unconsumed until more text or the end of input arrives, so the result
never depends on where the chunks were cut.

Strict mode detects errors *eagerly*: it raises as soon as the text stops being a prefix of some
valid answer, and the reported offset is the first character that breaks it. The constrained
decoder relies on this (a candidate token is allowed exactly when feeding it does not raise).
Lenient mode runs the same machine and repairs at each point strict mode would raise; repairs
that need lookahead (legacy forms) wait until ``LOOKAHEAD`` characters are available or the input
ended, so they too are independent of chunking.
"""

from __future__ import annotations

import re
from functools import lru_cache

from trp.grammar.errors import TRPParseError
from trp.grammar.tokens import (
    PHRASE_CLOSE,
    PHRASE_OPEN,
    TASK_CLOSE,
    TASK_OPEN,
    VRT_PATTERN,
    VRT_PREFIX,
)
from trp.grammar.types import (
    Diagnostic,
    ParseResult,
    Target,
    TaskBlock,
    TaskEntry,
    Triplet,
    new_target,
    new_triplet,
)

# Modes of the machine.
BODY, PHRASE, PHRASE_PLAN, OPEN_UNIT, UNIT, TARGETS, LEGACY = range(7)
TASK_HEAD, TASK_ENTRY, TASK_NAME, TASK_UNIT, TASK_NUM, TASK_LINES = range(7, 13)
TASK_MODES = frozenset((TASK_HEAD, TASK_ENTRY, TASK_NAME, TASK_UNIT, TASK_NUM))
TRIPLET_MODES = frozenset((PHRASE, PHRASE_PLAN, OPEN_UNIT, UNIT, TARGETS))

HEAD_TRUE = "\nUnit decode (True). Class name, target unit and number:\n"
HEAD_FALSE = "\nUnit decode (False).\n"
ENTRY_OPEN = "- Name: "
ENTRY_UNIT = " Unit: "
ENTRY_NUM = " Num: "
TASK_END = TASK_CLOSE + "\n"
OPEN_UNIT_LIT = "(<Unit>"
UNIT_END = "</Unit>"

# Longest lookahead a lenient repair needs (bounded regexes below stay within it).
LOOKAHEAD = 48

_TAG = re.compile(r"<(?:/?(?:Task|Phrase|Unit)>|REF>|\|VRT_(\d+)\|>)")
_ANGLE_PREFIXES = (
    "<Task>",
    "</Task>",
    "<Phrase>",
    "</Phrase>",
    "<Unit>",
    "</Unit>",
    "<REF>",
    VRT_PREFIX,
)
_VRT_PARTIAL = re.compile(r"<\|VRT_\d*\|?")
_VRT_BROKEN = re.compile(r"<\|VRT_(?:\d+\|?)?")
_NAME_STOP = re.compile(r"[<\n ]")
_NUM = re.compile(r"[1-9]\d*")

# Lenient repairs.
_R_OPEN_UNIT = re.compile(r"\s{0,3}\(\s{0,3}<Unit>")
_R_UNIT = re.compile(r"\s{0,3}([^<>\n]{1,32}?)\s{0,3}</Unit>")
_R_SEP = re.compile(r"\s{0,3},?\s{0,3}and\s{1,3}|\s{0,3},\s{0,3}")
_R_WS = re.compile(r"\s{1,8}")
_R_REF_FIRST = re.compile(r"<REF>\s{0,3}\[(\d{1,9})\]")
_R_SLOT_REF = re.compile(r"\[(\d{1,9})\]\s{0,3}<REF>")
_R_BARE_REF = re.compile(r"<REF>")
_R_LEGACY_SEP = re.compile(r"(?:\s{0,3},?\s{0,3}and\s{1,3}|\s{0,3},\s{0,3})(?=<\|VRT_\d)")
_R_HEADER = re.compile(r"Unit decode \((True|False)\)")
_R_ENTRY = re.compile(r"-?\s*Name:\s*(.*?)\s+Unit:\s*(\S+)\s+Num:\s*(\d{1,9})\s*")
_R_TAGS = re.compile(r"</?(?:Phrase|Unit)>")
_R_CATEGORY = re.compile(r'(\d{1,9})\s*"([^"]*)"\s*\(\s*$')
_R_QUOTED = re.compile(r'"([^"]*)"')
_R_CLAUSE = re.compile(r"[.;:!?\n]")

# Fast path for a whole canonical triplet already in the buffer (the common case); anything it
# does not fully vouch for goes through the general machine, so results are identical.
_FAST_TRIPLET = re.compile(
    r"<Phrase>([^<]+)</Phrase>\(<Unit>([a-z][a-z0-9_]*)</Unit>"
    r"((?:\[\d+\]<REF>|<\|VRT_\d+\|>|, )+)\)"
)
_FAST_TARGET = re.compile(r"\[(\d+)\]<REF>|<\|VRT_(\d+)\|>|, ")

_WAIT = object()


@lru_cache(maxsize=64)
def _unit_literals(units: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], frozenset]:
    return (
        tuple(u + UNIT_END for u in units),
        tuple(u + ENTRY_NUM for u in units),
        frozenset(units),
    )


# State that ``checkpoint``/``rollback`` save. Lists are append-only between a checkpoint and its
# rollback, so saving (list, length) pairs is enough; list fields that get rebound are also in
# _SCALARS so the binding comes back too.
_SCALARS = (
    "text",
    "pos",
    "mode",
    "span_start",
    "t_start",
    "c_start",
    "concept",
    "unit",
    "after_sep",
    "g_count",
    "plan",
    "plan_index",
    "task_decode",
    "task_seen",
    "line_start",
    "name_start",
    "e_name",
    "e_unit",
    "targets",
    "t_offsets",
    "run_ids",
    "run_offs",
)
_LISTS = (
    "triplets",
    "spans",
    "offsets",
    "texts",
    "diagnostics",
    "entries",
    "targets",
    "t_offsets",
    "run_ids",
    "run_offs",
)


def _latin1_to_str(s: str) -> str:
    # Token-id input is scanned as latin-1 so one character is one byte (a token may end inside a
    # UTF-8 sequence); text read out of it is decoded back here.
    return s if s.isascii() else s.encode("latin-1").decode("utf-8", "replace")


def _legacy_concept(span: str) -> tuple[str, int | None]:
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


class Scanner:
    """Resumable TRP scanner; see the module docstring.

    ``units`` are the unit names ``<Unit>`` accepts; ``legacy_unit`` the unit given to PaDT-style
    VRT groups (lenient); ``latin1`` marks text built from token bytes; ``allow_ref`` /
    ``allow_vrt`` restrict target kinds (the constrained decoder uses them).
    """

    def __init__(
        self,
        *,
        strict: bool,
        units: tuple[str, ...],
        legacy_unit: str = "box",
        latin1: bool = False,
        allow_ref: bool = True,
        allow_vrt: bool = True,
    ) -> None:
        self.strict = strict
        self.units = units
        self.unit_choices, self.task_unit_choices, self.unit_set = _unit_literals(units)
        self.legacy_unit = legacy_unit
        self.latin1 = latin1
        self.allow_ref = allow_ref
        self.allow_vrt = allow_vrt
        self.text = ""
        self.pos = 0
        self.mode = BODY
        self.span_start = 0
        self.triplets: list[Triplet] = []
        self.spans: list[tuple[int, int]] = []
        self.offsets: list[tuple[tuple[int, ...], ...]] = []
        self.texts: list[tuple[int, int]] = []
        self.diagnostics: list[Diagnostic] = []
        self.entries: list[TaskEntry] = []
        self.task_decode: bool | None = None
        self.task_seen = False
        self.plan: tuple[TaskEntry, ...] | None = None
        self.plan_index = 0
        self.line_start = 0
        self.name_start = 0
        self.e_name = ""
        self.e_unit = ""
        self._reset_triplet(0)

    # ---------------------------------------------------------------- state management
    def _reset_triplet(self, start: int) -> None:
        self.t_start = start
        self.c_start = start
        self.concept = ""
        self.unit = ""
        self.after_sep = False
        self.targets: list[Target] = []
        self.t_offsets: list[tuple[int, ...]] = []
        self.run_ids: list[int] = []
        self.run_offs: list[int] = []
        self.g_count: int | None = None

    def checkpoint(self) -> tuple[list[object], list[tuple[list[object], int]]]:
        return (
            [getattr(self, a) for a in _SCALARS],
            [(getattr(self, a), len(getattr(self, a))) for a in _LISTS],
        )

    def rollback(self, cp: tuple[list[object], list[tuple[list[object], int]]]) -> None:
        scalars, lists = cp
        for a, v in zip(_SCALARS, scalars):
            setattr(self, a, v)
        for a, (obj, k) in zip(_LISTS, lists):
            del obj[k:]
            setattr(self, a, obj)

    def copy(self) -> Scanner:
        new = Scanner.__new__(Scanner)
        new.__dict__.update(self.__dict__)
        for a in _LISTS:
            setattr(new, a, list(getattr(self, a)))
        return new

    @property
    def accepting(self) -> bool:
        """True when ending the input here parses (strict) without error."""
        return self.mode == BODY and (self.plan is None or self.plan_index == len(self.plan))

    @property
    def run_open(self) -> bool:
        return bool(self.run_ids)

    def state_key(self) -> tuple[object, ...]:
        """Everything the acceptance of further text depends on (for caching allowed sets)."""
        mode = self.mode
        n = len(self.text)
        plan = None if self.plan is None else self.plan[self.plan_index :]
        if mode in TASK_MODES:
            extra: tuple[object, ...] = (
                tuple(self.entries),
                self.task_decode,
                self.text[self.name_start : self.pos],
                self.e_name,
                self.e_unit,
            )
        elif mode == PHRASE:
            extra = (n > self.c_start,)
        elif mode == TARGETS:
            extra = (len(self.targets), self.after_sep, bool(self.run_ids))
        else:
            extra = (n == 0,)
        return (mode, self.text[self.pos :], plan, *extra)

    # ---------------------------------------------------------------- driving
    def feed(self, chunk: str) -> None:
        self.text += chunk
        self.run(False)

    def run(self, final: bool) -> None:
        handlers = _HANDLERS
        while True:
            try:
                if not handlers[self.mode](self, final):
                    return
            except TRPParseError as err:
                if self.strict:
                    raise
                if not self._recover(err, final):
                    return

    def finish(self) -> None:
        """Consume the end of input (the scanner is done afterwards)."""
        self.run(True)
        n = len(self.text)
        if self.plan is not None and self.plan_index < len(self.plan):
            left = len(self.plan) - self.plan_index
            raise self._err(n, f"'<Phrase>' ({left} more triplet(s) announced by the task block)")
        self.texts.append((self.span_start, n))
        if not self.strict and self.task_seen:
            dec = _latin1_to_str if self.latin1 else str
            want = [(dec(e.name), e.unit, e.num) for e in self.entries]
            got = [(t.concept, t.unit, len(t.targets)) for t in self.triplets]
            if want != got:
                self._diag(0, "error", "the task block does not match the triplets")

    def result(self, positions: tuple[tuple[tuple[int, ...], ...], ...] | None) -> ParseResult:
        text = self.text
        texts = tuple(text[a:b] for a, b in self.texts)
        entries = tuple(self.entries)
        if self.latin1:
            texts = tuple(_latin1_to_str(t) for t in texts)
            entries = tuple(TaskEntry(_latin1_to_str(e.name), e.unit, e.num) for e in entries)
        task = TaskBlock(decode=bool(self.task_decode), entries=entries) if self.task_seen else None
        return ParseResult(
            triplets=tuple(self.triplets),
            texts=texts,
            task=task,
            diagnostics=tuple(self.diagnostics),
            spans=tuple(self.spans),
            offsets=tuple(self.offsets),
            positions=positions,
        )

    # ---------------------------------------------------------------- helpers
    def _err(self, offset: int, expected: str) -> TRPParseError:
        text = self.text
        found = "end of input" if offset >= len(text) else repr(text[offset : offset + 16])
        return TRPParseError(offset, expected, found)

    def _diag(self, offset: int, kind: str, message: str) -> None:
        self.diagnostics.append(Diagnostic(offset=offset, kind=kind, message=message))  # type: ignore[arg-type]

    def _angle(self, i: int, final: bool) -> object:
        """At ``text[i] == '<'``: a ``(tag, end, vrt_id)`` triple, ``_WAIT``, or None (plain)."""
        text = self.text
        m = _TAG.match(text, i)
        if m is not None:
            k = m.group(1)
            return (
                VRT_PREFIX if k is not None else m.group(0),
                m.end(),
                -1 if k is None else int(k),
            )
        if final:
            return None
        if text.startswith(VRT_PREFIX, i):
            return _WAIT if _VRT_PARTIAL.fullmatch(text, i) else None
        rest = text[i:]
        if len(rest) < 9:
            for t in _ANGLE_PREFIXES:
                if len(rest) < len(t) and t.startswith(rest):
                    return _WAIT
        return None

    def _expect(self, choices: tuple[str, ...], final: bool) -> str | None:
        """The choice the text continues with at ``pos``; None: undecided; raises otherwise."""
        text, p = self.text, self.pos
        rest = len(text) - p
        best = 0
        waiting = False
        for c in choices:
            if text.startswith(c, p):
                return c
            if rest < len(c) and c.startswith(text[p:]):
                waiting = True
                best = rest
                continue
            k = 0
            lim = min(rest, len(c))
            while k < lim and text[p + k] == c[k]:
                k += 1
            best = max(best, k)
        if waiting and not final:
            return None
        raise self._err(p + best, " or ".join(repr(c) for c in choices) or "end of input")

    def _close_run(self) -> None:
        if self.run_ids:
            self.targets.append(new_target(None, tuple(self.run_ids)))
            self.t_offsets.append(tuple(self.run_offs))
            self.run_ids = []
            self.run_offs = []

    def _finish_triplet(self, end: int) -> None:
        self._close_run()
        concept = _latin1_to_str(self.concept) if self.latin1 else self.concept
        self.triplets.append(new_triplet(concept, self.unit, tuple(self.targets)))
        self.offsets.append(tuple(self.t_offsets))
        self.spans.append((self.t_start, end))
        self.texts.append((self.span_start, self.t_start))
        self.span_start = end
        self.plan_index += 1
        self.mode = BODY
        self.pos = end
        self._reset_triplet(end)

    def _plan_entry(self) -> TaskEntry | None:
        if self.plan is None:
            return None
        return self.plan[self.plan_index]

    # ---------------------------------------------------------------- handlers
    def _body(self, final: bool) -> bool:
        text = self.text
        q = self.pos
        while True:
            i = text.find("<", q)
            if i < 0:
                self.pos = len(text)
                return False
            hit = self._angle(i, final)
            if hit is None:
                q = i + 1
                continue
            self.pos = i
            if hit is _WAIT:
                return False
            tag, end, _ = hit  # type: ignore[misc]
            if tag == PHRASE_OPEN:
                if self.plan is not None and self.plan_index >= len(self.plan):
                    raise self._err(i, "free text (the task block announces no more triplets)")
                if self._fast_triplet(i):
                    return True
                self._reset_triplet(i)
                self.c_start = end
                self.pos = end
                self.mode = PHRASE_PLAN if self.plan is not None else PHRASE
                return True
            if tag == TASK_OPEN and i == 0 and not self.task_seen:
                self.task_seen = True
                self.pos = self.line_start = end
                self.mode = TASK_HEAD
                return True
            raise self._err(i, "free text or '<Phrase>'")

    def _fast_triplet(self, i: int) -> bool:
        """Take a whole canonical triplet at ``i`` in one go; False: use the general machine."""
        text = self.text
        m = _FAST_TRIPLET.match(text, i)
        if m is None or m.group(2) not in self.unit_set:
            return False
        targets: list[Target] = []
        offsets: list[tuple[int, ...]] = []
        run: list[int] = []
        run_offs: list[int] = []
        after_sep = True  # a separator may not come first
        for t in _FAST_TARGET.finditer(text, m.start(3), m.end(3)):
            slot, k = t.group(1), t.group(2)
            if k is not None:
                kk = int(k)
                if kk in run:
                    return False
                run.append(kk)
                run_offs.append(t.start())
                after_sep = False
                continue
            if run:
                targets.append(new_target(None, tuple(run)))
                offsets.append(tuple(run_offs))
                run, run_offs = [], []
            if slot is None:
                if after_sep:
                    return False
                after_sep = True
            else:
                if slot != str(len(targets)):
                    return False
                targets.append(new_target(len(targets), None))
                offsets.append((t.end() - 5,))
                after_sep = False
        if after_sep:
            return False
        if run:
            targets.append(new_target(None, tuple(run)))
            offsets.append(tuple(run_offs))
        concept, unit = m.group(1), m.group(2)
        if self.plan is not None:
            entry = self.plan[self.plan_index]
            if (entry.name, entry.unit, entry.num) != (concept, unit, len(targets)):
                return False
        if self.latin1:
            concept = _latin1_to_str(concept)
        end = m.end()
        self.triplets.append(new_triplet(concept, unit, tuple(targets)))
        self.offsets.append(tuple(offsets))
        self.spans.append((i, end))
        self.texts.append((self.span_start, i))
        self.span_start = self.pos = end
        self.plan_index += 1
        return True

    def _phrase(self, final: bool) -> bool:
        text = self.text
        q = self.pos
        while True:
            i = text.find("<", q)
            if i < 0:
                self.pos = len(text)
                if final:
                    raise self._err(len(text), "phrase text or '</Phrase>'")
                return False
            hit = self._angle(i, final)
            if hit is None:
                q = i + 1
                continue
            self.pos = i
            if hit is _WAIT:
                return False
            tag, end, _ = hit  # type: ignore[misc]
            if tag != PHRASE_CLOSE:
                raise self._err(i, "phrase text or '</Phrase>'")
            if i == self.c_start:
                raise self._err(i, "phrase text")
            self.concept = text[self.c_start : i]
            self.pos = end
            self.mode = OPEN_UNIT
            return True

    def _phrase_plan(self, final: bool) -> bool:
        entry = self._plan_entry()
        c = self._expect((entry.name + PHRASE_CLOSE,), final)  # type: ignore[union-attr]
        if c is None:
            return False
        self.concept = entry.name  # type: ignore[union-attr]
        self.pos += len(c)
        self.mode = OPEN_UNIT
        return True

    def _open_unit(self, final: bool) -> bool:
        if self._expect((OPEN_UNIT_LIT,), final) is None:
            return False
        self.pos += len(OPEN_UNIT_LIT)
        self.mode = UNIT
        return True

    def _unit(self, final: bool) -> bool:
        entry = self._plan_entry()
        choices = (entry.unit + UNIT_END,) if entry is not None else self.unit_choices
        c = self._expect(choices, final)
        if c is None:
            return False
        self.unit = c[: -len(UNIT_END)]
        self.pos += len(c)
        self.mode = TARGETS
        return True

    def target_choices(self) -> tuple[tuple[str, ...], bool]:
        """Literal choices in TARGETS (preferred first) and whether a VRT may come next."""
        count = len(self.targets) + (1 if self.run_ids else 0)
        entry = self._plan_entry()
        more = entry is None or count < entry.num
        choices = []
        if count and not self.after_sep and (entry is None or count == entry.num):
            choices.append(")")
        if more and self.allow_ref:
            choices.append(f"[{count}]<REF>")
        if count and not self.after_sep and more:
            choices.append(", ")
        can_vrt = self.allow_vrt and (bool(self.run_ids) or more)
        return tuple(choices), can_vrt

    def _targets(self, final: bool) -> bool:
        text, p = self.text, self.pos
        choices, can_vrt = self.target_choices()
        if can_vrt:
            m = VRT_PATTERN.match(text, p)
            if m is not None:
                k = int(m.group(1))
                if k in self.run_ids:
                    raise self._err(p, "a VRT not already in this run")
                self.run_ids.append(k)
                self.run_offs.append(p)
                self.after_sep = False
                self.pos = m.end()
                return True
            choices = (*choices, VRT_PREFIX)
        c = self._expect(choices, final)
        if c is None:
            return False
        if c == VRT_PREFIX:
            if not final and _VRT_PARTIAL.fullmatch(text, p):
                return False
            raise self._err(_VRT_BROKEN.match(text, p).end(), "a VRT token '<|VRT_k|>'")  # type: ignore[union-attr]
        if c == ")":
            self._finish_triplet(p + 1)
            return True
        self._close_run()
        if c == ", ":
            self.after_sep = True
        else:
            self.targets.append(new_target(len(self.targets), None))
            self.t_offsets.append((p + len(c) - 5,))
            self.after_sep = False
        self.pos = p + len(c)
        return True

    def _legacy(self, final: bool) -> bool:
        text, p = self.text, self.pos
        m = VRT_PATTERN.match(text, p)
        if m is not None:
            k = int(m.group(1))
            if k in self.run_ids:
                self._diag(p, "legacy", f"repeated VRT id {k} dropped")
            else:
                self.run_ids.append(k)
                self.run_offs.append(p)
            self.pos = m.end()
            return True
        if not final and (
            len(text) - p < LOOKAHEAD
            or text.startswith(VRT_PREFIX, p)
            and _VRT_PARTIAL.fullmatch(text, p)
        ):
            return False
        if self.run_ids:
            sep = _R_LEGACY_SEP.match(text, p)
            if sep is not None:
                self._close_run()
                self.pos = sep.end()
                return True
        announced = self.g_count
        self._finish_triplet(p)
        if announced is not None and announced != len(self.triplets[-1].targets):
            self._diag(
                p, "error", f"{announced} objects announced, {len(self.triplets[-1].targets)} given"
            )
        return True

    def _task_head(self, final: bool) -> bool:
        c = self._expect((HEAD_TRUE, HEAD_FALSE), final)
        if c is None:
            return False
        self.task_decode = c == HEAD_TRUE
        self.pos += len(c)
        self.line_start = self.pos
        self.mode = TASK_ENTRY
        return True

    def _entry_choices(self) -> tuple[str, ...]:
        if not self.task_decode:
            return (TASK_END,)
        return (TASK_END, ENTRY_OPEN) if self.entries else (ENTRY_OPEN,)

    def _task_entry(self, final: bool) -> bool:
        c = self._expect(self._entry_choices(), final)
        if c is None:
            return False
        self.pos += len(c)
        if c == ENTRY_OPEN:
            self.name_start = self.pos
            self.mode = TASK_NAME
        else:
            self._end_task(self.pos)
        return True

    def _end_task(self, end: int) -> None:
        self.pos = self.span_start = end
        self.mode = BODY
        if self.strict:
            self.plan = tuple(self.entries)

    def _task_name(self, final: bool) -> bool:
        text = self.text
        q = self.pos
        while True:
            m = _NAME_STOP.search(text, q)
            if m is None:
                self.pos = len(text)
                if final:
                    raise self._err(len(text), "class name text or ' Unit: '")
                return False
            i = m.start()
            ch = text[i]
            if ch == " ":
                if text.startswith(ENTRY_UNIT, i):
                    if i == self.name_start:
                        raise self._err(i, "a class name")
                    self.e_name = text[self.name_start : i]
                    self.pos = i + len(ENTRY_UNIT)
                    self.mode = TASK_UNIT
                    return True
                if not final and ENTRY_UNIT.startswith(text[i:]):
                    self.pos = i
                    return False
                q = i + 1
                continue
            if ch == "\n":
                self.pos = i
                raise self._err(i, "class name text or ' Unit: '")
            hit = self._angle(i, final)
            if hit is None:
                q = i + 1
                continue
            self.pos = i
            if hit is _WAIT:
                return False
            raise self._err(i, "class name text or ' Unit: '")

    def _task_unit(self, final: bool) -> bool:
        c = self._expect(self.task_unit_choices, final)
        if c is None:
            return False
        self.e_unit = c[: -len(ENTRY_NUM)]
        self.pos += len(c)
        self.mode = TASK_NUM
        return True

    def _task_num(self, final: bool) -> bool:
        text, p = self.text, self.pos
        n = len(text)
        if p == n:
            if final:
                raise self._err(n, "a count >= 1")
            return False
        m = _NUM.match(text, p)
        if m is None:
            raise self._err(p, "a count >= 1")
        e = m.end()
        if e == n:
            if final:
                raise self._err(n, "a digit or '\\n'")
            return False
        if text[e] != "\n":
            raise self._err(e, "a digit or '\\n'")
        self.entries.append(TaskEntry(self.e_name, self.e_unit, int(m.group(0))))
        self.pos = self.line_start = e + 1
        self.mode = TASK_ENTRY
        return True

    def _task_lines(self, final: bool) -> bool:
        text, p = self.text, self.pos
        n = len(text)
        nl = text.find("\n", p)
        line_end = n if nl < 0 else nl
        close = text.find(TASK_CLOSE, p, line_end)
        if close >= 0:
            q = close + len(TASK_CLOSE)
            if q >= n and not final:
                return False
            self._task_line(text[p:close], p)
            if q < n and text[q] == "\n":
                q += 1
            else:
                self._diag(q, "error", "expected a newline after '</Task>'")
            self._finish_lenient_task(q)
            return True
        if nl < 0:
            if not final:
                return False
            self._task_line(text[p:], p)
            self._diag(n, "error", "unclosed task block")
            self._finish_lenient_task(n)
            return True
        self._task_line(text[p:nl], p)
        self.pos = nl + 1
        return True

    def _finish_lenient_task(self, end: int) -> None:
        if self.task_decode is None:
            self.task_decode = bool(self.entries)
            self._diag(end, "error", "task block without a 'Unit decode (…).' line")
        self._end_task(end)

    def _task_line(self, line: str, offset: int) -> None:
        if not line.strip():
            if line:
                self._diag(offset, "error", "blank line in the task block")
            return
        m = _R_HEADER.search(line)
        if m is not None:
            self.task_decode = m.group(1) == "True"
            canonical = (HEAD_TRUE if self.task_decode else HEAD_FALSE).strip("\n")
            if line != canonical:
                self._diag(offset, "error", f"irregular task header {line!r}")
            return
        untagged = _R_TAGS.sub("", line)
        m = _R_ENTRY.fullmatch(untagged)
        if m is None:
            self._diag(offset, "error", f"unrecognised task line {line!r}")
            return
        entry = TaskEntry(m.group(1), m.group(2), int(m.group(3)))
        self.entries.append(entry)
        if line != f"{ENTRY_OPEN}{entry.name}{ENTRY_UNIT}{entry.unit}{ENTRY_NUM}{entry.num}":
            tagged = untagged != line
            self._diag(
                offset,
                "legacy" if tagged else "error",
                "task line with tagged names" if tagged else f"irregular task line {line!r}",
            )

    # ---------------------------------------------------------------- lenient repairs
    def _recover(self, err: TRPParseError, final: bool) -> bool:
        mode = self.mode
        if mode == BODY:
            return self._recover_body(err)
        if mode in TASK_MODES:
            self.pos = self.line_start
            self.mode = TASK_LINES
            return True
        return self._recover_triplet(err, final)

    def _recover_body(self, err: TRPParseError) -> bool:
        text, i = self.text, err.offset
        m = _TAG.match(text, i)
        if m is not None and m.group(1) is not None:
            concept, count = _legacy_concept(text[self.span_start : i])
            self._reset_triplet(i)
            self.concept = concept
            self.unit = self.legacy_unit
            self.g_count = count
            self.mode = LEGACY
            self.pos = i
            self._diag(i, "legacy", "VRT run outside a triplet (PaDT form)")
            return True
        self._diag(i, "error", f"stray {m.group(0) if m else text[i : i + 8]!r} kept as text")
        self.pos = m.end() if m is not None else i + 1
        return True

    def _abandon(self, err: TRPParseError) -> bool:
        # Only what was expected: what was "found" depends on how much text had arrived.
        self._diag(err.offset, "error", f"expected {err.expected}; triplet dropped")
        self.mode = BODY
        self.pos = min(err.offset, len(self.text))
        self._reset_triplet(self.pos)
        return True

    def _recover_triplet(self, err: TRPParseError, final: bool) -> bool:
        text, p, mode = self.text, self.pos, self.mode
        n = len(text)
        if final and err.offset >= n:
            return self._abandon(err)
        if mode == PHRASE:
            if err.offset == self.c_start and text.startswith(PHRASE_CLOSE, err.offset):
                self._diag(err.offset, "error", "empty phrase")
                self.pos = err.offset + len(PHRASE_CLOSE)
                self.mode = OPEN_UNIT
                return True
            return self._abandon(err)
        if not final and n - p < LOOKAHEAD:
            return False
        if mode == OPEN_UNIT:
            m = _R_OPEN_UNIT.match(text, p)
            if m is None:
                return self._abandon(err)
            self._diag(p, "error", "whitespace around '('")
            self.pos = m.end()
            self.mode = UNIT
            return True
        if mode == UNIT:
            m = _R_UNIT.match(text, p)
            if m is None:
                return self._abandon(err)
            self.unit = m.group(1).strip()
            if self.unit in self.units:
                self._diag(p, "error", "whitespace around the unit name")
            else:
                self._diag(p, "error", f"unknown unit {self.unit!r}")
            self.pos = m.end()
            self.mode = TARGETS
            return True
        return self._recover_targets(err)

    def _recover_targets(self, err: TRPParseError) -> bool:
        text, p = self.text, self.pos
        count = len(self.targets) + (1 if self.run_ids else 0)
        m = VRT_PATTERN.match(text, p)
        if m is not None and int(m.group(1)) in self.run_ids:
            self._diag(p, "legacy", f"repeated VRT id {m.group(1)} dropped")
            self.pos = m.end()
            return True
        if count:
            m = _R_SEP.match(text, p)
            if m is not None and (m.group(0) != ", " or self.after_sep):
                self._close_run()
                self.after_sep = True
                self._diag(p, "legacy" if "and" in m.group(0) else "error", "irregular separator")
                self.pos = m.end()
                return True
            if text.startswith(")", p):
                self._diag(p, "error", "trailing separator before ')'")
                self._finish_triplet(p + 1)
                return True
        m = _R_WS.match(text, p)
        if m is not None:
            self._diag(p, "error", "whitespace between targets")
            self.pos = m.end()
            return True
        for rx, ref_at, legacy in ((_R_REF_FIRST, 0, True), (_R_SLOT_REF, -5, False)):
            m = rx.match(text, p)
            if m is not None:
                self._add_ref(int(m.group(1)), m.start() if ref_at == 0 else m.end() - 5, m.end())
                self._diag(
                    p,
                    "legacy" if legacy else "error",
                    "'<REF>[i]' order" if legacy else f"slot [{m.group(1)}] out of order",
                )
                return True
        m = _R_BARE_REF.match(text, p)
        if m is not None:
            self._add_ref(count, p, m.end())
            self._diag(p, "error", "'<REF>' without a slot index")
            return True
        return self._abandon(err)

    def _add_ref(self, slot: int, offset: int, end: int) -> None:
        self._close_run()
        self.targets.append(Target(slot=slot))
        self.t_offsets.append((offset,))
        self.after_sep = False
        self.pos = end

    # ---------------------------------------------------------------- completion
    def completion_step(self, vrt_fill: int) -> str | None:
        """Text that moves a strict scanner towards acceptance (None when accepting)."""
        mode = self.mode
        pend = self.text[self.pos :]
        if mode == BODY:
            return PHRASE_OPEN if not self.accepting else None
        if mode == PHRASE:
            # The whole tag even after a partial one: that stays phrase text, and the tag is
            # then one token rather than the tail of a spelled-out one.
            return PHRASE_CLOSE if len(self.text) > self.c_start else "x" + PHRASE_CLOSE
        if mode == TASK_NAME:
            if len(self.text) == self.name_start:
                return "x" + ENTRY_UNIT
            return _rest(ENTRY_UNIT, pend)
        if mode == TASK_NUM:
            return "1\n" if not pend else "\n"
        if mode == TARGETS:
            choices, can_vrt = self.target_choices()
            for c in choices:
                if c.startswith(pend):
                    return c[len(pend) :]
            if can_vrt and not self.run_ids:
                return f"<|VRT_{vrt_fill}|>"
            raise RuntimeError(f"no completion from {self.state_key()!r}")
        entry = self._plan_entry()
        choices = {
            PHRASE_PLAN: lambda: (entry.name + PHRASE_CLOSE,),  # type: ignore[union-attr]
            OPEN_UNIT: lambda: (OPEN_UNIT_LIT,),
            UNIT: lambda: (entry.unit + UNIT_END,) if entry is not None else self.unit_choices,
            TASK_HEAD: lambda: (HEAD_FALSE, HEAD_TRUE),
            TASK_ENTRY: self._entry_choices,
            TASK_UNIT: lambda: self.task_unit_choices,
        }[mode]()
        for c in choices:
            if c.startswith(pend):
                return c[len(pend) :]
        raise RuntimeError(f"no completion from {self.state_key()!r}")

    def completion(self, vrt_fill: int = 0) -> str:
        """The text the constrained decoder forces to finish a valid answer from here."""
        cp = self.checkpoint()
        parts = []
        try:
            while True:
                s = self.completion_step(vrt_fill)
                if s is None:
                    break
                parts.append(s)
                self.feed(s)
        finally:
            self.rollback(cp)
        return "".join(parts)


def _rest(lit: str, pend: str) -> str:
    return lit[len(pend) :] if pend and lit.startswith(pend) else lit


_HANDLERS = {
    BODY: Scanner._body,
    PHRASE: Scanner._phrase,
    PHRASE_PLAN: Scanner._phrase_plan,
    OPEN_UNIT: Scanner._open_unit,
    UNIT: Scanner._unit,
    TARGETS: Scanner._targets,
    LEGACY: Scanner._legacy,
    TASK_HEAD: Scanner._task_head,
    TASK_ENTRY: Scanner._task_entry,
    TASK_NAME: Scanner._task_name,
    TASK_UNIT: Scanner._task_unit,
    TASK_NUM: Scanner._task_num,
    TASK_LINES: Scanner._task_lines,
}
