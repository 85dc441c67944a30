"""Synthetic scenes of coloured shapes: sampling, rasterisation and dense ground truth.

A scene is a background plus 2–5 shapes painted back to front (index 0 is the farthest). All
masks are computed with numpy on coordinate grids restricted to each shape's bounding square;
pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` and is inside a shape when its
centre ``(col + 0.5, row + 0.5)`` is. Boxes use the same continuous frame (xyxy, so a box
around pixel columns 3..7 is ``x0 = 3, x1 = 8``).

Shape geometry: centre ``(cx, cy)``, circumradius ``r`` and a rotation ``angle`` in
``[0, 2*pi / n_sym)`` (the rotation period of the shape), measured clockwise from 12 o'clock.

Keypoints, per class (vertices clockwise from 12 o'clock, then the centre):

* ``circle`` (5): top, right, bottom, left extreme points, centre
* ``square`` (5): 4 corners, centre
* ``triangle`` (4): 3 corners, centre
* ``star`` (6): 5 outer tips, centre
* ``cross`` (5): 4 arm ends (middle of each arm's end edge), centre

They are padded to ``MAX_KEYPOINTS`` rows; padded rows are ``(0, 0, 0)``. Visibility follows
COCO: 2 = visible, 1 = hidden behind a shape painted later, 0 = padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 225),
    "yellow": (238, 215, 40),
    "purple": (145, 60, 190),
    "orange": (243, 140, 30),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
NUM_KEYPOINTS: dict[str, int] = {"circle": 5, "square": 5, "triangle": 4, "star": 6, "cross": 5}
MAX_KEYPOINTS = max(NUM_KEYPOINTS.values())
# OKS sigmas for COCO keypoint AP on shapes, one per keypoint slot. Every keypoint is exact
# geometry, so one value serves all; 0.08 (COCO's shoulders) gives OKS ~0.9 for a 1 px error and
# ~0.4 for 3 px on a 14 x 14 px shape.
KEYPOINT_OKS_SIGMAS: tuple[float, ...] = (0.08,) * MAX_KEYPOINTS

# Rotation period (number of polygon vertices / symmetric arms); a circle needs no rotation.
_SYMMETRY = {"circle": 1, "square": 4, "triangle": 3, "star": 5, "cross": 4}
_STAR_INNER = 0.45  # inner-vertex radius of the star, as a fraction of the tip radius
_CROSS_HALF_WIDTH = 0.32  # half-width of a cross arm, as a fraction of the arm length
_NUM_VERTICES = np.array([NUM_KEYPOINTS[name] - 1 for name in SHAPE_CLASSES])
_CIRCLE = SHAPE_CLASSES.index("circle")
_PIXEL_CENTRES = np.arange(8192, dtype=np.float64) + 0.5
_MAX_SCENE_ATTEMPTS = 100  # before giving up on impossible settings instead of looping forever
_PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float64)


@dataclass
class Scene:
    """One rendered scene. ``N`` shapes, image ``H x W``; shape ``i`` is painted after ``i - 1``.

    Attributes:
        image: uint8 ``[H, W, 3]`` (a strided view of packed RGBX pixels).
        label_map: int16 ``[H, W]``; index of the front-most shape at each pixel, -1 background.
        classes: int64 ``[N]`` indices into ``SHAPE_CLASSES``.
        colors: int64 ``[N]`` indices into ``COLOR_NAMES``.
        centers: float64 ``[N, 2]`` ``(cx, cy)`` in pixels.
        radii: float64 ``[N]`` circumradius in pixels.
        angles: float64 ``[N]`` rotation in radians, clockwise from 12 o'clock.
        full_areas: int64 ``[N]`` pixel count of each whole shape (before occlusion).
        visible_areas: int64 ``[N]`` pixel count of the visible part.
        boxes: float32 ``[N, 4]`` xyxy box of the visible part.
        depths: float32 ``[N]`` depth of each shape's layer (larger = farther).
        background_depth: depth of the background, larger than every shape's.
    """

    image: np.ndarray
    label_map: np.ndarray
    classes: np.ndarray
    colors: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    angles: np.ndarray
    full_areas: np.ndarray
    visible_areas: np.ndarray
    boxes: np.ndarray
    depths: np.ndarray
    background_depth: float

    @property
    def num_shapes(self) -> int:
        return int(self.classes.shape[0])

    def class_name(self, i: int) -> str:
        return SHAPE_CLASSES[int(self.classes[i])]

    def color_name(self, i: int) -> str:
        return COLOR_NAMES[int(self.colors[i])]

    def visible_masks(self) -> np.ndarray:
        """Bool ``[N, H, W]``: the visible (unoccluded) pixels of every shape."""
        return self.label_map[None] == np.arange(self.num_shapes, dtype=np.int16)[:, None, None]

    def class_map(self) -> np.ndarray:
        """Uint8 ``[H, W]``: 1 + the class index of the front-most shape, 0 on the background
        (semantic segmentation ground truth)."""
        lookup = np.append(np.uint8(0), self.classes.astype(np.uint8) + 1).astype(np.uint8)
        return lookup[(self.label_map + 1).astype(np.intp)]

    def depth_map(self) -> np.ndarray:
        """Float32 ``[H, W]``: the depth of the front-most surface (background farthest)."""
        lookup = np.append(np.float32(self.background_depth), self.depths).astype(np.float32)
        # Shift labels so the background (-1) reads entry 0; intp indices keep numpy's fast path.
        return lookup[(self.label_map + 1).astype(np.intp)]

    def keypoints(self) -> np.ndarray:
        """Float32 ``[N, MAX_KEYPOINTS, 3]`` rows ``(x, y, visibility)``, see the module doc."""
        height, width = self.label_map.shape
        n = _NUM_VERTICES[self.classes][:, None]  # N x 1
        slot = np.arange(MAX_KEYPOINTS)[None]  # 1 x K
        # A circle has no vertices: its 4 extreme points ignore the (meaningless) rotation.
        rotation = np.where(self.classes == _CIRCLE, 0.0, self.angles)[:, None]
        points = self.centers[:, None] + self.radii[:, None, None] * _unit(
            rotation + 2 * math.pi * slot / n)  # N x K x 2
        points = np.where((slot < n)[..., None], points, self.centers[:, None])  # slot n: centre
        cols = np.clip(np.floor(points[..., 0]).astype(np.intp), 0, width - 1)
        rows = np.clip(np.floor(points[..., 1]).astype(np.intp), 0, height - 1)
        # Occluded = a shape painted later covers the keypoint; a vertex on the shape's own
        # boundary may fall just outside its own raster, so the own mask is not consulted.
        hidden = self.label_map[rows, cols] > np.arange(self.num_shapes)[:, None]
        visibility = np.where(hidden, 1.0, 2.0) * (slot <= n)  # padding slots: 0
        out = np.concatenate([points * (slot <= n)[..., None], visibility[..., None]], axis=-1)
        return out.astype(np.float32)


def _unit(angles: np.ndarray) -> np.ndarray:
    """Unit vectors ``[..., 2]`` for angles measured clockwise from 12 o'clock (image y down)."""
    return np.stack([np.sin(angles), -np.cos(angles)], axis=-1)


def _convex_pieces(name: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The shape as a union of convex polygons: ``[P, V, 2]`` vertices (x, y)."""
    c = np.array([cx, cy])
    if name in ("square", "triangle"):
        n = _SYMMETRY[name]
        return (c + r * _unit(angle + 2 * math.pi * np.arange(n) / n))[None]
    if name == "star":
        # Kite k = centre, inner vertex before tip k, tip k, inner vertex after tip k; each kite
        # is convex and their union is the star.
        tips = c + r * _unit(angle + 2 * math.pi * np.arange(5) / 5)
        inner = c + _STAR_INNER * r * _unit(angle + 2 * math.pi * (np.arange(5) + 0.5) / 5)
        centre = np.broadcast_to(c, (5, 2))
        return np.stack([centre, np.roll(inner, 1, axis=0), tips, inner], axis=1)
    if name == "cross":
        along, across = _unit(np.array([angle, angle + math.pi / 2]))
        w = _CROSS_HALF_WIDTH * r
        bars = []
        for a, b in ((along, across), (across, along)):
            bars.append(np.stack([c + r * a + w * b, c + r * a - w * b,
                                  c - r * a - w * b, c - r * a + w * b]))
        return np.stack(bars)
    raise ValueError(f"unknown shape class {name!r}; expected one of {SHAPE_CLASSES}")


def _half_planes(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Half-planes ``n . p <= offset`` of the unit shape's pieces: ``[P, V, 2]``, ``[P, V]``."""
    pieces = _convex_pieces(name, 0.0, 0.0, 1.0, 0.0)  # P x V x 2
    edges = np.roll(pieces, -1, axis=1) - pieces
    normals = np.stack([edges[..., 1], -edges[..., 0]], axis=-1)
    offsets = (normals * pieces).sum(-1)
    # Orient each half-plane so that the piece's centroid satisfies it.
    centroid = pieces.mean(1, keepdims=True)
    sign = np.where((normals * centroid).sum(-1) > offsets, -1.0, 1.0)
    return normals * sign[..., None], offsets * sign


_HALF_PLANES = {name: _half_planes(name) for name in SHAPE_CLASSES if name != "circle"}


def rasterize_shape(
    name: str, cx: float, cy: float, r: float, angle: float, height: int, width: int
) -> tuple[int, int, np.ndarray]:
    """Rasterise one shape inside its bounding square, clipped to the image.

    Returns ``(row0, col0, mask)`` where ``mask`` is bool ``[h, w]`` covering rows
    ``row0 : row0 + h`` and columns ``col0 : col0 + w`` of the image.
    """
    row0, row1 = max(0, math.floor(cy - r)), min(height, math.ceil(cy + r) + 1)
    col0, col1 = max(0, math.floor(cx - r)), min(width, math.ceil(cx + r) + 1)
    if max(row1, col1) > _PIXEL_CENTRES.size:
        raise ValueError(f"image side {max(height, width)} exceeds {_PIXEL_CENTRES.size}")
    ys, xs = _PIXEL_CENTRES[row0:row1], _PIXEL_CENTRES[col0:col1]  # h, w (views, no allocation)
    # Scanline form: on every row each convex piece covers one x-interval [lo, hi], so the
    # per-pixel work is two comparisons instead of one per polygon edge.
    if name == "circle":
        squared = r * r - (ys - cy) ** 2  # negative on rows the circle misses
        half = np.sqrt(np.maximum(squared, 0.0))
        lo, hi = (cx - half)[None], np.where(squared >= 0, cx + half, -np.inf)[None]  # 1 x h
    else:
        normals, offsets = _HALF_PLANES[name]  # P x V x 2, P x V (unit shape, angle 0)
        cos, sin = math.cos(angle), math.sin(angle)
        # Rotating and scaling the shape rotates its normals and scales its offsets; moving it
        # by c adds n . c to each offset.
        rotated = normals @ np.array([[cos, sin], [-sin, cos]])  # P x V x 2
        off = r * offsets + rotated @ np.array([cx, cy])
        nx, ny = rotated[..., 0], rotated[..., 1]
        # An edge with nx == 0 bounds y only; a tiny positive nx turns that into an infinite
        # (or empty) x-bound with the right sign, so one formula covers every edge.
        nx = np.where(nx == 0.0, 1e-12, nx)[..., None]  # P x V x 1
        bound = (off[..., None] - ny[..., None] * ys) / nx  # P x V x h
        lo = bound.max(1, initial=-np.inf, where=nx < 0)  # P x h
        hi = bound.min(1, initial=np.inf, where=nx > 0)  # P x h
    inside = (xs >= lo[..., None]) & (xs <= hi[..., None])  # P x h x w
    return row0, col0, inside[0] if inside.shape[0] == 1 else inside.any(0)


def sample_scene(
    rng: np.random.Generator,
    *,
    height: int = 128,
    width: int = 128,
    min_shapes: int = 2,
    max_shapes: int = 5,
    min_radius: float = 0.07,
    max_radius: float = 0.17,
    min_visible_fraction: float = 0.5,
    max_attempts: int = 12,
) -> Scene:
    """Draw a random scene from ``rng``.

    Shapes are placed one at a time; a placement is rejected (and re-drawn, with a smaller
    radius after half the attempts) when it would leave any shape, itself included, with less
    than ``min_visible_fraction`` of its area visible. A shape that cannot be placed in
    ``max_attempts`` is dropped, so a scene may hold fewer shapes than drawn, but never fewer
    than ``min_shapes`` (the whole scene is re-drawn in that case).

    Args:
        rng: the source of randomness; the scene is a pure function of its state.
        height, width: image size in pixels (at least 16 each).
        min_shapes, max_shapes: inclusive range of the number of shapes (1 <= min <= max).
        min_radius, max_radius: circumradius range as fractions of ``min(height, width)``.
        min_visible_fraction: the least visible fraction of every shape, in ``[0, 1)``.
        max_attempts: placement attempts per shape.

    Raises:
        ValueError: out-of-range arguments.
        RuntimeError: 100 scenes in a row could not hold ``min_shapes`` shapes (only settings
            that leave no room, e.g. many large shapes in a small image, get there).
    """
    if height < 16 or width < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
    if not 0 < min_radius <= max_radius < 0.5:
        raise ValueError(f"need 0 < min_radius <= max_radius < 0.5, got {min_radius}, {max_radius}")
    if not 0 <= min_visible_fraction < 1:
        raise ValueError(f"min_visible_fraction must be in [0, 1), got {min_visible_fraction}")
    side = min(height, width)
    for _ in range(_MAX_SCENE_ATTEMPTS):
        scene = _try_scene(rng, height, width, int(rng.integers(min_shapes, max_shapes + 1)),
                           min_radius * side, max_radius * side, min_visible_fraction,
                           max_attempts)
        if scene is not None and scene.num_shapes >= min_shapes:
            return scene
    raise RuntimeError(
        f"could not place {min_shapes} shapes with {min_visible_fraction:.0%} visible in a "
        f"{height}x{width} image after {_MAX_SCENE_ATTEMPTS} scenes; lower min_shapes, "
        "max_radius or min_visible_fraction"
    )


def _try_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num: int,
    rmin: float,
    rmax: float,
    min_visible: float,
    max_attempts: int,
) -> Scene | None:
    # All per-shape draws at once (numpy's scalar samplers cost microseconds per call):
    # class, colour, 3 x colour jitter, depth; the last row is the background's.
    u = rng.random((num + 1, 6))
    rgbx = np.zeros((num + 1, 4), dtype=np.uint8)
    colors = (u[:num, 1] * len(COLOR_NAMES)).astype(np.int64)
    # Colour jitter keeps the palette recognisable while avoiding exact-value shortcuts; the
    # palette stays within [12, 243] so the jittered values fit uint8 without clipping.
    rgbx[:num, :3] = _PALETTE[colors] + 24 * u[:num, 2:5] - 12
    # Grey background of random brightness and slight tint, far from the saturated palette.
    rgbx[num, :3] = 95 + 70 * u[num, 0] + 20 * u[num, 1:4] - 10
    packed = rgbx.view(np.uint32)[:, 0]  # one RGBX pixel per row, painted in one store
    image = np.full((height, width), packed[num], dtype=np.uint32)
    label = np.full((height, width), -1, dtype=np.int16)
    kept: list[int] = []
    params: list[tuple[float, float, float, float]] = []
    full: list[int] = []
    visible: list[int] = []
    for k in range(num):
        cls = int(u[k, 0] * len(SHAPE_CLASSES))
        name = SHAPE_CLASSES[cls]
        for attempt in range(max_attempts):
            v = rng.random(4).tolist()  # Python floats: cheaper scalar arithmetic below
            r = (rmin + (rmax - rmin) * v[0]) * (0.75 if attempt >= max_attempts // 2 else 1.0)
            cx, cy = r + (width - 2 * r) * v[1], r + (height - 2 * r) * v[2]
            angle = 2 * math.pi / _SYMMETRY[name] * v[3]
            row0, col0, mask = rasterize_shape(name, cx, cy, r, angle, height, width)
            area = int(mask.sum())
            if area < 4:
                continue
            rows, cols = slice(row0, row0 + mask.shape[0]), slice(col0, col0 + mask.shape[1])
            window = label[rows, cols]
            # Pixels of each placed shape this one would cover (entry 0 counts background).
            under = window[mask]
            covered = (np.bincount(under + 1, minlength=len(full) + 1)[1:].tolist()
                       if under.max() >= 0 else [0] * len(full))
            left = [a - c for a, c in zip(visible, covered)]
            if all(a >= min_visible * f for a, f in zip(left, full)):
                window[mask] = len(full)
                image[rows, cols][mask] = packed[k]
                visible = [*left, area]
                full.append(area)
                kept.append(k)
                params.append((cx, cy, r, angle))
                break
    if not kept:
        return None
    n = len(kept)
    vis = label[None] == np.arange(n, dtype=np.int16)[:, None, None]  # N x H x W
    rows_any, cols_any = vis.any(2), vis.any(1)  # N x H, N x W
    boxes = np.stack([
        cols_any.argmax(1), rows_any.argmax(1),
        width - cols_any[:, ::-1].argmax(1), height - rows_any[:, ::-1].argmax(1),
    ], axis=1).astype(np.float32)
    # Farther layers get larger depths; the background (layer -1) is farthest of all.
    depths = np.sort(2.0 + 6.0 * u[kept, 5])[::-1].astype(np.float32)
    p = np.asarray(params, dtype=np.float64)
    return Scene(
        image=image.view(np.uint8).reshape(height, width, 4)[..., :3],
        label_map=label,
        classes=(u[kept, 0] * len(SHAPE_CLASSES)).astype(np.int64),
        colors=colors[kept],
        centers=p[:, :2].copy(),
        radii=p[:, 2].copy(),
        angles=p[:, 3].copy(),
        full_areas=np.asarray(full, dtype=np.int64),
        visible_areas=np.asarray(visible, dtype=np.int64),
        boxes=boxes,
        depths=depths,
        background_depth=10.0,
    )
