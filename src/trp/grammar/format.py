"""Formatting annotations into canonical TRP answers, one function per task family."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trp.grammar.tokens import (
    PHRASE_CLOSE,
    PHRASE_OPEN,
    REF,
    TASK_CLOSE,
    TASK_OPEN,
    UNIT_CLOSE,
    UNIT_OPEN,
    VPT,
    check_free_text,
)
from trp.grammar.types import Target, TaskBlock, Triplet
from trp.grammar.units import resolve_units

__all__ = [
    "FormattedAnswer",
    "VisualPrompt",
    "format_answer",
    "format_depth",
    "format_detection",
    "format_grounded_caption",
    "format_keypoints",
    "format_rec",
    "format_reg",
    "format_res",
    "format_segmentation",
    "format_task_block",
    "format_triplet",
    "format_vpt_question",
    "format_vqa",
]


def _check_concept(concept: str, *, in_task: bool) -> None:
    check_free_text(concept, "concept")
    if not concept:
        raise ValueError("concept must not be empty")
    if in_task and ("\n" in concept or (concept + " Unit: ").find(" Unit: ") != len(concept)):
        raise ValueError(f"concept {concept!r} cannot be written in a task line")


def format_triplet(triplet: Triplet, *, units: Iterable[str] | None = None) -> str:
    """``<Phrase>c</Phrase>(<Unit>u</Unit>[0]<REF>[1]<REF>)``; VRT runs are joined by ``", "``.

    REF slots must number the targets in order (``Target(slot=j)`` for target ``j``) and a VRT
    run must not repeat a patch, as the strict grammar requires.
    """
    if not isinstance(triplet, Triplet):
        raise TypeError(f"expected a Triplet, got {type(triplet).__name__}")
    _check_concept(triplet.concept, in_task=False)
    if triplet.unit not in resolve_units(units):
        raise ValueError(f"unit {triplet.unit!r} is not registered ({resolve_units(units)})")
    if not triplet.targets:
        raise ValueError(f"triplet {triplet.concept!r} has no targets")
    parts = [PHRASE_OPEN, triplet.concept, PHRASE_CLOSE, "(", UNIT_OPEN, triplet.unit, UNIT_CLOSE]
    prev_vrt = False
    for j, t in enumerate(triplet.targets):
        if t.slot is not None:
            if t.slot != j:
                raise ValueError(
                    f"target {j} of {triplet.concept!r} has slot {t.slot}, expected {j}"
                )
            parts.append(f"[{j}]{REF}")
            prev_vrt = False
        else:
            assert t.patches is not None
            if len(set(t.patches)) != len(t.patches):
                raise ValueError(f"VRT run {t.patches} repeats a patch")
            if prev_vrt:
                parts.append(", ")
            parts.extend(f"<|VRT_{k}|>" for k in t.patches)
            prev_vrt = True
    parts.append(")")
    return "".join(parts)


def format_task_block(task: TaskBlock) -> str:
    """The ``<Task>`` block text, ending with a newline."""
    if not isinstance(task, TaskBlock):
        raise TypeError(f"expected a TaskBlock, got {type(task).__name__}")
    if task.decode != bool(task.entries):
        raise ValueError("decode must be True exactly when the block lists entries")
    lines = [TASK_OPEN]
    if task.decode:
        lines.append("Unit decode (True). Class name, target unit and number:")
        for e in task.entries:
            _check_concept(e.name, in_task=True)
            if isinstance(e.num, bool) or not isinstance(e.num, int) or e.num < 1:
                raise ValueError(f"task entry {e.name!r}: num must be an int >= 1")
            lines.append(f"- Name: {e.name} Unit: {e.unit} Num: {e.num}")
    else:
        lines.append("Unit decode (False).")
    lines.append(TASK_CLOSE)
    return "\n".join(lines) + "\n"


def format_answer(
    triplets: Sequence[Triplet],
    *,
    texts: Sequence[str] | None = None,
    task_block: bool = False,
    units: Iterable[str] | None = None,
) -> str:
    """An answer from triplets and the free text around them.

    ``texts`` (``len(triplets) + 1`` strings) go before, between and after the triplets; by
    default triplets are joined with ``", "`` and end with ``"."``. ``task_block`` prepends the
    block announcing exactly these triplets (``Unit decode (False).`` when there are none).
    """
    triplets = tuple(triplets)
    body = [format_triplet(t, units=units) for t in triplets]
    if texts is None:
        texts = ["", *([", "] * max(len(triplets) - 1, 0)), "." if triplets else ""]
        if not triplets:
            texts = [""]
    texts = list(texts)
    if len(texts) != len(triplets) + 1:
        raise ValueError(
            f"need {len(triplets) + 1} texts for {len(triplets)} triplets, got {len(texts)}"
        )
    for s in texts:
        check_free_text(s, "free text", forbid=(VPT,))
    out = [texts[0]]
    for t, s in zip(body, texts[1:]):
        out += [t, s]
    head = ""
    if task_block:
        for t in triplets:
            _check_concept(t.concept, in_task=True)
        head = format_task_block(TaskBlock.for_triplets(triplets))
    return head + "".join(out)


@dataclass(frozen=True)
class FormattedAnswer:
    """An answer and the annotation riding on each of its targets.

    ``labels[t][j]`` is the payload given for target ``j`` of triplet ``t`` (a box, a mask, a
    mapping with keypoints, …), in the order the parser returns targets, so losses can match
    decoder outputs to annotations by (triplet, instance).
    """

    text: str
    triplets: tuple[Triplet, ...]
    labels: tuple[tuple[Any, ...], ...]


def _targets(n: int, patches: Sequence[Sequence[int]] | None) -> tuple[Target, ...]:
    if patches is None:
        return tuple(Target(slot=j) for j in range(n))
    if len(patches) != n:
        raise ValueError(f"need one VRT run per object ({n}), got {len(patches)}")
    return tuple(Target(patches=tuple(int(k) for k in run)) for run in patches)


def _answer(
    groups: list[tuple[str, list[Any], Any]],
    unit: str,
    task_block: bool,
    texts: Sequence[str] | None = None,
) -> FormattedAnswer:
    triplets = tuple(Triplet(c, unit, _targets(len(p), runs)) for c, p, runs in groups)
    text = format_answer(triplets, texts=texts, task_block=task_block)
    return FormattedAnswer(text, triplets, tuple(tuple(p) for _, p, _ in groups))


def format_rec(
    expression: str,
    *,
    payload: Any = None,
    patches: Sequence[int] | None = None,
    unit: str = "box",
    task_block: bool = False,
) -> FormattedAnswer:
    """REC: ``<Phrase>expr</Phrase>(<Unit>box</Unit>[0]<REF>).`` (or a VRT run from ``patches``)."""
    runs = None if patches is None else [patches]
    return _answer([(expression, [payload], runs)], unit, task_block)


def format_res(
    expression: str,
    *,
    payload: Any = None,
    patches: Sequence[int] | None = None,
    task_block: bool = False,
) -> FormattedAnswer:
    """RES: REC with the ``mask`` unit."""
    return format_rec(
        expression, payload=payload, patches=patches, unit="mask", task_block=task_block
    )


def format_vqa(answer: str, *, task_block: bool = False) -> FormattedAnswer:
    """Plain text answer (no unit); the task block says ``Unit decode (False).``."""
    check_free_text(answer, "answer", forbid=(VPT,))
    text = format_answer((), texts=[answer], task_block=task_block)
    return FormattedAnswer(text, (), ())


def format_reg(description: str, *, task_block: bool = False) -> FormattedAnswer:
    """REG (region → phrase): the description of a ``[VPT]`` region, as plain text."""
    return format_vqa(description, task_block=task_block)


def _group(
    instances: Sequence[tuple[str, Any]], patches: Sequence[Sequence[int]] | None
) -> list[tuple[str, list[Any], Any]]:
    if patches is not None and len(patches) != len(instances):
        raise ValueError(f"need one VRT run per instance ({len(instances)}), got {len(patches)}")
    order: dict[str, tuple[list[Any], list[Sequence[int]]]] = {}
    for i, inst in enumerate(instances):
        if not isinstance(inst, tuple) or len(inst) != 2:
            raise TypeError(f"instance {i} must be a (category, payload) tuple")
        payloads, runs = order.setdefault(inst[0], ([], []))
        payloads.append(inst[1])
        if patches is not None:
            runs.append(patches[i])
    return [(c, p, runs if patches is not None else None) for c, (p, runs) in order.items()]


def format_detection(
    instances: Sequence[tuple[str, Any]],
    *,
    unit: str = "box",
    patches: Sequence[Sequence[int]] | None = None,
    task_block: bool = False,
    empty: str = "None.",
) -> FormattedAnswer:
    """Detection (multi-class, multi-instance): one triplet per category, first-seen order.

    ``instances`` are ``(category, payload)``; ``patches`` optionally one VRT run per instance.
    With no instances the answer is the plain text ``empty``.
    """
    if not instances:
        return format_vqa(empty, task_block=task_block)
    return _answer(_group(instances, patches), unit, task_block)


def format_segmentation(
    instances: Sequence[tuple[str, Any]],
    *,
    patches: Sequence[Sequence[int]] | None = None,
    task_block: bool = False,
    empty: str = "None.",
) -> FormattedAnswer:
    """Instance segmentation: detection with the ``mask`` unit."""
    return format_detection(
        instances, unit="mask", patches=patches, task_block=task_block, empty=empty
    )


def format_keypoints(
    instances: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    patches: Sequence[Sequence[int]] | None = None,
    task_block: bool = False,
    empty: str = "None.",
) -> FormattedAnswer:
    """Keypoints: one ``<Unit>keypoint</Unit>`` triplet per category, one target per instance.

    Each payload (a mapping with a ``"keypoints"`` entry, e.g. ``Tensor[K, 3]``) rides on its
    instance's target. The unit is ``keypoint``, not ``box``, because routing is per triplet: an
    answer that also carries ``box`` triplets (build it with :func:`format_answer`) sends those
    to the box head and these to the keypoint head.
    """
    for i, inst in enumerate(instances):
        if not isinstance(inst, tuple) or len(inst) != 2:
            raise TypeError(f"instance {i} must be a (category, payload) tuple")
        if not isinstance(inst[1], Mapping) or "keypoints" not in inst[1]:
            raise ValueError(f"instance {i}: payload must be a mapping with 'keypoints'")
    return format_detection(
        instances, unit="keypoint", patches=patches, task_block=task_block, empty=empty
    )


def format_depth(
    *,
    payload: Any = None,
    phrase: str = "depth map",
    patches: Sequence[int] | None = None,
    task_block: bool = False,
) -> FormattedAnswer:
    """Depth: ``<Phrase>depth map</Phrase>(<Unit>depth</Unit>[0]<REF>).``."""
    return format_rec(phrase, payload=payload, patches=patches, unit="depth", task_block=task_block)


def format_grounded_caption(
    caption: str,
    spans: Sequence[tuple[int, int, Sequence[Any]]],
    *,
    unit: str = "box",
    patches: Sequence[Sequence[Sequence[int]]] | None = None,
    task_block: bool = False,
) -> FormattedAnswer:
    """Grounded captioning: each ``(start, end, payloads)`` span of ``caption`` becomes a triplet
    in place, grounding ``len(payloads)`` objects; ``patches[s]`` optionally gives span ``s`` one
    VRT run per object. Spans must be non-empty, in order and disjoint.
    """
    if not isinstance(caption, str):
        raise TypeError("caption must be a str")
    if patches is not None and len(patches) != len(spans):
        raise ValueError(f"need VRT runs for each of the {len(spans)} spans, got {len(patches)}")
    texts, groups, at = [], [], 0
    for s, (start, end, payloads) in enumerate(spans):
        if not (at <= start < end <= len(caption)):
            raise ValueError(f"span {s} ({start}, {end}) is empty, out of order or out of range")
        if not payloads:
            raise ValueError(f"span {s} grounds no object")
        texts.append(caption[at:start])
        groups.append((caption[start:end], list(payloads), None if patches is None else patches[s]))
        at = end
    texts.append(caption[at:])
    return _answer(groups, unit, task_block, texts)


_PROMPT_KINDS = ("point", "box", "scribble", "mask")


@dataclass(frozen=True)
class VisualPrompt:
    """A region the question points at; every kind becomes a binary mask for the prompt encoder.

    ``data``: ``point`` (x, y); ``box`` (x0, y0, x1, y1); ``scribble`` a sequence of (x, y)
    points; ``mask`` a ``Tensor[H, W]`` (bool). Coordinates are pixels of the image.
    """

    kind: Literal["point", "box", "scribble", "mask"]
    data: Any

    def __post_init__(self) -> None:
        if self.kind not in _PROMPT_KINDS:
            raise ValueError(f"kind must be one of {_PROMPT_KINDS}, got {self.kind!r}")

    def to_mask(self, height: int, width: int, *, radius: int = 2) -> torch.Tensor:
        """``Tensor[height, width]`` bool: points/scribbles as disks of ``radius`` pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if self.kind == "mask":
            mask = torch.as_tensor(self.data)
            if mask.shape != (height, width):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(height, width)}")
            return mask.bool()
        ys = torch.arange(height).view(-1, 1)
        xs = torch.arange(width).view(1, -1)
        if self.kind == "box":
            x0, y0, x1, y1 = (float(v) for v in self.data)
            if x1 < x0 or y1 < y0:
                raise ValueError(
                    f"box must be (x0, y0, x1, y1) with x0 <= x1, y0 <= y1: {self.data}"
                )
            return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        pts = [self.data] if self.kind == "point" else list(self.data)
        if not pts:
            raise ValueError("a scribble needs at least one point")
        mask = torch.zeros(height, width, dtype=torch.bool)
        # Densify the polyline so the disks overlap into a stroke.
        dense = [pts[0]]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            steps = max(1, int(max(abs(bx - ax), abs(by - ay)) / max(radius, 1)) + 1)
            dense += [
                (ax + (bx - ax) * s / steps, ay + (by - ay) * s / steps)
                for s in range(1, steps + 1)
            ]
        for x, y in dense:
            mask |= (xs - float(x)) ** 2 + (ys - float(y)) ** 2 <= radius**2
        return mask


def format_vpt_question(question: str, prompts: Sequence[VisualPrompt]) -> str:
    """Replace each ``{}`` of ``question`` by the ``[VPT]`` placeholder of the matching prompt."""
    check_free_text(question, "question")
    if question.count("{}") != len(prompts):
        raise ValueError(f"question has {question.count('{}')} '{{}}' for {len(prompts)} prompts")
    if not all(isinstance(p, VisualPrompt) for p in prompts):
        raise TypeError("prompts must be VisualPrompt instances")
    return question.replace("{}", VPT)
