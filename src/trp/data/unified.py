"""``UnifiedShapesDataset``: one seeded stream of multi-task samples on the synthetic scenes.

REF-VLM's VT-Instruct and PaDT Pro train one model on many tasks at once; this dataset draws,
per sample, a task from configurable mixture weights among ``UNIFIED_TASKS``:

* ``rec`` / ``res``: a referring expression, answered by one ``box`` / ``mask`` triplet;
* ``det`` / ``seg``: "every circle and star" — one triplet per queried class present in the
  image, one target per instance; when no queried class is present (a *negative*) the answer is
  the plain text ``"None."``;
* ``keypoints``: the same over the ``keypoint`` unit;
* ``depth``: one ``depth`` triplet whose target is the whole depth map;
* ``region_caption``: a visual prompt (point, box, scribble or mask, rendered by
  :func:`trp.data.visual_prompt`) at the question's ``[VPT]``; the answer is a plain caption;
* ``grounded_caption``: a caption of the scene with one ``box`` triplet per shape, in place;
* ``text``: a counting question with a plain text answer (images may hold no object).

Targets are ``[i]<REF>`` slots or VRT runs (``targets=``, per task). Every sample has the same
keys (so :func:`trp.data.collate` batches any mixture); tasks without some target have empty
tensors there. Sample ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng((s, i))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from trp.data.collate import collate
from trp.data.prompts import PROMPT_TYPES, visual_prompt
from trp.data.referring import SceneFacts, refer_any
from trp.data.scene import MAX_KEYPOINTS, SHAPE_CLASSES, Scene, sample_scene
from trp.data.shapes import _image_tensor, _size_word
from trp.grammar import (
    FormattedAnswer,
    VisualPrompt,
    format_depth,
    format_detection,
    format_grounded_caption,
    format_keypoints,
    format_rec,
    format_reg,
    format_res,
    format_segmentation,
    format_vpt_question,
    format_vqa,
)

__all__ = [
    "DEFAULT_MIXTURE",
    "GROUNDING_TASKS",
    "TARGET_KINDS",
    "TASK_UNITS",
    "UNIFIED_TASKS",
    "UnifiedShapesDataset",
    "collate_unified",
]

UNIFIED_TASKS: tuple[str, ...] = (
    "rec",
    "res",
    "det",
    "seg",
    "keypoints",
    "depth",
    "region_caption",
    "grounded_caption",
    "text",
)
TARGET_KINDS: tuple[str, ...] = ("ref", "vrt")
# The unit each task's triplets use (``None``: the answer is plain text).
TASK_UNITS: dict[str, str | None] = {
    "rec": "box",
    "res": "mask",
    "det": "box",
    "seg": "mask",
    "keypoints": "keypoint",
    "depth": "depth",
    "region_caption": None,
    "grounded_caption": "box",
    "text": None,
}
# Tasks whose answer may be "there is none" (a negative query or an image with no object).
GROUNDING_TASKS: tuple[str, ...] = ("det", "seg", "keypoints")
DEFAULT_MIXTURE: dict[str, float] = {
    "rec": 2.0,
    "res": 2.0,
    "det": 2.0,
    "seg": 1.0,
    "keypoints": 1.0,
    "depth": 1.0,
    "region_caption": 1.0,
    "grounded_caption": 1.0,
    "text": 0.5,
}
# Tasks whose image may be drawn without any object.
_EMPTY_OK = ("det", "seg", "keypoints", "depth", "text")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PLURAL = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
_QUESTIONS = {
    "rec": "Locate {}.",
    "res": "Segment {}.",
    "det": "Detect every {}.",
    "seg": "Segment every {}.",
    "keypoints": "Find the keypoints of every {}.",
    "depth": "Estimate the depth map.",
    "region_caption": "Describe the region {}.",
    "grounded_caption": "Describe the image and ground every shape.",
}

# What a task builder returns: (prompt, answer, objects in target order, extra sample keys), or
# None when the scene cannot serve the task (the sample redraws its scene).
_Built = tuple[str, FormattedAnswer, list[int], dict[str, Any]] | None


def _join(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class UnifiedShapesDataset(Dataset):
    """Multi-task synthetic samples; see the module docstring for the tasks.

    Args:
        num_samples: dataset length (> 0).
        seed: dataset seed.
        image_size: ``int`` or ``(height, width)``; each a multiple of ``patch_size``, >= 16.
        mixture: task -> non-negative weight (missing tasks weigh 0; default
            ``DEFAULT_MIXTURE``); at least one weight must be positive.
        targets: ``"ref"`` or ``"vrt"`` for every task, or a task -> kind mapping (missing tasks
            use ``"ref"``). ``depth`` is always a ``<REF>`` slot (a depth map is not an object
            a run of patches could name).
        patch_size: pixels per VRT patch (the vision encoder's grid).
        num_vrt: patches sampled per VRT run (PaDT's "padt" sampling; duplicates dropped).
        min_shapes, max_shapes: shapes per non-empty scene (1 <= min <= max).
        empty_image_prob: probability that a ``det``/``seg``/``keypoints``/``depth``/``text``
            image holds no object.
        negative_prob: probability that a ``det``/``seg``/``keypoints`` query names only
            classes absent from the image (when some class is absent).
        max_query_classes: most classes one detection query names.
        kind_weights: (attribute, position, relation) weights of referring expressions.
        prompt_types: visual prompt kinds drawn uniformly for ``region_caption``.
        balanced: ``True``: sample ``i`` serves the tasks of the mixture in turn (task ``i`` mod
            their number; the weights only decide which tasks take part), so a held-out set
            holds the same number of scenes of every task.

    Sample keys (``N`` = objects grounded in the answer, in answer target order; ``H x W``):

    * ``index`` (int), ``task`` (str), ``image`` (float32 ``[3, H, W]`` in [0, 1]);
    * ``prompt`` (str, the user instruction; ``[VPT]`` marks a visual prompt), ``answer``
      (str, the TRP answer), ``reference`` (str: the text a caption/text answer is scored
      against, else ``""``), ``target_kind`` (``"ref"``/``"vrt"``), ``negative`` (bool: a
      grounding query whose answer has no target), ``categories`` (list of queried classes);
    * ``prompt_type`` (str, ``""`` without prompt), ``prompt_mask`` (bool ``[H, W]``, all
      False without prompt);
    * ``boxes`` (float32 ``[N, 4]`` xyxy pixels), ``masks`` (bool ``[N, H, W]``), ``labels``
      (int64 ``[N]``), ``keypoints`` (float32 ``[N, MAX_KEYPOINTS, 3]`` pixels ``(x, y, v)``),
      ``areas`` (float32 ``[N]``, visible pixels), ``triplet`` (int64 ``[N]``: the triplet of
      each object), ``vrt_runs`` (``list[list[int]]``, one run per object; empty for REF);
    * ``depth`` (float32 ``[H, W]``, the scene's depth; a target only for ``task="depth"``);
    * ``class_map`` (uint8 ``[H, W]``: 1 + the class of every visible shape, 0 background; the
      labels of the recipe's patch-class probe, whatever the task);
    * ``targets``: unit -> the unit criterion's targets in the heads' formats, for the units of
      the answer only: ``box`` ``{"boxes": [N, 4] cxcywh in [0, 1], "triplet"}``, ``mask``
      ``{"masks": bool [N, H, W], "triplet"}``, ``keypoint`` ``{"keypoints": [N, K, 3] with x, y
      in [0, 1], "areas": [N] fractions of the image, "triplet"}``, ``depth`` ``{"depth":
      [1, H, W], "triplet": [1]}``. A collator turns ``triplet`` into the criteria's ``group``
      (:func:`trp.heads.triplet_group`).
    """

    def __init__(
        self,
        *,
        num_samples: int,
        seed: int = 0,
        image_size: int | tuple[int, int] = 128,
        mixture: Mapping[str, float] | None = None,
        targets: str | Mapping[str, str] = "ref",
        patch_size: int = 16,
        num_vrt: int = 4,
        min_shapes: int = 1,
        max_shapes: int = 5,
        empty_image_prob: float = 0.05,
        negative_prob: float = 0.25,
        max_query_classes: int = 2,
        kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
        prompt_types: Sequence[str] = PROMPT_TYPES,
        balanced: bool = False,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or min(image_size) < 16:
            raise ValueError(f"image_size must be >= 16 (int or (h, w)), got {image_size}")
        if patch_size < 1 or image_size[0] % patch_size or image_size[1] % patch_size:
            raise ValueError(
                f"image_size {tuple(image_size)} must be multiples of patch_size {patch_size}"
            )
        self.num_samples = num_samples
        self.seed = int(seed)
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.patch_size = int(patch_size)
        self.grid = (self.height // self.patch_size, self.width // self.patch_size)
        self.mixture = self._check_mixture(DEFAULT_MIXTURE if mixture is None else mixture)
        self.tasks = tuple(t for t in UNIFIED_TASKS if self.mixture[t] > 0)
        weights = np.array([self.mixture[t] for t in self.tasks])
        self._cumulative = np.cumsum(weights / weights.sum())
        self.balanced = bool(balanced)
        self.target_kinds = self._check_targets(targets)
        if num_vrt < 1:
            raise ValueError(f"num_vrt must be >= 1, got {num_vrt}")
        self.num_vrt = int(num_vrt)
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        for name, p in (("empty_image_prob", empty_image_prob), ("negative_prob", negative_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        self.empty_image_prob = float(empty_image_prob)
        self.negative_prob = float(negative_prob)
        if not 1 <= max_query_classes <= len(SHAPE_CLASSES):
            raise ValueError(
                f"max_query_classes must be in [1, {len(SHAPE_CLASSES)}], got {max_query_classes}"
            )
        self.max_query_classes = int(max_query_classes)
        kw = tuple(float(w) for w in kind_weights)
        if len(kw) != 3 or min(kw) < 0 or sum(kw) <= 0:
            raise ValueError(f"kind_weights must be 3 non-negative numbers, got {kind_weights}")
        self.kind_weights = kw
        bad = [p for p in prompt_types if p not in PROMPT_TYPES]
        if bad or not prompt_types:
            raise ValueError(f"prompt_types must be a non-empty subset of {PROMPT_TYPES}")
        self.prompt_types = tuple(prompt_types)
        self.class_names = SHAPE_CLASSES

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def _check_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
        if not isinstance(mixture, Mapping):
            raise TypeError(f"mixture must be a task -> weight mapping, got {type(mixture)}")
        unknown = sorted(set(mixture) - set(UNIFIED_TASKS))
        if unknown:
            raise ValueError(f"unknown tasks in mixture: {unknown}; expected {UNIFIED_TASKS}")
        out = {t: float(mixture.get(t, 0.0)) for t in UNIFIED_TASKS}
        if any(not np.isfinite(w) or w < 0 for w in out.values()) or sum(out.values()) <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0, with a positive sum: {out}")
        return out

    @staticmethod
    def _check_targets(targets: str | Mapping[str, str]) -> dict[str, str]:
        if isinstance(targets, str):
            targets = {t: targets for t in UNIFIED_TASKS if t != "depth"}
        if not isinstance(targets, Mapping):
            raise TypeError("targets must be 'ref', 'vrt' or a task -> kind mapping")
        unknown = sorted(set(targets) - set(UNIFIED_TASKS))
        if unknown:
            raise ValueError(f"unknown tasks in targets: {unknown}; expected {UNIFIED_TASKS}")
        out = {t: str(targets.get(t, "ref")) for t in UNIFIED_TASKS}
        bad = {t: k for t, k in out.items() if k not in TARGET_KINDS}
        if bad:
            raise ValueError(f"target kinds must be one of {TARGET_KINDS}, got {bad}")
        if out["depth"] != "ref":
            raise ValueError("depth targets are <REF> slots: a depth map is not a patch run")
        return out

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return np.random.default_rng((self.seed, int(index)))

    def task_of(self, index: int) -> str:
        """The task of sample ``index`` (the first draw of its generator, or with ``balanced``
        the index's turn)."""
        return self._task(self._rng(index), index)

    def _task(self, rng: np.random.Generator, index: int) -> str:
        # Drawn either way, so the rest of the sample's stream does not depend on ``balanced``.
        j = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
        if self.balanced:
            return self.tasks[int(index) % len(self.tasks)]
        return self.tasks[min(j, len(self.tasks) - 1)]

    def _scene(self, rng: np.random.Generator, task: str) -> Scene:
        scene = sample_scene(
            rng,
            height=self.height,
            width=self.width,
            min_shapes=self.min_shapes,
            max_shapes=self.max_shapes,
        )
        if task in _EMPTY_OK and rng.random() < self.empty_image_prob:
            return _empty_scene(scene)
        return scene

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        task = self._task(rng, index)
        while True:
            scene = self._scene(rng, task)
            built = getattr(self, f"_{task}")(scene, rng)
            # A scene can (rarely) hold no object with an unambiguous expression: redraw.
            if built is not None:
                break
        prompt, answer, chosen, extra = built
        return self._sample(index, task, scene, rng, prompt, answer, chosen, extra)

    # ------------------------------------------------------------------ tasks
    # Each returns (prompt, FormattedAnswer, objects in target order, extra keys) or None.
    def _runs(
        self, scene: Scene, objects: Sequence[int], task: str, rng: np.random.Generator
    ) -> list[list[int]] | None:
        if self.target_kinds[task] != "vrt":
            return None
        from trp.vrt import mask_coverage, sample_target_patches, target_patches

        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        runs = []
        for k in objects:
            allowed = target_patches(
                mask_coverage(torch.from_numpy(scene.label_map == k), self.grid)
            )
            run = sample_target_patches(
                allowed, self.grid, num=self.num_vrt, mode="padt", generator=gen
            )
            runs.append(run.unique().tolist())
        return runs

    def _referring(self, scene: Scene, rng: np.random.Generator, task: str) -> _Built:
        found = refer_any(SceneFacts.from_scene(scene), rng, kind_weights=self.kind_weights)
        if found is None:
            return None
        target, ref = found
        expr = ref.text()
        runs = self._runs(scene, [target], task, rng)
        patches = None if runs is None else runs[0]
        fmt = format_rec if task == "rec" else format_res
        answer = fmt(expr, patches=patches)
        return _QUESTIONS[task].format(expr), answer, [target], {"expression": expr}

    def _rec(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return self._referring(scene, rng, "rec")

    def _res(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return self._referring(scene, rng, "res")

    def _query_classes(self, scene: Scene, rng: np.random.Generator) -> list[int]:
        present = sorted(set(scene.classes.tolist()))
        absent = [c for c in range(len(SHAPE_CLASSES)) if c not in present]
        n = int(rng.integers(1, self.max_query_classes + 1))
        if not present or (absent and rng.random() < self.negative_prob):
            pool = absent
        else:
            pool = present
        picked = rng.permutation(pool)[: min(n, len(pool))]
        return sorted(int(c) for c in picked)

    def _instances(self, scene: Scene, rng: np.random.Generator, task: str) -> _Built:
        classes = self._query_classes(scene, rng)
        names = [SHAPE_CLASSES[c] for c in classes]
        # Instances grouped by class in query order, left to right within a class.
        objects = [
            int(k)
            for c in classes
            for k in sorted(
                np.flatnonzero(scene.classes == c).tolist(), key=lambda k: float(scene.boxes[k, 0])
            )
        ]
        runs = self._runs(scene, objects, task, rng)
        pairs = [(scene.class_name(k), k) for k in objects]
        if task == "keypoints":
            kps = scene.keypoints() if objects else None
            answer = format_keypoints([(c, {"keypoints": kps[k]}) for c, k in pairs], patches=runs)
        elif task == "seg":
            answer = format_segmentation(pairs, patches=runs)
        else:
            answer = format_detection(pairs, patches=runs)
        prompt = _QUESTIONS[task].format(_join(names))
        return prompt, answer, objects, {"categories": names}

    def _det(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return self._instances(scene, rng, "det")

    def _seg(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return self._instances(scene, rng, "seg")

    def _keypoints(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return self._instances(scene, rng, "keypoints")

    def _depth(self, scene: Scene, rng: np.random.Generator) -> _Built:
        return _QUESTIONS["depth"], format_depth(), [], {}

    def _describe(self, scene: Scene, k: int) -> str:
        side = min(self.height, self.width)
        text = (
            f"a {_size_word(float(scene.radii[k]), side)} {scene.color_name(k)} "
            f"{scene.class_name(k)}"
        )
        if scene.visible_areas[k] < 0.9 * scene.full_areas[k]:
            text += ", partly hidden"
        return text

    def _region_caption(self, scene: Scene, rng: np.random.Generator) -> _Built:
        k = int(rng.integers(scene.num_shapes))
        kind = self.prompt_types[int(rng.integers(len(self.prompt_types)))]
        mask = scene.label_map == k
        prompt_mask = visual_prompt(kind, mask, scene.boxes[k], rng)
        caption = self._describe(scene, k)
        question = format_vpt_question(
            _QUESTIONS["region_caption"], [VisualPrompt("mask", torch.from_numpy(prompt_mask))]
        )
        extra = {"prompt_type": kind, "prompt_mask": prompt_mask, "reference": caption}
        return question, format_reg(caption), [], extra

    def _grounded_caption(self, scene: Scene, rng: np.random.Generator) -> _Built:
        objects = sorted(range(scene.num_shapes), key=lambda k: float(scene.boxes[k, 0]))
        phrases = [f"a {scene.color_name(k)} {scene.class_name(k)}" for k in objects]
        caption, spans = "There is ", []
        for j, phrase in enumerate(phrases):
            if j:
                caption += " and " if j == len(phrases) - 1 else ", "
            spans.append((len(caption), len(caption) + len(phrase), [objects[j]]))
            caption += phrase
        caption += " from left to right." if len(phrases) > 1 else "."
        runs = self._runs(scene, objects, "grounded_caption", rng)
        answer = format_grounded_caption(
            caption, spans, patches=None if runs is None else [[r] for r in runs]
        )
        return _QUESTIONS["grounded_caption"], answer, objects, {"reference": caption}

    def _text(self, scene: Scene, rng: np.random.Generator) -> _Built:
        if rng.random() < 0.5 or scene.num_shapes == 0:
            question, count = "How many shapes are there?", scene.num_shapes
        else:
            c = int(rng.integers(len(SHAPE_CLASSES)))
            question = f"How many {_PLURAL[SHAPE_CLASSES[c]]} are there?"
            count = int((scene.classes == c).sum())
        reply = _NUMBERS[count].capitalize() + "."
        return question, format_vqa(reply), [], {"reference": reply}

    # ------------------------------------------------------------------ assembly
    def _sample(
        self,
        index: int,
        task: str,
        scene: Scene,
        rng: np.random.Generator,
        prompt: str,
        answer: FormattedAnswer,
        objects: list[int],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        h, w = self.height, self.width
        n = len(objects)
        sel = np.asarray(objects, dtype=np.intp)
        boxes = scene.boxes[sel].astype(np.float32).reshape(n, 4)
        masks = (scene.label_map[None] == sel.astype(np.int16)[:, None, None]).reshape(n, h, w)
        kps = scene.keypoints()[sel] if n else np.zeros((0, MAX_KEYPOINTS, 3), np.float32)
        # The depth triplet's target is the map, not an object of the scene.
        triplet = np.zeros(0, np.int64) if task == "depth" else _object_triplets(answer, n)
        runs = [
            list(t.patches) for tr in answer.triplets for t in tr.targets if t.patches is not None
        ]
        sample: dict[str, Any] = {
            "index": int(index),
            "task": task,
            "prompt": prompt,
            "answer": answer.text,
            "reference": extra.get("reference", ""),
            "target_kind": self.target_kinds[task],
            "negative": task in GROUNDING_TASKS and n == 0,
            "categories": list(extra.get("categories", [])),
            "expression": extra.get("expression", ""),
            "prompt_type": extra.get("prompt_type", ""),
            "prompt_mask": torch.from_numpy(
                np.asarray(extra.get("prompt_mask", np.zeros((h, w), bool)), dtype=bool)
            ),
            "boxes": torch.from_numpy(boxes),
            "masks": torch.from_numpy(masks),
            "labels": torch.from_numpy(scene.classes[sel].astype(np.int64).reshape(n)),
            "keypoints": torch.from_numpy(kps.astype(np.float32)),
            "areas": torch.from_numpy(scene.visible_areas[sel].astype(np.float32).reshape(n)),
            "triplet": torch.from_numpy(triplet),
            "vrt_runs": runs,
            "depth": torch.from_numpy(scene.depth_map()),
            # 1 + the class of every visible shape, 0 background (the patch-class probe's labels).
            "class_map": torch.from_numpy(scene.class_map()),
            "image": _image_tensor(scene.image),
        }
        sample["targets"] = self._targets(task, sample)
        return sample

    def _targets(self, task: str, s: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        unit = TASK_UNITS[task]
        h, w = self.height, self.width
        if unit is None or (unit != "depth" and s["boxes"].shape[0] == 0):
            return {}
        triplet = s["triplet"]
        if unit == "depth":
            return {
                "depth": {
                    "depth": s["depth"][None].clone(),
                    "triplet": torch.zeros(1, dtype=torch.int64),
                }
            }
        if unit == "box":
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            xyxy = s["boxes"] / scale
            cxcywh = torch.stack(
                [
                    (xyxy[:, 0] + xyxy[:, 2]) / 2,
                    (xyxy[:, 1] + xyxy[:, 3]) / 2,
                    xyxy[:, 2] - xyxy[:, 0],
                    xyxy[:, 3] - xyxy[:, 1],
                ],
                dim=1,
            )
            # The masks train the light box head's box-region map (BoxCriterion weight_region).
            return {"box": {"boxes": cxcywh, "masks": s["masks"].clone(), "triplet": triplet}}
        if unit == "mask":
            return {"mask": {"masks": s["masks"].clone(), "triplet": triplet}}
        kp = s["keypoints"].clone()
        kp[..., 0] /= w
        kp[..., 1] /= h
        return {
            "keypoint": {"keypoints": kp, "areas": s["areas"] / float(h * w), "triplet": triplet}
        }


def _object_triplets(answer: FormattedAnswer, n: int) -> np.ndarray:
    """int64 ``[n]``: the triplet index of each target, in answer order."""
    out = np.asarray([j for j, t in enumerate(answer.triplets) for _ in t.targets], np.int64)
    if out.size != n:
        raise AssertionError(f"answer has {out.size} targets for {n} objects")
    return out


def _empty_scene(scene: Scene) -> Scene:
    """``scene`` with every shape removed: its background colour, no objects."""
    background = scene.image[scene.label_map < 0]
    colour = background[0] if background.size else np.full(3, 128, np.uint8)
    h, w = scene.label_map.shape
    return Scene(
        image=np.broadcast_to(colour, (h, w, 3)).copy(),
        label_map=np.full((h, w), -1, dtype=np.int16),
        classes=np.zeros(0, np.int64),
        colors=np.zeros(0, np.int64),
        centers=np.zeros((0, 2)),
        radii=np.zeros(0),
        angles=np.zeros(0),
        full_areas=np.zeros(0, np.int64),
        visible_areas=np.zeros(0, np.int64),
        boxes=np.zeros((0, 4), np.float32),
        depths=np.zeros(0, np.float32),
        background_depth=scene.background_depth,
    )


# Per-object keys of unified samples beyond trp.data.PER_INSTANCE_KEYS: kept as lists, never
# stacked, whatever the batch's sizes happen to be.
_UNIFIED_LIST_KEYS = ("triplet", "vrt_runs", "targets", "categories")


def collate_unified(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`trp.data.collate` for :class:`UnifiedShapesDataset` samples.

    ``image`` -> ``[B, 3, H, W]``, ``prompt_mask`` -> bool ``[B, H, W]``, ``depth`` and
    ``class_map`` -> ``[B, H, W]``, ``index``/``negative`` -> ``[B]``; per-object tensors
    (``boxes``, ``masks``, ``labels``, ``keypoints``, ``areas``, ``triplet``), ``targets`` and
    strings stay lists of length B, so mixed tasks, empty images and text-only samples batch
    together.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    for i, s in enumerate(samples):
        missing = [k for k in _UNIFIED_LIST_KEYS if k not in s]
        if missing:
            raise ValueError(f"sample {i} is not a unified sample (missing {missing})")
    lists = {k: [s[k] for s in samples] for k in _UNIFIED_LIST_KEYS}
    batch = collate([{k: v for k, v in s.items() if k not in lists} for s in samples])
    batch.update(lists)
    return batch
