"""``UnifiedEvaluator``: every task of a multi-task evaluation in one flat metrics dict.

Per sample, ``update(task, prediction, target)`` with the formats below (pixels, xyxy boxes);
``compute()`` runs each family's existing metric — REC/RES (:mod:`trp.metrics.rec`,
:mod:`trp.metrics.res`), COCO AP through pycocotools (:func:`trp.metrics.coco_evaluate`), depth
(:mod:`trp.metrics.depth`), captions through pycocoevalcap (:mod:`trp.metrics.caption`) — and
prefixes the keys with the task family:

* ``rec``: ``box`` [4] / ``box`` [4] -> ``rec/IoU``, ``rec/ACC@0.5``, … (lmms-eval's set);
* ``res``: ``mask`` bool [H, W] / ``mask`` -> ``res/cIoU``, ``res/gIoU``;
* ``det``: ``boxes`` [M, 4], ``scores`` [M], ``labels`` [M] / ``boxes``, ``labels`` ->
  ``det/AP``, ``det/AP50``, … (COCO bbox);
* ``seg``: ``masks`` bool [M, H, W], ``scores``, ``labels`` / ``masks``, ``boxes``,
  ``labels`` -> ``det/mask_AP``, ``det/mask_AP50``, ``det/mask_AP75`` (COCO segm);
* ``keypoints``: ``keypoints`` [M, K, 3], ``scores``, ``labels`` / ``keypoints``, ``boxes``,
  ``labels``, optional ``areas`` -> ``kpt/AP``, ``kpt/AP50``, … (COCO OKS);
* ``depth``: ``depth`` [H, W] / ``depth`` [H, W] -> ``depth/AbsRel``, ``depth/RMSE``,
  ``depth/delta1``, …;
* ``region_caption``: ``text`` / ``text`` (str or list of str) -> ``caption/BLEU-4``,
  ``caption/METEOR``, ``caption/ROUGE-L``, ``caption/CIDEr``, ``caption/exact_match``;
* ``grounded_caption``: ``text``, ``boxes``, ``scores``, ``labels`` / ``text``, ``boxes``,
  ``labels`` -> ``gcap/exact_match``, ``gcap/AP50``;
* ``text``: ``text`` / ``text`` -> ``text/exact_match``.

A ``det``/``seg``/``keypoints`` target with ``negative=True`` (no queried class in the image)
also counts towards ``noobj/accuracy``: the fraction of negatives answered with no object.
A prediction of ``None`` means the model gave no usable answer (e.g. it did not parse): an
empty detection (but a wrong answer to a negative), a zero box / empty mask for REC / RES, an
empty caption; a missing depth map
is counted in ``depth/missing`` and left out of the depth averages (there is nothing to score).
``{task}/count`` gives the samples of each task; a task without samples reports NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trp.metrics.caption import CAPTION_METRIC_NAMES, caption_metrics, exact_match
from trp.metrics.coco import BBOX_NAMES, KEYPOINT_NAMES, coco_evaluate
from trp.metrics.depth import DEPTH_METRIC_NAMES, depth_metrics
from trp.metrics.rec import REC_METRIC_NAMES, rec_metrics
from trp.metrics.res import RES_METRIC_NAMES, mask_intersection_union

__all__ = ["EVALUATED_TASKS", "UnifiedEvaluator"]

EVALUATED_TASKS: tuple[str, ...] = (
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
_NEGATIVE_TASKS = ("det", "seg", "keypoints")
_INSTANCE_KEY = {
    "det": "boxes",
    "seg": "masks",
    "keypoints": "keypoints",
    "grounded_caption": "boxes",
}


def _tensor(d: Mapping[str, Any], key: str, what: str) -> Tensor:
    if key not in d:
        raise KeyError(f"{what} lacks {key!r}")
    v = d[key]
    if not isinstance(v, Tensor):
        raise TypeError(f"{what}: {key!r} must be a Tensor, got {type(v).__name__}")
    return v.detach().cpu()


class UnifiedEvaluator:
    """Collects per-sample predictions and targets of every task; see the module docstring.

    Args:
        oks_sigmas: per-keypoint OKS sigmas for ``kpt/AP`` (e.g. ``trp.data.KEYPOINT_OKS_SIGMAS``
            for the synthetic shapes; default: COCO's 17 person sigmas).
        caption_tokenize: PTB-tokenise captions (Java), as lmms-eval does.
        caption_scores: the pycocoevalcap scores to compute (``CAPTION_METRIC_NAMES``).
    """

    def __init__(
        self,
        *,
        oks_sigmas: Sequence[float] | None = None,
        caption_tokenize: bool = True,
        caption_scores: Sequence[str] = CAPTION_METRIC_NAMES,
    ) -> None:
        bad = [m for m in caption_scores if m not in CAPTION_METRIC_NAMES]
        if bad:
            raise ValueError(f"unknown caption scores {bad}; expected {CAPTION_METRIC_NAMES}")
        self.oks_sigmas = None if oks_sigmas is None else tuple(float(s) for s in oks_sigmas)
        self.caption_tokenize = bool(caption_tokenize)
        self.caption_scores = tuple(caption_scores)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._items: dict[str, list[tuple[Any, dict[str, Any]]]] = {t: [] for t in EVALUATED_TASKS}
        self._negatives: list[bool] = []
        self._missing_depth = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._items.values())

    def update(
        self, task: str, prediction: Mapping[str, Any] | None, target: Mapping[str, Any]
    ) -> None:
        """Add one sample of ``task`` (keys in the module docstring); checks shapes now, so a bad
        sample fails where it is added, not at ``compute``."""
        if task not in EVALUATED_TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {EVALUATED_TASKS}")
        if not isinstance(target, Mapping):
            raise TypeError(f"target must be a mapping, got {type(target).__name__}")
        if prediction is not None and not isinstance(prediction, Mapping):
            raise TypeError(f"prediction must be a mapping or None, got {type(prediction)}")
        pred, tgt = self._check(task, prediction, dict(target))
        if task in _NEGATIVE_TASKS and bool(target.get("negative", False)):
            key = _INSTANCE_KEY[task]
            # None (no usable answer) never counts as "there is none": the model did not say so.
            self._negatives.append(prediction is not None and pred[key].shape[0] == 0)
        if task == "depth" and pred is None:
            self._missing_depth += 1
        self._items[task].append((pred, tgt))

    # ------------------------------------------------------------------ validation
    def _check(
        self, task: str, pred: Mapping[str, Any] | None, tgt: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        n = len(self._items[task])
        what_t, what_p = f"{task} target {n}", f"{task} prediction {n}"
        if task == "rec":
            box = _tensor(tgt, "box", what_t).float()
            if box.shape != (4,):
                raise ValueError(f"{what_t}: box must be [4] xyxy, got {tuple(box.shape)}")
            p = torch.zeros(4) if pred is None else _tensor(pred, "box", what_p).float()
            if p.shape != (4,):
                raise ValueError(f"{what_p}: box must be [4] xyxy, got {tuple(p.shape)}")
            return {"box": p}, {"box": box}
        if task == "res":
            mask = _tensor(tgt, "mask", what_t)
            p = (
                torch.zeros_like(mask, dtype=torch.bool)
                if pred is None
                else _tensor(pred, "mask", what_p)
            )
            if p.shape != mask.shape or mask.dim() != 2:
                raise ValueError(f"{what_p}: mask {tuple(p.shape)} vs target {tuple(mask.shape)}")
            if p.is_floating_point():
                raise TypeError(f"{what_p}: mask must be bool (threshold logits first)")
            return {"mask": p}, {"mask": mask}
        if task == "depth":
            depth = _tensor(tgt, "depth", what_t).float()
            if pred is None:
                return None, {"depth": depth}
            p = _tensor(pred, "depth", what_p).float()
            if p.shape != depth.shape or depth.dim() != 2:
                raise ValueError(f"{what_p}: depth {tuple(p.shape)} vs {tuple(depth.shape)}")
            return {"depth": p}, {"depth": depth}
        if task in ("region_caption", "text", "grounded_caption"):
            ref = tgt.get("text")
            if not (
                isinstance(ref, str)
                or (isinstance(ref, Sequence) and ref and all(isinstance(r, str) for r in ref))
            ):
                raise ValueError(f"{what_t}: text must be a str or a list of str")
            text = "" if pred is None else pred.get("text")
            if not isinstance(text, str):
                raise TypeError(f"{what_p}: text must be a str")
            out_p: dict[str, Any] = {"text": text}
            out_t: dict[str, Any] = {"text": ref}
            if task != "grounded_caption":
                return out_p, out_t
            det_p, det_t = self._instances("det", pred, tgt, what_p, what_t)
            return {**out_p, **det_p}, {**out_t, **det_t}
        return self._instances(task, pred, tgt, what_p, what_t)

    @staticmethod
    def _instances(
        task: str, pred: Mapping[str, Any] | None, tgt: Mapping[str, Any], what_p: str, what_t: str
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        key = _INSTANCE_KEY.get(task, "boxes")
        t_keys = {
            "det": ("boxes", "labels"),
            "seg": ("boxes", "labels", "masks"),
            "keypoints": ("boxes", "labels", "keypoints"),
        }[task]
        target = {k: _tensor(tgt, k, what_t) for k in t_keys}
        if "areas" in tgt:
            target["areas"] = _tensor(tgt, "areas", what_t)
        if pred is None:
            empty = {
                "boxes": torch.zeros(0, 4),
                "masks": torch.zeros((0, *target["masks"].shape[1:]), dtype=torch.bool)
                if "masks" in target
                else None,
                "keypoints": torch.zeros(0, *target["keypoints"].shape[1:])
                if "keypoints" in target
                else None,
            }
            p = {
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.long),
                key: empty[key],
            }
        else:
            p = {k: _tensor(pred, k, what_p) for k in ("scores", "labels", key)}
        if key in target and p[key].shape[0] == 0:
            # No detection: any empty tensor will do; give it the target's trailing shape.
            p[key] = target[key].new_zeros((0, *target[key].shape[1:]))
        m = p["labels"].shape[0]
        if p["scores"].shape != (m,) or p[key].shape[:1] != (m,):
            raise ValueError(f"{what_p}: scores, labels and {key} must have {m} rows")
        return p, target

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, float]:
        """The flat metrics dict (keys in the module docstring)."""
        out: dict[str, float] = {}
        items = self._items
        nan = float("nan")
        for task in EVALUATED_TASKS:
            out[f"{task}/count"] = float(len(items[task]))
        rec = items["rec"]
        rec_values = (
            rec_metrics(
                torch.stack([p["box"] for p, _ in rec]), torch.stack([t["box"] for _, t in rec])
            )
            if rec
            else {}
        )
        out.update({f"rec/{k}": rec_values.get(k, nan) for k in REC_METRIC_NAMES})
        out.update({f"res/{k}": v for k, v in self._res(items["res"]).items()})
        out.update(self._coco(items["det"], "bbox", "det/", BBOX_NAMES))
        seg = self._coco(items["seg"], "segm", "det/mask_", ("AP", "AP50", "AP75"))
        out.update(seg)
        out.update(self._coco(items["keypoints"], "keypoints", "kpt/", KEYPOINT_NAMES))
        depth = [(p["depth"], t["depth"]) for p, t in items["depth"] if p is not None]
        depth_values = (
            depth_metrics(torch.stack([p for p, _ in depth]), torch.stack([t for _, t in depth]))
            if depth
            else {}
        )
        out.update({f"depth/{k}": depth_values.get(k, nan) for k in DEPTH_METRIC_NAMES})
        out["depth/missing"] = float(self._missing_depth)
        caps = items["region_caption"]
        if caps:
            preds, refs = [p["text"] for p, _ in caps], [t["text"] for _, t in caps]
            scores = caption_metrics(
                preds, refs, metrics=self.caption_scores, tokenize=self.caption_tokenize
            )
            out.update({f"caption/{k}": v for k, v in scores.items()})
            out["caption/exact_match"] = exact_match(preds, refs)
        else:
            out.update({f"caption/{k}": nan for k in (*self.caption_scores, "exact_match")})
        for task, prefix in (("grounded_caption", "gcap"), ("text", "text")):
            rows = items[task]
            out[f"{prefix}/exact_match"] = (
                exact_match([p["text"] for p, _ in rows], [t["text"] for _, t in rows])
                if rows
                else nan
            )
        out.update(self._coco(items["grounded_caption"], "bbox", "gcap/", ("AP50",)))
        out["noobj/accuracy"] = (
            sum(self._negatives) / len(self._negatives) if self._negatives else nan
        )
        out["noobj/count"] = float(len(self._negatives))
        return out

    @staticmethod
    def _res(rows: list[tuple[Any, dict[str, Any]]]) -> dict[str, float]:
        if not rows:
            return {k: float("nan") for k in RES_METRIC_NAMES}
        inter = union = 0.0
        ious = []
        for p, t in rows:
            i, u = mask_intersection_union(p["mask"][None], t["mask"][None])
            i, u = float(i[0]), float(u[0])
            inter, union = inter + i, union + u
            # Both empty: IoU 1 (GRES convention, as trp.metrics.res).
            ious.append(i / u if u > 0 else 1.0)
        return {"cIoU": inter / union if union > 0 else 1.0, "gIoU": sum(ious) / len(ious)}

    def _coco(
        self,
        rows: list[tuple[Any, dict[str, Any]]],
        iou_type: str,
        prefix: str,
        names: Sequence[str],
    ) -> dict[str, float]:
        if not rows or not any(t["labels"].numel() for _, t in rows):
            # No ground truth at all: COCO AP is undefined (-1 in pycocotools); report NaN.
            return {f"{prefix}{k}": float("nan") for k in names}
        kwargs = {"oks_sigmas": self.oks_sigmas} if iou_type == "keypoints" else {}
        preds = [{k: v for k, v in p.items() if k != "text"} for p, _ in rows]
        targets = [{k: v for k, v in t.items() if k != "text"} for _, t in rows]
        values = coco_evaluate(preds, targets, iou_type=iou_type, **kwargs)
        return {f"{prefix}{k}": values[k] if values[k] != -1 else math.nan for k in names}
