"""Batching of sample dicts: fixed-size tensors stacked, per-instance targets kept as lists."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from typing import Any

import torch

# Keys whose tensors have one row per instance, so their first dimension varies per sample.
# They stay lists even when a batch happens to agree in size, so a batch's types never depend
# on its content.
PER_INSTANCE_KEYS: frozenset[str] = frozenset(
    {"boxes", "masks", "labels", "keypoints", "scores", "areas", "iscrowd", "category_ids"}
)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate sample dicts into a batch dict.

    * tensors under ``PER_INSTANCE_KEYS`` -> ``list[Tensor]`` (length B);
    * other tensors -> stacked ``[B, ...]`` (e.g. ``image`` -> ``[B, 3, H, W]``, ``box`` ->
      ``[B, 4]``, ``mask`` -> ``[B, H, W]``); they must agree in shape;
    * ints / floats / bools -> a 1-D tensor ``[B]``;
    * anything else (strings, lists) -> ``list`` (length B).

    Raises:
        ValueError: on an empty batch, samples with different keys, or a stacked key whose
            tensors differ in shape (resize images to a common size first, e.g.
            ``RefCOCODataset(image_size=...)``).
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    keys = list(samples[0])
    for i, s in enumerate(samples):
        if set(s) != set(keys):
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor) and key not in PER_INSTANCE_KEYS:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(
                    f"cannot stack {key!r}: shapes differ across the batch ({sorted(shapes)}); "
                    "resize to a common size first"
                )
            batch[key] = torch.stack(values)
        elif isinstance(first, Number) and not isinstance(first, torch.Tensor):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
