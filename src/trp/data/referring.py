"""Referring expressions for synthetic scenes, generated only when they are unambiguous.

An expression is a structured :class:`Referent` (shape, optional colour, optional size word,
optional position word or relation to an anchor object) rendered to text by
:meth:`Referent.text`. :func:`resolve` is the listener: it returns every object of a scene an
expression may denote. :func:`refer` is the speaker: it proposes expressions for a target and
keeps the first one the listener resolves to exactly that target, both when read generously
(near-ties count as matches) and strictly (the target must satisfy it by a clear margin).

Spatial words are judged on the centres of the visible boxes: "on the left" = smallest centre
x among the candidates, "above" = centre y smaller than the anchor's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from trp.data.scene import Scene

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SIZES: tuple[str, ...] = ("big", "small")
EXPRESSION_KINDS: tuple[str, ...] = ("attribute", "position", "relation")

# Margins that separate "clearly true" from "arguably true": positions as a fraction of the
# image side, sizes as an area ratio.
POSITION_MARGIN = 0.06
SIZE_RATIO = 1.5

_POSITION_TEXT = {"left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                  "below": "below"}


@dataclass(frozen=True)
class Referent:
    """A structured referring expression.

    Attributes:
        shape: class name (``"circle"``, ...).
        color: colour name, or ``None`` when not mentioned.
        size: ``"big"`` / ``"small"`` (largest / smallest of the matching objects) or ``None``.
        position: one of ``POSITIONS`` (extreme of the matching objects) or ``None``.
        relation: one of ``RELATIONS`` relative to ``anchor``, or ``None``.
        anchor: the object the relation is about (shape and colour only).
    """

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None
    relation: str | None = None
    anchor: Referent | None = None

    @property
    def kind(self) -> str:
        """``"relation"``, ``"position"`` or ``"attribute"``."""
        if self.relation is not None:
            return "relation"
        return "position" if self.position is not None else "attribute"

    def noun_phrase(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape) if w is not None)

    def text(self) -> str:
        """English text, e.g. ``"red circle"``, ``"the big blue square"``,
        ``"the circle on the left"``, ``"the triangle above the star"``."""
        phrase = self.noun_phrase()
        if self.relation is not None:
            assert self.anchor is not None
            return f"the {phrase} {_RELATION_TEXT[self.relation]} the {self.anchor.noun_phrase()}"
        if self.position is not None:
            return f"the {phrase} {_POSITION_TEXT[self.position]}"
        # A bare colour + shape reads naturally without an article ("red circle").
        return phrase if self.color is not None and self.size is None else f"the {phrase}"


@dataclass(frozen=True)
class SceneFacts:
    """What a listener sees of each object: class, colour, visible area and centre."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    areas: tuple[float, ...]
    centers: tuple[tuple[float, float], ...]
    side: float

    @classmethod
    def from_scene(cls, scene: Scene) -> SceneFacts:
        b = scene.boxes.astype(np.float64)
        centers = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
        return cls(
            shapes=tuple(scene.class_name(i) for i in range(scene.num_shapes)),
            colors=tuple(scene.color_name(i) for i in range(scene.num_shapes)),
            areas=tuple(float(a) for a in scene.visible_areas),
            centers=tuple((float(x), float(y)) for x, y in centers),
            side=float(min(scene.label_map.shape)),
        )


def _coordinate(facts: SceneFacts, i: int, word: str) -> float:
    """A coordinate that is smallest for the object best described by ``word``."""
    x, y = facts.centers[i]
    return {"left": x, "right": -x, "top": y, "bottom": -y, "left of": x, "right of": -x,
            "above": y, "below": -y}[word]


def resolve(ref: Referent, facts: SceneFacts, *, generous: bool) -> list[int]:
    """Indices of the objects ``ref`` may denote.

    ``generous=True`` also counts near-ties (objects a listener could take for the referent);
    ``generous=False`` counts only objects that satisfy every word by the margin. Size and
    position words need at least two objects of the described shape/colour (a lone circle is
    not "the circle on the left"), otherwise nothing matches.
    """
    slack = POSITION_MARGIN * facts.side * (1 if generous else -1)
    log_ratio = math.log(SIZE_RATIO) * (1 if generous else -1)
    cands = [i for i, s in enumerate(facts.shapes)
             if s == ref.shape and (ref.color is None or facts.colors[i] == ref.color)]
    if ref.relation is not None:
        if ref.anchor is None:
            raise ValueError("a relation needs an anchor")
        anchors = resolve(ref.anchor, facts, generous=True)
        if len(anchors) != 1:
            return []
        a = anchors[0]
        ref_value = _coordinate(facts, a, ref.relation)
        # "above the star": y smaller than the star's (by the margin when strict).
        cands = [i for i in cands
                 if i != a and _coordinate(facts, i, ref.relation) < ref_value + slack]
    if ref.size is not None:
        if len(cands) < 2:
            return []
        sign = 1.0 if ref.size == "big" else -1.0
        logs = {i: sign * math.log(facts.areas[i]) for i in cands}
        cands = [i for i in cands if all(logs[i] > logs[j] - log_ratio for j in cands if j != i)]
    if ref.position is not None:
        if len(cands) < 2:
            return []
        coord = {i: _coordinate(facts, i, ref.position) for i in cands}
        cands = [i for i in cands if all(coord[i] < coord[j] + slack for j in cands if j != i)]
    return cands


def is_unambiguous(ref: Referent, facts: SceneFacts, target: int) -> bool:
    """True when ``ref`` clearly denotes ``target`` and could not be read as any other object."""
    return resolve(ref, facts, generous=True) == [target] and target in resolve(
        ref, facts, generous=False
    )


def _proposals(
    kind: str, facts: SceneFacts, target: int, rng: np.random.Generator
) -> Iterator[Referent]:
    """Candidate expressions of one kind for ``target``, in random order, built lazily."""
    shape, color = facts.shapes[target], facts.colors[target]
    colors = (None, color) if rng.random() < 0.5 else (color, None)
    if kind == "attribute":
        options = [Referent(shape), Referent(shape, color),
                   *(Referent(shape, c, size=s) for s in SIZES for c in colors)]
        yield from (options[j] for j in rng.permutation(len(options)))
    elif kind == "position":
        for p in rng.permutation(len(POSITIONS)):
            for c in colors:
                yield Referent(shape, c, position=POSITIONS[p])
    else:
        # Dimensions are shuffled independently: cheap, and every combination stays reachable.
        for a in rng.permutation(len(facts.shapes)):
            if a == target:
                continue
            anchors = (Referent(facts.shapes[a]), Referent(facts.shapes[a], facts.colors[a]))
            for rel in rng.permutation(len(RELATIONS)):
                for c in colors:
                    for anchor in anchors:
                        yield Referent(shape, c, relation=RELATIONS[rel], anchor=anchor)


def _kind_order(rng: np.random.Generator, kind_weights: tuple[float, float, float]) -> list[str]:
    """Expression kinds with non-zero weight, in a random weighted order."""
    weights = np.asarray(kind_weights, dtype=np.float64)
    if weights.shape != (3,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"kind_weights must be 3 non-negative numbers, got {kind_weights}")
    # Weighted order without replacement via exponential race keys (u ** (1 / w), largest
    # first): far cheaper than rng.choice(replace=False, p=...), same distribution.
    with np.errstate(divide="ignore"):
        keys = rng.random(3) ** (1.0 / weights)
    return [EXPRESSION_KINDS[k] for k in np.argsort(-keys) if weights[k] > 0]


def refer(
    facts: SceneFacts,
    target: int,
    rng: np.random.Generator,
    *,
    kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> Referent | None:
    """An unambiguous expression for ``target``, or ``None`` when none exists.

    The kind (attribute / position / relation) is drawn with ``kind_weights``; when it has no
    unambiguous proposal, the remaining kinds with non-zero weight are tried, in an order drawn
    the same way. Within a kind, proposals are tried in random order.
    """
    for kind in _kind_order(rng, kind_weights):
        for ref in _proposals(kind, facts, target, rng):
            if is_unambiguous(ref, facts, target):
                return ref
    return None


def refer_any(
    facts: SceneFacts,
    rng: np.random.Generator,
    *,
    kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> tuple[int, Referent] | None:
    """A random object of the scene with an unambiguous expression: ``(target, referent)``.

    The kind is drawn first (as in :func:`refer`) and the target second, among all objects in
    random order, so a kind that only some objects admit (positions need two objects of the
    same shape) keeps close to its weight. ``None`` when no object has any expression.
    """
    targets = rng.permutation(len(facts.shapes)).tolist()
    for kind in _kind_order(rng, kind_weights):
        for target in targets:
            for ref in _proposals(kind, facts, target, rng):
                if is_unambiguous(ref, facts, target):
                    return target, ref
    return None
