"""``ShapesDataset``: seeded synthetic referring scenes with ground truth for every task family.

Sample ``i`` of a dataset with seed ``s`` is drawn from ``numpy.random.default_rng((s, i))``,
so it is the same in any worker, in any order, on any machine with the same numpy.

Every sample has ``image`` (float32 ``[3, H, W]`` in [0, 1]), ``index`` (int) and ``task``
(str). The other keys depend on ``task``:

* ``"rec"``, ``"res"`` (referring): ``expression`` (str), ``expression_kind`` (``"attribute"``,
  ``"position"`` or ``"relation"``), ``box`` (float32 ``[4]`` xyxy pixels of the visible part),
  ``mask`` (bool ``[H, W]``, visible part), ``label`` (int class index), ``class_map`` (uint8
  ``[H, W]``: 1 + the class of every visible shape, 0 background; for auxiliary dense losses).
* ``"caption"`` (region captioning with a visual prompt): ``prompt_type`` (one of
  ``PROMPT_TYPES``), ``prompt_mask`` (bool ``[H, W]``), ``caption`` (str, e.g.
  ``"a large red circle, partly hidden"``), ``box``, ``mask``, ``label``.
* ``"det"`` (all instances of one class present in the scene): ``category`` (str), ``label``
  (int), ``boxes`` (float32 ``[N, 4]``), ``masks`` (bool ``[N, H, W]``), ``labels`` (int64
  ``[N]``, all equal to ``label``).
* ``"keypoints"``: the ``"det"`` keys plus ``keypoints`` (float32 ``[N, MAX_KEYPOINTS, 3]``,
  rows ``(x, y, v)``; layout in :mod:`trp.data.scene`).
* ``"depth"``: ``depth`` (float32 ``[H, W]``; shapes in [2, 8], background 10, nearer layers
  smaller).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from trp.data.prompts import PROMPT_TYPES, visual_prompt
from trp.data.referring import Referent, SceneFacts, refer_any
from trp.data.scene import SHAPE_CLASSES, Scene, sample_scene

TASKS: tuple[str, ...] = ("rec", "res", "caption", "det", "keypoints", "depth")


def _size_word(radius: float, side: float) -> str:
    fraction = radius / side
    return "small" if fraction < 0.1 else "medium" if fraction < 0.135 else "large"


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1]."""
    # Transposing in numpy first is ~3x faster than converting a permuted (strided) tensor.
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class ShapesDataset(Dataset):
    """Synthetic scenes of 2–5 coloured shapes with task-specific ground truth.

    Args:
        num_samples: dataset length (> 0).
        seed: dataset seed; different seeds give disjoint-looking datasets.
        image_size: ``int`` for square images or ``(height, width)``; at least 16.
        task: one of ``TASKS`` (see the module doc for the sample keys of each).
        min_shapes, max_shapes: inclusive range of shapes per scene.
        kind_weights: sampling weights of (attribute, position, relation) expressions.
        prompt_types: visual prompt types drawn uniformly for ``task="caption"``.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        seed: int = 0,
        image_size: int | tuple[int, int] = 128,
        task: str = "rec",
        min_shapes: int = 2,
        max_shapes: int = 5,
        kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
        prompt_types: Sequence[str] = PROMPT_TYPES,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or min(image_size) < 16:
            raise ValueError(f"image_size must be >= 16 (int or (h, w)), got {image_size}")
        bad = [p for p in prompt_types if p not in PROMPT_TYPES]
        if bad or not prompt_types:
            raise ValueError(f"prompt_types must be a non-empty subset of {PROMPT_TYPES}")
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        self.num_samples = num_samples
        self.seed = seed
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.task = task
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        weights = tuple(float(w) for w in kind_weights)
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                "kind_weights must be 3 non-negative numbers with a positive sum, "
                f"got {kind_weights}"
            )
        self.kind_weights = weights
        self.prompt_types = tuple(prompt_types)
        self.class_names = SHAPE_CLASSES

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return np.random.default_rng((self.seed, index))

    def _draw(self, rng: np.random.Generator) -> tuple[Scene, int | None, Referent | None]:
        """The scene and, for ``rec``/``res``, the target and its expression."""
        while True:
            scene = sample_scene(rng, height=self.height, width=self.width,
                                 min_shapes=self.min_shapes, max_shapes=self.max_shapes)
            if self.task not in ("rec", "res"):
                return scene, None, None
            found = refer_any(SceneFacts.from_scene(scene), rng, kind_weights=self.kind_weights)
            # A scene can (rarely) hold no object with an unambiguous expression: redraw.
            if found is not None:
                return scene, *found

    def scene(self, index: int) -> Scene:
        """The full :class:`~trp.data.scene.Scene` behind sample ``index``."""
        return self._draw(self._rng(index))[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        scene, target, ref = self._draw(rng)
        sample: dict[str, Any] = {"index": index, "task": self.task}
        if ref is not None:
            sample["expression"] = ref.text()
            sample["expression_kind"] = ref.kind
        if self.task in ("rec", "res", "caption"):
            if target is None:  # caption: any object can be prompted
                target = int(rng.integers(scene.num_shapes))
            mask = scene.label_map == target
            sample["box"] = torch.from_numpy(scene.boxes[target].copy())
            sample["mask"] = torch.from_numpy(mask)
            sample["label"] = int(scene.classes[target])
            if self.task in ("rec", "res"):
                sample["class_map"] = torch.from_numpy(scene.class_map())
            if self.task == "caption":
                kind = self.prompt_types[int(rng.integers(len(self.prompt_types)))]
                sample["prompt_type"] = kind
                sample["prompt_mask"] = torch.from_numpy(
                    visual_prompt(kind, mask, scene.boxes[target], rng))
                sample["caption"] = self._caption(scene, target)
        elif self.task in ("det", "keypoints"):
            present = np.unique(scene.classes)
            label = int(present[rng.integers(present.size)])
            chosen = np.flatnonzero(scene.classes == label)
            sample["category"] = SHAPE_CLASSES[label]
            sample["label"] = label
            sample["boxes"] = torch.from_numpy(scene.boxes[chosen])
            sample["masks"] = torch.from_numpy(scene.visible_masks()[chosen])
            sample["labels"] = torch.full((chosen.size,), label, dtype=torch.int64)
            if self.task == "keypoints":
                sample["keypoints"] = torch.from_numpy(scene.keypoints()[chosen])
        else:
            sample["depth"] = torch.from_numpy(scene.depth_map())
        sample["image"] = _image_tensor(scene.image)
        return sample

    def _caption(self, scene: Scene, target: int) -> str:
        text = (f"a {_size_word(float(scene.radii[target]), min(self.height, self.width))} "
                f"{scene.color_name(target)} {scene.class_name(target)}")
        if scene.visible_areas[target] < 0.9 * scene.full_areas[target]:
            text += ", partly hidden"
        return text
