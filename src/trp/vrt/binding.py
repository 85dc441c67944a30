"""Which patch features belong to which image, and which images to which sample.

A batch's merged patch features are one flat ``Tensor[ΣP, D]``, image-major in the order of
``image_grid_thw`` (what Qwen2.5-VL's visual encoder returns), the images of a sample consecutive.
A visual reference token (VRT) names a patch *of its own sample*:

    VRT id      = vrt_base + local index
    local index = (offset of the image within the sample) + frame·H'·W' + row·W' + col

with ``(H', W')`` the merged grid of the image. ``vrt_base`` is the first id after the text
vocabulary (``trp.grammar.vrt_base_of(tokenizer)``), so ``<|VRT_k|>`` of the grammar is local
index ``k``. Sample ``s`` owns feature rows ``sample_offsets[s] : sample_offsets[s + 1]``; its VRT
``k`` is feature row ``sample_offsets[s] + k``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["ImageBinding"]


def _as_long(value: object, name: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.long)
    try:
        return torch.as_tensor(value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a sequence of ints or an integer tensor") from None


def _offsets(sizes: Tensor) -> Tensor:
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


@dataclass(frozen=True, eq=False)
class ImageBinding:
    """Per-batch binding of merged patches to images and samples (all tensors on the CPU).

    Build with :meth:`from_grid_thw` (Qwen2.5-VL's ``image_grid_thw``) or :meth:`from_grids`.

    Attributes:
        grids (Tensor[N, 3], int64): merged grid ``(T, H', W')`` of each image.
        image_sample (Tensor[N], int64): sample of each image, non-decreasing.
        num_samples (int): B (samples may have no image).
        vrt_base (int): id of ``<|VRT_0|>``.
        image_offsets (Tensor[N + 1]): image i owns feature rows ``image_offsets[i:i+2]``.
        sample_offsets (Tensor[B + 1]): sample s owns feature rows ``sample_offsets[s:s+2]``.
        image_local_offset (Tensor[N]): local index of image i's first patch in its sample.
    """

    grids: Tensor
    image_sample: Tensor
    num_samples: int
    vrt_base: int
    image_offsets: Tensor
    sample_offsets: Tensor
    image_local_offset: Tensor

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_grids(
        cls,
        grids: Tensor | Sequence[Sequence[int]],
        images_per_sample: Tensor | Sequence[int],
        *,
        vrt_base: int,
    ) -> ImageBinding:
        """From merged grids ``[N, 2]`` (H', W') or ``[N, 3]`` (T, H', W').

        ``images_per_sample[s]`` images belong to sample s, in order (0 is allowed).
        """
        g = _as_long(grids, "grids")
        if g.dim() == 1 and g.numel() == 0:
            g = g.view(0, 2)
        if g.dim() != 2 or g.shape[1] not in (2, 3):
            raise ValueError(f"grids must have shape [N, 2] or [N, 3], got {list(g.shape)}")
        if g.shape[1] == 2:
            g = torch.cat([torch.ones_like(g[:, :1]), g], dim=1)
        if g.numel() and int(g.min()) < 1:
            raise ValueError(f"grid sizes must be >= 1, got {g.tolist()}")
        counts = _as_long(images_per_sample, "images_per_sample")
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError("images_per_sample must be a non-empty 1-D sequence")
        if int(counts.min()) < 0 or int(counts.sum()) != g.shape[0]:
            raise ValueError(
                f"images_per_sample must be >= 0 and sum to the {g.shape[0]} images, "
                f"got {counts.tolist()}"
            )
        if isinstance(vrt_base, bool) or not isinstance(vrt_base, int) or vrt_base < 1:
            raise ValueError(f"vrt_base must be a positive int, got {vrt_base!r}")
        num_samples = counts.numel()
        image_sample = torch.repeat_interleave(torch.arange(num_samples), counts)
        sizes = g.prod(dim=1)  # patches per image
        image_offsets = _offsets(sizes)
        sample_sizes = torch.zeros(num_samples, dtype=torch.long).index_add_(0, image_sample, sizes)
        sample_offsets = _offsets(sample_sizes)
        local = image_offsets[:-1] - sample_offsets[image_sample]
        return cls(g, image_sample, num_samples, vrt_base, image_offsets, sample_offsets, local)

    @classmethod
    def from_grid_thw(
        cls,
        image_grid_thw: Tensor,
        images_per_sample: Tensor | Sequence[int],
        *,
        vrt_base: int,
        spatial_merge_size: int = 2,
    ) -> ImageBinding:
        """From Qwen2.5-VL's ``image_grid_thw`` ``[N, 3]`` (t, h, w) in *unmerged* patches.

        The merged grid is ``(t, h / m, w / m)`` with ``m = spatial_merge_size``; the visual
        encoder's output has exactly those rows, in raster order per image.
        """
        thw = _as_long(image_grid_thw, "image_grid_thw")
        if thw.dim() != 2 or thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must have shape [N, 3], got {list(thw.shape)}")
        m = spatial_merge_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"spatial_merge_size must be a positive int, got {m!r}")
        if thw.numel() and bool(((thw[:, 1:] % m) != 0).any()):
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size={m}")
        merged = torch.stack([thw[:, 0], thw[:, 1] // m, thw[:, 2] // m], dim=1)
        return cls.from_grids(merged, images_per_sample, vrt_base=vrt_base)

    # ------------------------------------------------------------------ feature maps
    def feature_maps(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image maps from flat patch features: ``features (Tensor[ΣP, C])`` in binding
        order -> ``(maps [N, C, H_max, W_max], padding [N, H_max, W_max] bool)``.

        Images of different grids are padded (bottom/right) to the largest; ``padding`` is
        True there, for the heads to ignore (:class:`trp.heads.HeadInputs.padding_masks`).
        Video frames (``T > 1``) are not maps: such a binding raises.
        """
        if features.dim() != 2 or features.shape[0] != self.total_patches:
            raise ValueError(
                f"features must be [{self.total_patches}, C], got {list(features.shape)}"
            )
        if self.num_images == 0:
            raise ValueError("the binding has no image")
        if bool((self.grids[:, 0] != 1).any()):
            raise ValueError("feature_maps needs single-frame images (T = 1)")
        heights, widths = self.grids[:, 1].tolist(), self.grids[:, 2].tolist()
        hm, wm = max(heights), max(widths)
        n, c = self.num_images, features.shape[1]
        maps = features.new_zeros(n, c, hm, wm)
        padding = torch.ones(n, hm, wm, dtype=torch.bool, device=features.device)
        starts = self.image_offsets.tolist()
        for i, (h, w) in enumerate(zip(heights, widths)):
            block = features[starts[i] : starts[i + 1]]  # (h w) x C
            maps[i, :, :h, :w] = rearrange(block, "(h w) c -> c h w", h=h)
            padding[i, :h, :w] = False
        return maps, padding

    # ------------------------------------------------------------------ sizes
    @property
    def num_images(self) -> int:
        return int(self.grids.shape[0])

    @property
    def total_patches(self) -> int:
        """ΣP: rows of the flat patch-feature tensor."""
        return int(self.sample_offsets[-1])

    @property
    def patches_per_sample(self) -> Tensor:
        """Tensor[B]: VRTs each sample may emit."""
        return self.sample_offsets[1:] - self.sample_offsets[:-1]

    def num_patches_of(self, sample: int) -> int:
        """VRTs ``sample`` may emit (``patches_per_sample[sample]`` without a tensor op)."""
        self._check_sample(sample)
        offsets = self._lists["sample_offsets"]
        return offsets[sample + 1] - offsets[sample]

    def grid_of(self, image: int) -> tuple[int, int, int]:
        """Merged grid ``(T, H', W')`` of ``image`` (a row of ``grids``, as ints)."""
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} out of range [0, {self.num_images})")
        t, h, w = self._lists["grids"][image]
        return t, h, w

    @property
    def max_patches(self) -> int:
        """Largest per-sample patch count (width of the VRT part of the logits)."""
        return int(self.patches_per_sample.max()) if self.num_samples else 0

    def images_of(self, sample: int) -> list[int]:
        """Indices of the images of ``sample``."""
        self._check_sample(sample)
        first = self._lists["sample_first_image"]
        return list(range(first[sample], first[sample + 1]))

    @cached_property
    def _lists(self) -> dict[str, list]:
        """The offsets and grids as Python lists: the per-object lookups of the router and the
        losses (:meth:`patch_of`, :meth:`images_of`) then cost no tensor op each."""
        counts = torch.bincount(self.image_sample, minlength=self.num_samples)
        return {
            "sample_offsets": self.sample_offsets.tolist(),
            "image_offsets": self.image_offsets.tolist(),
            "grids": self.grids.tolist(),
            "sample_first_image": _offsets(counts).tolist(),
        }

    # ------------------------------------------------------------------ masks and indices
    def own_image_mask(self, device: torch.device | str | None = None) -> Tensor:
        """``Tensor[B, max_patches]`` bool: local VRT k is a patch of sample s's images.

        The ``vrt_mask`` of :class:`trp.grammar.TRPLogitsProcessor`.
        """
        k = torch.arange(self.max_patches)
        return (k[None, :] < self.patches_per_sample[:, None]).to(device)

    def padded_index(self) -> tuple[Tensor, Tensor]:
        """Feature rows of each sample's VRTs, padded: ``(index [B, max_P], valid [B, max_P])``.

        Padded slots index row 0 (and are False in ``valid``), so a gather never goes out of
        range; with no patches at all the index is empty.
        """
        valid = self.own_image_mask()
        index = self.sample_offsets[:-1, None] + torch.arange(self.max_patches)[None, :]
        return index.masked_fill(~valid, 0), valid

    def rows_per_sample(self, rows: int) -> int:
        """Generation rows per sample (beams / ``num_return_sequences`` are consecutive)."""
        if rows < self.num_samples or rows % self.num_samples:
            raise ValueError(f"{rows} rows do not divide into {self.num_samples} samples")
        return rows // self.num_samples

    def sample_of_rows(self, rows: int, device: torch.device | str | None = None) -> Tensor:
        """``Tensor[rows]``: the sample of each batch row (``row // (rows // B)``)."""
        per = self.rows_per_sample(rows)
        return torch.arange(rows, device=device) // per

    # ------------------------------------------------------------------ id conversion
    def is_vrt(self, ids: Tensor) -> Tensor:
        return ids >= self.vrt_base

    def local_index(self, image: int, row: int, col: int, frame: int = 0) -> int:
        """Local VRT index of merged patch ``(frame, row, col)`` of ``image``."""
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} out of range [0, {self.num_images})")
        t, h, w = self.grids[image].tolist()
        if not (0 <= frame < t and 0 <= row < h and 0 <= col < w):
            raise IndexError(f"patch ({frame}, {row}, {col}) outside grid ({t}, {h}, {w})")
        return int(self.image_local_offset[image]) + (frame * h + row) * w + col

    def patch_of(self, sample: int, local: int) -> tuple[int, int, int, int]:
        """``(image, frame, row, col)`` of local VRT index ``local`` of ``sample``."""
        self._check_local(sample, local)
        tables = self._lists
        row_global = tables["sample_offsets"][sample] + local
        image = bisect.bisect_right(tables["image_offsets"], row_global) - 1
        t, h, w = tables["grids"][image]
        k = row_global - tables["image_offsets"][image]
        return image, k // (h * w), (k // w) % h, k % w

    def to_global(self, ids: Tensor, samples: Tensor) -> Tensor:
        """Feature rows (into ``[ΣP, D]``) of VRT ids ``ids`` emitted by samples ``samples``.

        Raises when an id is not a VRT or points past its sample's patches.
        """
        ids = torch.as_tensor(ids)
        samples = torch.as_tensor(samples, device=ids.device).expand_as(ids)
        local = ids - self.vrt_base
        self._check_locals(local, samples)
        return self.sample_offsets.to(ids.device)[samples] + local

    def to_vrt_ids(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`to_global`: ``(sample, VRT id)`` of each feature row."""
        rows = torch.as_tensor(rows)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.total_patches):
            raise ValueError(f"feature rows must lie in [0, {self.total_patches})")
        offsets = self.sample_offsets.to(rows.device)
        sample = torch.searchsorted(offsets, rows, right=True) - 1
        return sample, rows - offsets[sample] + self.vrt_base

    # ------------------------------------------------------------------ checks
    def _check_sample(self, sample: int) -> None:
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} out of range [0, {self.num_samples})")

    def _check_local(self, sample: int, local: int) -> None:
        n = self.num_patches_of(sample)  # checks the sample
        if not 0 <= local < n:
            raise ValueError(f"VRT {local} is not a patch of sample {sample} ({n} patches)")

    def _check_locals(self, local: Tensor, samples: Tensor) -> None:
        if not local.numel():
            return
        if samples.numel() and (int(samples.min()) < 0 or int(samples.max()) >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples})")
        limit = self.patches_per_sample.to(local.device)[samples]
        bad = (local < 0) | (local >= limit)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0, 0])
            s = int(samples.flatten()[i])
            raise ValueError(
                f"VRT id {int(local.flatten()[i]) + self.vrt_base} is not a patch of sample {s} "
                f"({int(limit.flatten()[i])} patches, vrt_base={self.vrt_base})"
            )
