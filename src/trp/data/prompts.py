"""Visual prompts (point, box, scribble, mask) rendered as binary masks, as REF-VLM feeds them.

Every prompt is drawn from the *visible* mask of its object, so it always touches the object.
"""

from __future__ import annotations

import numpy as np

PROMPT_TYPES: tuple[str, ...] = ("point", "box", "scribble", "mask")


def _stamp(points_xy: np.ndarray, radius: float, height: int, width: int) -> np.ndarray:
    """Bool ``[H, W]``: union of discs of ``radius`` (pixels) around ``points_xy`` ``[P, 2]``."""
    out = np.zeros((height, width), dtype=bool)
    k = int(np.ceil(radius))
    dy, dx = np.mgrid[-k : k + 1, -k : k + 1]
    disc = dx**2 + dy**2 <= radius**2
    dx, dy = dx[disc], dy[disc]  # offsets of the disc's pixels
    cols = np.floor(points_xy[:, 0]).astype(np.int64)[:, None] + dx
    rows = np.floor(points_xy[:, 1]).astype(np.int64)[:, None] + dy
    keep = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    out[rows[keep], cols[keep]] = True
    return out


def visual_prompt(
    kind: str, mask: np.ndarray, box: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A binary prompt mask ``[H, W]`` for one object.

    Args:
        kind: ``"point"`` (a small disc on a random visible pixel), ``"box"`` (the filled box),
            ``"scribble"`` (a thick polyline through 3 random visible pixels) or ``"mask"``
            (the visible mask itself).
        mask: bool ``[H, W]`` visible mask of the object; must not be empty.
        box: ``[4]`` xyxy box of the object in pixels.
        rng: source of randomness.
    """
    if kind not in PROMPT_TYPES:
        raise ValueError(f"unknown prompt type {kind!r}; expected one of {PROMPT_TYPES}")
    height, width = mask.shape
    if kind == "mask":
        return mask.copy()
    if kind == "box":
        out = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        out[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)] = True
        return out
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("cannot draw a visual prompt on an empty mask")
    thickness = max(1.0, min(height, width) / 64)
    if kind == "point":
        j = rng.integers(rows.size)
        return _stamp(np.array([[cols[j] + 0.5, rows[j] + 0.5]]), thickness, height, width)
    picks = rng.integers(rows.size, size=3)
    anchors = np.stack([cols[picks], rows[picks]], axis=1) + 0.5  # 3 x 2
    # Dense samples along the two segments (one per pixel of length) make a connected stroke.
    t = np.linspace(0.0, 1.0, int(np.abs(np.diff(anchors, axis=0)).sum()) + 2)[:, None]
    stroke = np.concatenate([a + t * (b - a) for a, b in zip(anchors[:-1], anchors[1:])])
    return _stamp(stroke, thickness, height, width)
