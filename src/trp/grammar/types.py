"""Value types of the TRP grammar: targets, triplets, the task block and parse results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Diagnostic", "ParseResult", "Target", "TaskBlock", "TaskEntry", "Triplet"]


@dataclass(frozen=True, slots=True, init=False)
class Target:
    """One object a triplet points at: a latent ``[slot]<REF>`` or a run of VRTs.

    Build with ``Target(slot=i)`` or ``Target(patches=(k0, k1, …))`` (local patch indices, one
    run = one object). ``kind`` is ``"ref"`` or ``"vrt"``.
    """

    slot: int | None
    patches: tuple[int, ...] | None

    def __init__(self, *, slot: int | None = None, patches: object = None) -> None:
        if (slot is None) == (patches is None):
            raise ValueError("a Target is either a slot (<REF>) or patches (VRT run), not both")
        if slot is not None:
            if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                raise ValueError(f"slot must be an int >= 0, got {slot!r}")
            object.__setattr__(self, "slot", slot)
            object.__setattr__(self, "patches", None)
            return
        if isinstance(patches, str | bytes):
            raise TypeError("patches must be a sequence of ints")
        try:
            run = tuple(patches)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"patches must be a sequence of ints, got {patches!r}") from None
        if not run:
            raise ValueError("a VRT target needs at least one patch")
        for p in run:
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ValueError(f"patch indices must be ints >= 0, got {p!r}")
        object.__setattr__(self, "slot", None)
        object.__setattr__(self, "patches", run)

    @property
    def kind(self) -> Literal["ref", "vrt"]:
        return "ref" if self.slot is not None else "vrt"


@dataclass(frozen=True, slots=True)
class Triplet:
    """``<Phrase>concept</Phrase>(<Unit>unit</Unit> targets…)``: one concept, one unit."""

    concept: str
    unit: str
    targets: tuple[Target, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.concept, str):
            raise TypeError(f"concept must be a str, got {type(self.concept).__name__}")
        if not isinstance(self.unit, str) or not self.unit:
            raise ValueError(f"unit must be a non-empty str, got {self.unit!r}")
        targets = tuple(self.targets)
        if not all(isinstance(t, Target) for t in targets):
            raise TypeError("targets must be Target instances")
        object.__setattr__(self, "targets", targets)


def new_target(slot: int | None, patches: tuple[int, ...] | None) -> Target:
    """A Target from values the parser already validated (skips the checks of ``__init__``)."""
    t = object.__new__(Target)
    object.__setattr__(t, "slot", slot)
    object.__setattr__(t, "patches", patches)
    return t


def new_triplet(concept: str, unit: str, targets: tuple[Target, ...]) -> Triplet:
    """A Triplet from values the parser already validated."""
    t = object.__new__(Triplet)
    object.__setattr__(t, "concept", concept)
    object.__setattr__(t, "unit", unit)
    object.__setattr__(t, "targets", targets)
    return t


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One line of the task block: ``- Name: {name} Unit: {unit} Num: {num}``."""

    name: str
    unit: str
    num: int


@dataclass(frozen=True, slots=True)
class TaskBlock:
    """The optional ``<Task>`` block: whether units are decoded and, per triplet, its plan."""

    decode: bool
    entries: tuple[TaskEntry, ...] = ()

    @classmethod
    def for_triplets(cls, triplets: tuple[Triplet, ...] | list[Triplet]) -> TaskBlock:
        """The block that announces exactly ``triplets`` (``decode`` is False when empty)."""
        entries = tuple(TaskEntry(t.concept, t.unit, len(t.targets)) for t in triplets)
        return cls(decode=bool(entries), entries=entries)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """What lenient parsing repaired or skipped.

    ``kind`` is ``"legacy"`` for an accepted legacy form (docs/grammar.md) and ``"error"`` for text
    that strict parsing rejects; ``offset`` is a character offset into the parsed text.
    """

    offset: int
    kind: Literal["error", "legacy"]
    message: str


@dataclass(frozen=True, slots=True)
class ParseResult:
    """A parsed answer.

    ``texts`` are the free-text spans around the triplets (``len(triplets) + 1`` of them);
    ``spans[t]`` is the ``(start, end)`` character span of triplet ``t``; ``offsets[t][j]`` the
    character offsets of the target tokens of target ``j`` (one ``<REF>``, or each VRT of the
    run); ``positions`` the same as token indices, only for token-id input (else ``None``).
    """

    triplets: tuple[Triplet, ...]
    texts: tuple[str, ...]
    task: TaskBlock | None = None
    diagnostics: tuple[Diagnostic, ...] = ()
    spans: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    offsets: tuple[tuple[tuple[int, ...], ...], ...] = field(default=(), compare=False)
    positions: tuple[tuple[tuple[int, ...], ...], ...] | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """True when nothing was repaired (legacy forms included)."""
        return not self.diagnostics
