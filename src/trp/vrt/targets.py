"""Target patches of an object on a merged grid, and the VRTs a training answer names.

A grid cell is a target patch when the object covers more than ``threshold`` of its area
(PaDT: 1/28). Box-only objects are rasterised exactly (the covered fraction of each cell is the
overlap area of box and cell). Per training step a few target patches are sampled as the VRT
run of the answer; :func:`robust_exclusions` gives, for the token loss, the other target patches
to drop from the softmax at each VRT position (PaDT's "robust" cross-entropy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from trp.vrt.binding import ImageBinding

__all__ = [
    "SamplingMode",
    "box_coverage",
    "mask_coverage",
    "rasterize_box",
    "robust_exclusions",
    "run_reference_boxes",
    "sample_target_patches",
    "target_patches",
]

DEFAULT_THRESHOLD = 1.0 / 28.0
SamplingMode = Literal["random", "replacement", "padt", "extremes", "all"]


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"grid must be (H', W') with positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def mask_coverage(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """Fraction of each grid cell covered by ``mask (Tensor[H, W], bool or [0, 1])``.

    The mask spans the whole image; returns ``Tensor[H', W']`` (float32). When H, W are not
    multiples of the grid, cells are adaptive-pooling bins.
    """
    h, w = _check_grid(grid)
    if not isinstance(mask, Tensor) or mask.dim() != 2 or 0 in mask.shape:
        raise ValueError("mask must be a non-empty Tensor[H, W]")
    return F.adaptive_avg_pool2d(mask.float()[None, None], (h, w))[0, 0]


def box_coverage(box: Tensor | Sequence[float], grid: Sequence[int]) -> Tensor:
    """Exact fraction of each cell covered by ``box`` (xyxy, normalised to [0, 1] of the image).

    Returns ``Tensor[H', W']`` (float32): rasterisation at infinite resolution.
    """
    h, w = _check_grid(grid)
    b = torch.as_tensor(box, dtype=torch.float64)
    if b.shape != (4,) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"box must be 4 finite numbers (xyxy), got {box!r}")
    x0, y0, x1, y1 = (b.clamp(0, 1) * torch.tensor([w, h, w, h], dtype=torch.float64)).tolist()
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must have x1 >= x0 and y1 >= y0, got {b.tolist()}")
    cols = torch.arange(w, dtype=torch.float64)
    rows = torch.arange(h, dtype=torch.float64)
    cover_x = torch.minimum(cols + 1, torch.tensor(x1)) - torch.maximum(cols, torch.tensor(x0))
    cover_y = torch.minimum(rows + 1, torch.tensor(y1)) - torch.maximum(rows, torch.tensor(y0))
    return (cover_y.clamp(min=0)[:, None] * cover_x.clamp(min=0)[None, :]).float()


def rasterize_box(box: Tensor | Sequence[float], size: Sequence[int]) -> Tensor:
    """Binary mask ``Tensor[H, W]`` of the pixels whose centre lies in ``box`` (normalised xyxy)."""
    h, w = _check_grid(size)
    b = torch.as_tensor(box, dtype=torch.float64)
    if b.shape != (4,):
        raise ValueError(f"box must be 4 numbers (xyxy), got {box!r}")
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside_y = (ys >= b[1]) & (ys < b[3])
    inside_x = (xs >= b[0]) & (xs < b[2])
    return inside_y[:, None] & inside_x[None, :]


def target_patches(coverage: Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Local indices (``row·W' + col``, ascending) of cells covered by more than ``threshold``.

    ``coverage`` is ``Tensor[H', W']`` from :func:`mask_coverage` or :func:`box_coverage`. An
    object smaller than the threshold everywhere falls back to its most covered cell, so every
    non-empty object has at least one target; an empty object has none.
    """
    if not isinstance(coverage, Tensor) or coverage.dim() != 2:
        raise ValueError("coverage must be a Tensor[H', W']")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    flat = coverage.flatten()
    picked = (flat > threshold).nonzero().flatten()
    if picked.numel() == 0 and bool((flat > 0).any()):
        picked = flat.argmax().view(1)
    return picked


def sample_target_patches(
    patches: Tensor,
    grid: Sequence[int],
    *,
    num: int = 5,
    mode: SamplingMode = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the VRT run for one object from its target patches.

    The default (``"random"``) run never repeats a patch, so it is valid input to
    :func:`trp.grammar.format_rec`; ``"replacement"`` and ``"padt"`` may repeat (deduplicate
    with ``.unique()`` before formatting).

    Modes: ``"random"`` ``min(num, K)`` distinct patches; ``"replacement"`` ``num`` patches drawn
    with replacement; ``"padt"`` distinct when ``K >= num`` else with replacement (PaDT's
    training default); ``"extremes"`` the patch nearest the centroid, then the left-, right-,
    top- and bottom-most (distinct, in that order); ``"all"`` every patch. Random picks are
    returned in raster order; the same ``generator`` state gives the same picks.

    Args:
        patches (Tensor[K], int64): local indices from :func:`target_patches`.
        grid: merged grid ``(H', W')`` the indices live on.
    """
    _, w = _check_grid(grid)
    if not isinstance(patches, Tensor) or patches.dim() != 1 or patches.dtype != torch.long:
        raise ValueError("patches must be a 1-D int64 tensor")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    k = patches.numel()
    if k == 0:
        raise ValueError("the object has no target patch")
    if mode == "all":
        return patches.clone()
    if mode == "extremes":
        rows, cols = patches // w, patches % w
        centre = torch.stack([rows.double().mean(), cols.double().mean()])
        dist = (rows.double() - centre[0]) ** 2 + (cols.double() - centre[1]) ** 2
        order = [dist.argmin(), cols.argmin(), cols.argmax(), rows.argmin(), rows.argmax()]
        return torch.tensor(list(dict.fromkeys(int(patches[i]) for i in order)), dtype=torch.long)
    if mode == "padt":
        mode = "random" if k >= num else "replacement"
    if mode == "random":
        pick = torch.randperm(k, generator=generator)[: min(num, k)]
    elif mode == "replacement":
        pick = torch.randint(k, (num,), generator=generator)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return patches[pick.sort().values]


def robust_exclusions(
    labels: Tensor, objects: Sequence[tuple[Sequence[int], Tensor]], *, vrt_base: int
) -> tuple[Tensor, Tensor]:
    """Per-token excluded VRT columns for the robust cross-entropy, in CSR form.

    At every position ``t`` of object ``(positions, patches)`` whose label is a VRT, the object's
    other target patches (``patches`` minus the label) leave the softmax, so the model is not
    penalised for naming a different patch of the right object.

    Args:
        labels (Tensor[T], int64): flattened next-token labels (VRT ids ``>= vrt_base``).
        objects: per object, the label positions of its VRT run (indices into ``labels``) and
            all its target patches (``Tensor[K]`` local indices).
    Returns:
        ``exclude_offsets (Tensor[T + 1])``, ``exclude_ids (Tensor[E])`` (local VRT indices),
        for :func:`trp.ops.vrt_linear_cross_entropy`.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got {list(labels.shape)}")
    n = labels.numel()
    label_list = labels.tolist()
    # Python sets over the (few) patches of each object: no tensor op per token.
    per_token: dict[int, set[int]] = {}
    for positions, patches in objects:
        patch_set = set(torch.as_tensor(patches, dtype=torch.long).flatten().tolist())
        for t in positions:
            if not 0 <= t < n:
                raise IndexError(f"label position {t} out of range [0, {n})")
            local = label_list[t] - vrt_base
            if local < 0:
                raise ValueError(f"label at position {t} is not a VRT (id {label_list[t]})")
            per_token.setdefault(t, set()).update(patch_set - {local})
    counts = torch.zeros(n, dtype=torch.long)
    tokens = sorted(per_token)
    if tokens:
        counts[torch.tensor(tokens)] = torch.tensor([len(per_token[t]) for t in tokens])
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    ids = [i for t in tokens for i in sorted(per_token[t])]
    return offsets, torch.tensor(ids, dtype=torch.long)


def run_reference_boxes(
    input_ids: Tensor, sample: Tensor, positions: Tensor, binding: ImageBinding
) -> Tensor:
    """Box around the patches each VRT run names, ``-> Tensor[Q, 4]`` normalised cxcywh.

    Args:
        input_ids (Tensor[B, T]): token ids; ``positions`` are absolute columns of it.
        sample (Tensor[Q], int64): sample of each target.
        positions (Tensor[Q, K], int64): the target's token positions, padded with -1 (as
            :class:`trp.grammar.UnitQueries`).
        binding: the batch's :class:`ImageBinding`; each image's own grid is read from it, so
            images of different sizes (and several images per sample) work.
    Returns:
        Per target the box (in its image's normalised frame) around the run's first patch and
        the patches 8-connected to it through the run's patches of the same image and frame: a
        stray VRT elsewhere does not stretch it. A target with no VRT of its sample among its
        tokens (a ``<REF>``) is a NaN row.
    """
    if positions.dim() != 2 or sample.shape != positions.shape[:1]:
        raise ValueError(
            f"sample [Q] and positions [Q, K] must agree, got {list(sample.shape)} and "
            f"{list(positions.shape)}"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
    ids = input_ids.cpu().tolist()
    # Python lists throughout: one box per target, no tensor op each.
    boxes = [[float("nan")] * 4 for _ in range(len(sample))]
    for q, (s, row) in enumerate(zip(sample.cpu().tolist(), positions.cpu().tolist())):
        cells: list[tuple[int, int, int, int]] = []
        limit = binding.num_patches_of(s)
        for p in row:
            if p < 0:
                continue
            local = ids[s][p] - binding.vrt_base
            if 0 <= local < limit:
                cells.append(binding.patch_of(s, local))
        if not cells:
            continue
        image, frame = cells[0][:2]
        same = [(r, c) for i, f, r, c in cells if i == image and f == frame]
        cluster, rest = [same[0]], same[1:]
        grew = True
        while grew:
            near = [c for c in rest if any(_adjacent(c, d) for d in cluster)]
            grew = bool(near)
            cluster += near
            rest = [c for c in rest if c not in near]
        _, gh, gw = binding.grid_of(image)
        rows, cols = [c[0] for c in cluster], [c[1] for c in cluster]
        x0, x1 = min(cols) / gw, (max(cols) + 1) / gw
        y0, y1 = min(rows) / gh, (max(rows) + 1) / gh
        boxes[q] = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    return torch.tensor(boxes, dtype=torch.float32).reshape(len(boxes), 4)


def _adjacent(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1
