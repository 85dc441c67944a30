"""The resumable TRP scanner: its state is an immutable value.

:class:`ScanState` is everything the scanner knows about the text fed so far. ``state.feed(chunk)``
returns a *new* state (the old one is untouched, so a checkpoint is just the previous value) and
``state.finish()`` the state at the end of input; ``result()`` turns a finished state into a
:class:`ParseResult`. One machine serves the batch parser (fed the whole text once), the
streaming parser (fed one token's text at a time) and the constrained decoder (which probes
candidate tokens from one state and asks :meth:`ScanState.follow` what may come next). Whatever
cannot be decided yet (a partial tag, a partial literal, a number that may grow) stays pending
until more text or the end of input arrives, so results never depend on where chunks were cut.

Strict mode detects errors *eagerly*: it raises as soon as the text stops being a prefix of some
valid answer, and the reported offset is the first character that breaks it. Lenient mode runs
the same machine and repairs at each point strict mode would raise (:mod:`trp.grammar.legacy`).
The ``<Task>`` block lives in :mod:`trp.grammar.task_block`.

Inside one ``feed`` the work is done by a private mutable :class:`Machine` thawed from the state
and frozen back at the end: the handlers stay plain imperative code and the per-character work
pays no copying, while every value a caller can hold is immutable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from trp.grammar import legacy, task_block
from trp.grammar.errors import TRPParseError
from trp.grammar.literals import (
    ANGLE_PREFIXES,
    BODY,
    ENTRY_UNIT,
    HEAD_FALSE,
    HEAD_TRUE,
    LEGACY,
    LENIENT_MODES,
    OPEN_UNIT,
    OPEN_UNIT_LIT,
    PHRASE,
    PHRASE_PLAN,
    TAG,
    TARGETS,
    TASK_ENTRY,
    TASK_HEAD,
    TASK_LINES,
    TASK_MODES,
    TASK_NAME,
    TASK_NUM,
    TASK_UNIT,
    UNIT,
    UNIT_END,
    VRT_BROKEN,
    VRT_PARTIAL,
    WAIT,
    latin1_to_str,
    unit_literals,
)
from trp.grammar.tokens import PHRASE_CLOSE, PHRASE_OPEN, TASK_OPEN, VRT_PATTERN, VRT_PREFIX
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

__all__ = ["Follow", "ScanConfig", "ScanState", "initial_state"]

# Fast path for a whole canonical triplet already in the buffer (the common case); anything it
# does not fully vouch for goes through the general machine, so results are identical.
_FAST_TRIPLET = re.compile(
    r"<Phrase>([^<]+)</Phrase>\(<Unit>([a-z][a-z0-9_]*)</Unit>"
    r"((?:\[\d+\]<REF>|<\|VRT_\d+\|>|, )+)\)"
)
_FAST_TARGET = re.compile(r"\[(\d+)\]<REF>|<\|VRT_(\d+)\|>|, ")


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """What a scan accepts (fixed for its whole life).

    ``units`` are the unit names ``<Unit>`` accepts; ``legacy_unit`` the unit given to PaDT-style
    VRT groups (lenient); ``latin1`` marks text built from token bytes; ``allow_ref`` /
    ``allow_vrt`` restrict target kinds (the constrained decoder uses them).
    """

    strict: bool
    units: tuple[str, ...]
    legacy_unit: str = "box"
    latin1: bool = False
    allow_ref: bool = True
    allow_vrt: bool = True
    unit_choices: tuple[str, ...] = field(init=False, repr=False, compare=False)
    task_unit_choices: tuple[str, ...] = field(init=False, repr=False, compare=False)
    unit_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        choices, task_choices, unit_set = unit_literals(self.units)
        object.__setattr__(self, "unit_choices", choices)
        object.__setattr__(self, "task_unit_choices", task_choices)
        object.__setattr__(self, "unit_set", unit_set)


class Output(NamedTuple):
    """What the scan produced so far (``texts`` / ``spans`` are character ranges)."""

    triplets: tuple[Triplet, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    offsets: tuple[tuple[tuple[int, ...], ...], ...] = ()
    texts: tuple[tuple[int, int], ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()


class TaskProgress(NamedTuple):
    """The ``<Task>`` block read so far and, after it (strict), the plan the triplets follow."""

    entries: tuple[TaskEntry, ...] = ()
    decode: bool | None = None
    seen: bool = False
    plan: tuple[TaskEntry, ...] | None = None
    plan_index: int = 0
    line_start: int = 0
    name_start: int = 0
    name: str = ""
    unit: str = ""


class TripletProgress(NamedTuple):
    """The triplet being read: where it and its concept start, what it has so far."""

    start: int = 0
    concept_start: int = 0
    concept: str = ""
    unit: str = ""
    after_sep: bool = False
    targets: tuple[Target, ...] = ()
    target_offsets: tuple[tuple[int, ...], ...] = ()
    run: tuple[int, ...] = ()
    run_offsets: tuple[int, ...] = ()
    announced: int | None = None


_new = tuple.__new__
_PLAIN_MODES = frozenset((BODY, PHRASE))
_NO_OUTPUT = Output()
_NO_TASK = TaskProgress()
_NO_TRIPLET = TripletProgress()


@dataclass(frozen=True, slots=True)
class Follow:
    """What may follow a strict scanner state (the constrained decoder's view of the grammar).

    ``text`` names the free text that may continue here: ``"body"`` (answer text), ``"phrase"``
    (a concept), ``"name"`` (a task-line class name; ``' Unit: '`` ends it), ``"count"`` (the
    digits of a task line's count, then ``'\\n'``) or None. Free text never holds a tag or a VRT.
    ``tags`` are the grammar tags that may come next whole (beside the free text); ``literals``
    the fixed strings one of which must come next (tags inside them are whole tags too) — a
    literal may be followed by more text of the state it leads to. ``vrt`` says whether a VRT may
    come next, ``run`` the patches already in the open VRT run (not allowed again), ``pending``
    the text fed but not decided yet (a partial tag or literal) and ``accepting`` whether the
    answer may end here.
    """

    text: str | None
    tags: tuple[str, ...]
    literals: tuple[str, ...]
    vrt: bool
    run: tuple[int, ...]
    pending: str
    accepting: bool


class ScanState(NamedTuple):
    """An immutable scanner state; see the module docstring.

    ``text`` is everything fed (latin-1 for token input), ``pos`` how far it is decided and
    ``mode`` which part of the grammar the scanner is in. ``out``, ``task`` and ``triplet``
    group what was produced, the task block and the triplet in progress.
    """

    config: ScanConfig
    text: str = ""
    pos: int = 0
    mode: int = BODY
    span_start: int = 0
    out: Output = _NO_OUTPUT
    task: TaskProgress = _NO_TASK
    triplet: TripletProgress = _NO_TRIPLET

    # ------------------------------------------------------------ transitions
    def feed(self, chunk: str) -> ScanState:
        """The state after ``chunk``; raises :class:`TRPParseError` (strict) when it breaks."""
        if self.mode in _PLAIN_MODES and self.pos == len(self.text) and "<" not in chunk:
            # Free text or a phrase with nothing pending takes text without '<' as it is (the
            # handlers would only move ``pos`` to the end): the common step while generating.
            text = self.text + chunk
            return _new(ScanState, (self.config, text, len(text), *self[3:]))
        m = Machine(self)
        m.text = self.text + chunk
        m.run(False)
        return m.freeze()

    def finish(self, chunk: str = "") -> ScanState:
        """The state after a last ``chunk`` and the end of input (strict: raises when the answer
        is incomplete). ``state.finish(text)`` equals ``state.feed(text).finish()``."""
        m = Machine(self)
        if chunk:
            m.text = self.text + chunk
            m.run(False)
        m.finish()
        return m.freeze()

    def result(self, positions: tuple[tuple[tuple[int, ...], ...], ...] | None) -> ParseResult:
        """The :class:`ParseResult` of a :meth:`finish`-ed state (``positions``: token input)."""
        out, task = self.out, self.task
        return _result(self.config, self.text, out, task.entries, task.decode, task.seen, positions)

    def finish_result(
        self,
        chunk: str,
        positions_of: Callable[[tuple], tuple] | None = None,
    ) -> ParseResult:
        """``self.finish(chunk).result(positions_of(offsets))`` without building the final
        state (the batch parsers' path: one pass, nothing frozen). ``positions_of`` maps the
        target offsets to token positions (token input)."""
        m = Machine(self)
        if chunk:
            m.text = self.text + chunk
            m.run(False)
        m.finish()
        out = Output(
            tuple(m.triplets),
            tuple(m.spans),
            tuple(m.offsets),
            tuple(m.texts),
            tuple(m.diagnostics),
        )
        positions = None if positions_of is None else positions_of(out.offsets)
        return _result(
            m.config, m.text, out, tuple(m.entries), m.task_decode, m.task_seen, positions
        )

    # ------------------------------------------------------------ what may follow
    @property
    def pending(self) -> str:
        """Text fed but not decided yet (a partial tag or literal, digits that may grow)."""
        return self.text[self.pos :]

    @property
    def accepting(self) -> bool:
        """True when ending the input here parses (strict) without error."""
        plan = self.task.plan
        return self.mode == BODY and (plan is None or self.task.plan_index == len(plan))

    @property
    def key(self) -> tuple[object, ...]:
        """A hashable summary: states with equal keys accept the same further text (apart from
        the patches already in the open VRT run, see :meth:`follow`) and have equally long
        completions. The constrained decoder caches its tables per key."""
        mode, task, trip = self.mode, self.task, self.triplet
        plan = None if task.plan is None else task.plan[task.plan_index :]
        if mode in TASK_MODES:
            extra: tuple[object, ...] = (
                task.entries,
                task.decode,
                self.text[task.name_start : self.pos] if mode == TASK_NAME else "",
                task.name,
                task.unit,
            )
        elif mode == PHRASE:
            extra = (len(self.text) > trip.concept_start,)
        elif mode == TARGETS:
            extra = (len(trip.targets), trip.after_sep, bool(trip.run))
        else:
            extra = (len(self.text) == 0,)
        return (self.config, mode, self.pending, plan, *extra)

    def follow(self) -> Follow:
        """What may come next (strict states only; see :class:`Follow`)."""
        cfg, mode, task = self.config, self.mode, self.task
        if not cfg.strict or mode in LENIENT_MODES:
            raise ValueError("follow() describes strict scanner states")
        text: str | None = None
        tags: tuple[str, ...] = ()
        literals: tuple[str, ...] = ()
        vrt = False
        run: tuple[int, ...] = ()
        entry = None if task.plan is None else task.plan[task.plan_index : task.plan_index + 1]
        if mode == BODY:
            text = "body"
            more = task.plan is None or task.plan_index < len(task.plan)
            tags = (PHRASE_OPEN,) if more else ()
            if not self.text and not task.seen:
                tags = (*tags, TASK_OPEN)
        elif mode == PHRASE:
            text = "phrase"
            tags = (PHRASE_CLOSE,) if len(self.text) > self.triplet.concept_start else ()
        elif mode == PHRASE_PLAN:
            literals = (entry[0].name + PHRASE_CLOSE,)  # type: ignore[index]
        elif mode == OPEN_UNIT:
            literals = (OPEN_UNIT_LIT,)
        elif mode == UNIT:
            literals = (entry[0].unit + UNIT_END,) if entry else cfg.unit_choices
        elif mode == TARGETS:
            m = Machine(self)
            literals, vrt = m.target_choices()
            run = self.triplet.run
        elif mode == TASK_HEAD:
            literals = (HEAD_TRUE, HEAD_FALSE)
        elif mode == TASK_ENTRY:
            literals = task_block.entry_choices(Machine(self))
        elif mode == TASK_NAME:
            text = "name"
            literals = (ENTRY_UNIT,) if self.pos > task.name_start else ()
        elif mode == TASK_UNIT:
            literals = cfg.task_unit_choices
        elif mode == TASK_NUM:
            text = "count"
        return Follow(text, tags, literals, vrt, run, self.pending, self.accepting)

    def completion(self, vrt_fill: int = 0) -> str:
        """The shortest-by-construction text that finishes a valid answer from here (strict):
        the tags and literals the grammar requires, ``"x"`` where text must be non-empty,
        ``[k]<REF>`` targets (or ``<|VRT_{vrt_fill}|>`` where only VRTs are allowed)."""
        parts = []
        state = self
        while True:
            step = Machine(state).completion_step(vrt_fill)
            if step is None:
                return "".join(parts)
            parts.append(step)
            state = state.feed(step)


def _result(
    config: ScanConfig,
    text: str,
    out: Output,
    entries: tuple[TaskEntry, ...],
    decode: bool | None,
    seen: bool,
    positions: tuple[tuple[tuple[int, ...], ...], ...] | None,
) -> ParseResult:
    texts = tuple(text[a:b] for a, b in out.texts)
    if config.latin1:
        texts = tuple(latin1_to_str(t) for t in texts)
        entries = tuple(TaskEntry(latin1_to_str(e.name), e.unit, e.num) for e in entries)
    return ParseResult(
        triplets=out.triplets,
        texts=texts,
        task=TaskBlock(decode=bool(decode), entries=entries) if seen else None,
        diagnostics=out.diagnostics,
        spans=out.spans,
        offsets=out.offsets,
        positions=positions,
    )


@lru_cache(maxsize=256)
def initial_state(
    *,
    strict: bool,
    units: tuple[str, ...],
    legacy_unit: str = "box",
    latin1: bool = False,
    allow_ref: bool = True,
    allow_vrt: bool = True,
) -> ScanState:
    """The state before any text (arguments as :class:`ScanConfig`). A value, so one per
    configuration is made and shared."""
    return ScanState(ScanConfig(strict, units, legacy_unit, latin1, allow_ref, allow_vrt))


class Machine:
    """The mutable working copy of a :class:`ScanState` for the span of one call.

    Handlers (here, in :mod:`task_block` and :mod:`legacy`) read and move it; :meth:`freeze`
    turns it back into a value. Lists are private copies, so the source state is never touched.
    """

    __slots__ = (
        "after_sep",
        "allow_ref",
        "allow_vrt",
        "c_start",
        "concept",
        "config",
        "diagnostics",
        "e_name",
        "e_unit",
        "entries",
        "g_count",
        "latin1",
        "legacy_unit",
        "line_start",
        "mode",
        "name_start",
        "offsets",
        "plan",
        "plan_index",
        "pos",
        "run_ids",
        "run_offs",
        "span_start",
        "spans",
        "strict",
        "t_offsets",
        "t_start",
        "targets",
        "task_decode",
        "task_seen",
        "task_unit_choices",
        "text",
        "texts",
        "triplets",
        "unit",
        "unit_choices",
        "unit_set",
        "units",
    )

    def __init__(self, s: ScanState) -> None:
        cfg = s.config
        self.config = cfg
        self.strict = cfg.strict
        self.units = cfg.units
        self.unit_choices = cfg.unit_choices
        self.task_unit_choices = cfg.task_unit_choices
        self.unit_set = cfg.unit_set
        self.legacy_unit = cfg.legacy_unit
        self.latin1 = cfg.latin1
        self.allow_ref = cfg.allow_ref
        self.allow_vrt = cfg.allow_vrt
        self.text = s.text
        self.pos = s.pos
        self.mode = s.mode
        self.span_start = s.span_start
        out, task, trip = s.out, s.task, s.triplet
        self.triplets = list(out.triplets)
        self.spans = list(out.spans)
        self.offsets = list(out.offsets)
        self.texts = list(out.texts)
        self.diagnostics = list(out.diagnostics)
        self.entries = list(task.entries)
        self.task_decode = task.decode
        self.task_seen = task.seen
        self.plan = task.plan
        self.plan_index = task.plan_index
        self.line_start = task.line_start
        self.name_start = task.name_start
        self.e_name = task.name
        self.e_unit = task.unit
        self.t_start = trip.start
        self.c_start = trip.concept_start
        self.concept = trip.concept
        self.unit = trip.unit
        self.after_sep = trip.after_sep
        self.targets = list(trip.targets)
        self.t_offsets = list(trip.target_offsets)
        self.run_ids = list(trip.run)
        self.run_offs = list(trip.run_offsets)
        self.g_count = trip.announced

    def freeze(self) -> ScanState:
        # ``tuple.__new__`` directly: the generated NamedTuple constructors (keyword handling,
        # defaults) cost several times more, and a freeze happens on every feed.
        return _new(
            ScanState,
            (
                self.config,
                self.text,
                self.pos,
                self.mode,
                self.span_start,
                _new(
                    Output,
                    (
                        tuple(self.triplets),
                        tuple(self.spans),
                        tuple(self.offsets),
                        tuple(self.texts),
                        tuple(self.diagnostics),
                    ),
                ),
                _new(
                    TaskProgress,
                    (
                        tuple(self.entries),
                        self.task_decode,
                        self.task_seen,
                        self.plan,
                        self.plan_index,
                        self.line_start,
                        self.name_start,
                        self.e_name,
                        self.e_unit,
                    ),
                ),
                _new(
                    TripletProgress,
                    (
                        self.t_start,
                        self.c_start,
                        self.concept,
                        self.unit,
                        self.after_sep,
                        tuple(self.targets),
                        tuple(self.t_offsets),
                        tuple(self.run_ids),
                        tuple(self.run_offs),
                        self.g_count,
                    ),
                ),
            ),
        )

    # ---------------------------------------------------------------- driving
    def run(self, final: bool) -> None:
        handlers = _HANDLERS
        while True:
            try:
                if not handlers[self.mode](self, final):
                    return
            except TRPParseError as err:
                if self.strict:
                    raise
                if not legacy.recover(self, err, final):
                    return

    def finish(self) -> None:
        """Consume the end of input."""
        self.run(True)
        n = len(self.text)
        if self.plan is not None and self.plan_index < len(self.plan):
            left = len(self.plan) - self.plan_index
            raise self.err(n, f"'<Phrase>' ({left} more triplet(s) announced by the task block)")
        self.texts.append((self.span_start, n))
        if not self.strict and self.task_seen:
            dec = latin1_to_str if self.latin1 else str
            want = [(dec(e.name), e.unit, e.num) for e in self.entries]
            got = [(t.concept, t.unit, len(t.targets)) for t in self.triplets]
            if want != got:
                self.diag(0, "error", "the task block does not match the triplets")

    # ---------------------------------------------------------------- helpers
    def reset_triplet(self, start: int) -> None:
        self.t_start = start
        self.c_start = start
        self.concept = ""
        self.unit = ""
        self.after_sep = False
        self.targets = []
        self.t_offsets = []
        self.run_ids = []
        self.run_offs = []
        self.g_count = None

    def err(self, offset: int, expected: str) -> TRPParseError:
        text = self.text
        found = "end of input" if offset >= len(text) else repr(text[offset : offset + 16])
        return TRPParseError(offset, expected, found)

    def diag(self, offset: int, kind: str, message: str) -> None:
        self.diagnostics.append(Diagnostic(offset=offset, kind=kind, message=message))  # type: ignore[arg-type]

    def angle(self, i: int, final: bool) -> object:
        """At ``text[i] == '<'``: a ``(tag, end, vrt_id)`` triple, ``WAIT``, or None (plain)."""
        text = self.text
        m = TAG.match(text, i)
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
            return WAIT if VRT_PARTIAL.fullmatch(text, i) else None
        rest = text[i:]
        if len(rest) < 9:
            for t in ANGLE_PREFIXES:
                if len(rest) < len(t) and t.startswith(rest):
                    return WAIT
        return None

    def expect(self, choices: tuple[str, ...], final: bool) -> str | None:
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
        raise self.err(p + best, " or ".join(repr(c) for c in choices) or "end of input")

    def close_run(self) -> None:
        if self.run_ids:
            self.targets.append(new_target(None, tuple(self.run_ids)))
            self.t_offsets.append(tuple(self.run_offs))
            self.run_ids = []
            self.run_offs = []

    def finish_triplet(self, end: int) -> None:
        self.close_run()
        concept = latin1_to_str(self.concept) if self.latin1 else self.concept
        self.triplets.append(new_triplet(concept, self.unit, tuple(self.targets)))
        self.offsets.append(tuple(self.t_offsets))
        self.spans.append((self.t_start, end))
        self.texts.append((self.span_start, self.t_start))
        self.span_start = end
        self.plan_index += 1
        self.mode = BODY
        self.pos = end
        self.reset_triplet(end)

    def plan_entry(self) -> TaskEntry | None:
        if self.plan is None:
            return None
        return self.plan[self.plan_index]

    # ---------------------------------------------------------------- handlers
    def body(self, final: bool) -> bool:
        text = self.text
        q = self.pos
        while True:
            i = text.find("<", q)
            if i < 0:
                self.pos = len(text)
                return False
            hit = self.angle(i, final)
            if hit is None:
                q = i + 1
                continue
            self.pos = i
            if hit is WAIT:
                return False
            tag, end, _ = hit  # type: ignore[misc]
            if tag == PHRASE_OPEN:
                if self.plan is not None and self.plan_index >= len(self.plan):
                    raise self.err(i, "free text (the task block announces no more triplets)")
                if self.fast_triplet(i):
                    return True
                self.reset_triplet(i)
                self.c_start = end
                self.pos = end
                self.mode = PHRASE_PLAN if self.plan is not None else PHRASE
                return True
            if tag == TASK_OPEN and i == 0 and not self.task_seen:
                self.task_seen = True
                self.pos = self.line_start = end
                self.mode = TASK_HEAD
                return True
            raise self.err(i, "free text or '<Phrase>'")

    def fast_triplet(self, i: int) -> bool:
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
                if kk in run or not self.allow_vrt:
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
                if slot != str(len(targets)) or not self.allow_ref:
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
            concept = latin1_to_str(concept)
        end = m.end()
        self.triplets.append(new_triplet(concept, unit, tuple(targets)))
        self.offsets.append(tuple(offsets))
        self.spans.append((i, end))
        self.texts.append((self.span_start, i))
        self.span_start = self.pos = end
        self.plan_index += 1
        return True

    def phrase(self, final: bool) -> bool:
        text = self.text
        q = self.pos
        while True:
            i = text.find("<", q)
            if i < 0:
                self.pos = len(text)
                if final:
                    raise self.err(len(text), "phrase text or '</Phrase>'")
                return False
            hit = self.angle(i, final)
            if hit is None:
                q = i + 1
                continue
            self.pos = i
            if hit is WAIT:
                return False
            tag, end, _ = hit  # type: ignore[misc]
            if tag != PHRASE_CLOSE:
                raise self.err(i, "phrase text or '</Phrase>'")
            if i == self.c_start:
                raise self.err(i, "phrase text")
            self.concept = text[self.c_start : i]
            self.pos = end
            self.mode = OPEN_UNIT
            return True

    def phrase_plan(self, final: bool) -> bool:
        entry = self.plan_entry()
        c = self.expect((entry.name + PHRASE_CLOSE,), final)  # type: ignore[union-attr]
        if c is None:
            return False
        self.concept = entry.name  # type: ignore[union-attr]
        self.pos += len(c)
        self.mode = OPEN_UNIT
        return True

    def open_unit(self, final: bool) -> bool:
        if self.expect((OPEN_UNIT_LIT,), final) is None:
            return False
        self.pos += len(OPEN_UNIT_LIT)
        self.mode = UNIT
        return True

    def unit_name(self, final: bool) -> bool:
        entry = self.plan_entry()
        choices = (entry.unit + UNIT_END,) if entry is not None else self.unit_choices
        c = self.expect(choices, final)
        if c is None:
            return False
        self.unit = c[: -len(UNIT_END)]
        self.pos += len(c)
        self.mode = TARGETS
        return True

    def target_choices(self) -> tuple[tuple[str, ...], bool]:
        """Literal choices in TARGETS (preferred first) and whether a VRT may come next."""
        count = len(self.targets) + (1 if self.run_ids else 0)
        entry = self.plan_entry()
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

    def target_list(self, final: bool) -> bool:
        text, p = self.text, self.pos
        choices, can_vrt = self.target_choices()
        if can_vrt:
            m = VRT_PATTERN.match(text, p)
            if m is not None:
                k = int(m.group(1))
                if k in self.run_ids:
                    raise self.err(p, "a VRT not already in this run")
                self.run_ids.append(k)
                self.run_offs.append(p)
                self.after_sep = False
                self.pos = m.end()
                return True
            choices = (*choices, VRT_PREFIX)
        c = self.expect(choices, final)
        if c is None:
            return False
        if c == VRT_PREFIX:
            if not final and VRT_PARTIAL.fullmatch(text, p):
                return False
            raise self.err(VRT_BROKEN.match(text, p).end(), "a VRT token '<|VRT_k|>'")  # type: ignore[union-attr]
        if c == ")":
            self.finish_triplet(p + 1)
            return True
        self.close_run()
        if c == ", ":
            self.after_sep = True
        else:
            self.targets.append(new_target(len(self.targets), None))
            self.t_offsets.append((p + len(c) - 5,))
            self.after_sep = False
        self.pos = p + len(c)
        return True

    # ---------------------------------------------------------------- completion
    def completion_step(self, vrt_fill: int) -> str | None:
        """Text that moves a strict scanner towards acceptance (None when accepting)."""
        mode = self.mode
        pend = self.text[self.pos :]
        if mode == BODY:
            accepting = self.plan is None or self.plan_index == len(self.plan)
            return None if accepting else PHRASE_OPEN
        if mode == PHRASE:
            # The whole tag even after a partial one: that stays phrase text, and the tag is
            # then one token rather than the tail of a spelled-out one.
            return PHRASE_CLOSE if len(self.text) > self.c_start else "x" + PHRASE_CLOSE
        if mode == TASK_NAME:
            if self.pos == self.name_start:
                # Nothing of the name is decided (a pending " Unit" may still become name text).
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
            raise RuntimeError(f"no completion in mode {mode} after {self.text[-32:]!r}")
        entry = self.plan_entry()
        options: dict[int, Callable[[], tuple[str, ...]]] = {
            PHRASE_PLAN: lambda: (entry.name + PHRASE_CLOSE,),  # type: ignore[union-attr]
            OPEN_UNIT: lambda: (OPEN_UNIT_LIT,),
            UNIT: lambda: (entry.unit + UNIT_END,) if entry is not None else self.unit_choices,
            TASK_HEAD: lambda: (HEAD_FALSE, HEAD_TRUE),
            TASK_ENTRY: lambda: task_block.entry_choices(self),
            TASK_UNIT: lambda: self.task_unit_choices,
        }
        for c in options[mode]():
            if c.startswith(pend):
                return c[len(pend) :]
        raise RuntimeError(f"no completion in mode {mode} after {self.text[-32:]!r}")


def _rest(lit: str, pend: str) -> str:
    return lit[len(pend) :] if pend and lit.startswith(pend) else lit


_HANDLERS: dict[int, Callable[[Machine, bool], bool]] = {
    BODY: Machine.body,
    PHRASE: Machine.phrase,
    PHRASE_PLAN: Machine.phrase_plan,
    OPEN_UNIT: Machine.open_unit,
    UNIT: Machine.unit_name,
    TARGETS: Machine.target_list,
    LEGACY: legacy.legacy_run,
    TASK_HEAD: task_block.task_head,
    TASK_ENTRY: task_block.task_entry,
    TASK_NAME: task_block.task_name,
    TASK_UNIT: task_block.task_unit,
    TASK_NUM: task_block.task_num,
    TASK_LINES: task_block.task_lines,
}
