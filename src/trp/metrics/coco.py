"""COCO AP / AR for boxes, masks and keypoints, through ``pycocotools.cocoeval.COCOeval``.

Predictions and targets are per-image dicts of tensors; the GT and DT ``COCO`` objects are
built in memory (image ids 1..I in input order, category id = label + 1).

Target keys: ``boxes`` (``[N, 4]`` xyxy, always), ``labels`` (``[N]`` int), ``masks``
(bool ``[N, H, W]``, for ``"segm"``), ``keypoints`` (``[N, K, 3]`` ``(x, y, v)``, for
``"keypoints"``), optional ``iscrowd`` (``[N]``) and ``areas`` (``[N]``). The area that COCO
uses for small/medium/large ranges and for OKS is ``areas`` when given, else the mask's pixel
count when masks are given, else the box area.

Prediction keys: ``scores`` (``[M]``), ``labels`` (``[M]``), and ``boxes`` (``[M, 4]`` xyxy,
for ``"bbox"``), ``masks`` (bool ``[M, H, W]``, for ``"segm"``) or ``keypoints``
(``[M, K, 3]``, for ``"keypoints"``; the third column is ignored). As ``COCO.loadRes`` does, a
segm detection's box and area come from its mask and a keypoint detection's from the extent of
its keypoints.

Results follow ``COCOeval.summarize``: ``BBOX_NAMES`` for bbox/segm, ``KEYPOINT_NAMES`` for
keypoints; -1 means undefined (no ground truth in that range), as in pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from trp.ops.oks import COCO_KEYPOINT_SIGMAS

IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")
BBOX_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
)
KEYPOINT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"
)
# The one copy of COCO's per-keypoint OKS sigmas lives with the OKS op.
COCO_PERSON_SIGMAS: tuple[float, ...] = COCO_KEYPOINT_SIGMAS


_PER_INSTANCE_KEYS = frozenset({"boxes", "labels", "scores", "masks", "keypoints", "iscrowd",
                                "areas"})


def metric_names(iou_type: str) -> tuple[str, ...]:
    """The result keys of ``iou_type``."""
    return KEYPOINT_NAMES if iou_type == "keypoints" else BBOX_NAMES


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou_type {iou_type!r}; expected one of {IOU_TYPES}")


def _check_image(pred: dict, target: dict, iou_type: str, i: int) -> None:
    need_t = {"bbox": ("boxes", "labels"), "segm": ("boxes", "labels", "masks"),
              "keypoints": ("boxes", "labels", "keypoints")}[iou_type]
    need_p = {"bbox": ("boxes",), "segm": ("masks",), "keypoints": ("keypoints",)}[iou_type]
    for what, d, keys in (("target", target, need_t), ("prediction", pred,
                                                        ("scores", "labels", *need_p))):
        missing = [k for k in keys if k not in d]
        if missing:
            raise KeyError(f"{what} {i} lacks {missing} (needed for iou_type={iou_type!r})")
    for what, d in (("target", target), ("prediction", pred)):
        for key in _PER_INSTANCE_KEYS & d.keys():
            if not isinstance(d[key], Tensor):
                raise TypeError(
                    f"{what} {i}: {key!r} must be a Tensor, got {type(d[key]).__name__}")
    n, m = target["labels"].shape[0], pred["labels"].shape[0]
    for what, d, count in (("target", target, n), ("prediction", pred, m)):
        for key in _PER_INSTANCE_KEYS & d.keys():
            value = d[key]
            if value.shape[:1] != (count,):
                raise ValueError(f"{what} {i}: {key!r} has {tuple(value.shape)[:1]} rows, "
                                 f"labels has {count}")
    if target["boxes"].ndim != 2 or target["boxes"].shape[-1] != 4:
        raise ValueError(f"target {i}: boxes must be [N, 4], got {tuple(target['boxes'].shape)}")
    if iou_type == "bbox" and (pred["boxes"].ndim != 2 or pred["boxes"].shape[-1] != 4):
        raise ValueError(f"prediction {i}: boxes must be [M, 4], got {tuple(pred['boxes'].shape)}")
    if iou_type == "segm" and pred["masks"].shape[1:] != target["masks"].shape[1:]:
        raise ValueError(f"image {i}: predicted masks {tuple(pred['masks'].shape[1:])} and target "
                         f"masks {tuple(target['masks'].shape[1:])} differ in size")
    if iou_type == "keypoints":
        for what, d in (("target", target), ("prediction", pred)):
            if d["keypoints"].ndim != 3 or d["keypoints"].shape[-1] != 3:
                raise ValueError(f"{what} {i}: keypoints must be [N, K, 3], "
                                 f"got {tuple(d['keypoints'].shape)}")


def target_areas(target: dict[str, Tensor]) -> Tensor:
    """Float64 ``[N]``: ``areas`` if given, else mask pixel counts, else box areas."""
    if "areas" in target:
        return torch.as_tensor(target["areas"]).double().cpu()
    if "masks" in target:
        return target["masks"].flatten(1).sum(1).double().cpu()
    wh = (target["boxes"][:, 2:] - target["boxes"][:, :2]).clamp(min=0).double()
    return (wh[:, 0] * wh[:, 1]).cpu()


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.double().cpu()
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()


def _rles(masks: Tensor) -> list[dict]:
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.bool().cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    return mask_utils.encode(array)


def _annotations(
    d: dict[str, Tensor], image_id: int, iou_type: str, first_id: int, is_gt: bool
) -> list[dict[str, Any]]:
    n = len(d["labels"])
    labels = d["labels"].long().cpu().tolist()
    anns = [{"id": first_id + j, "image_id": image_id, "category_id": labels[j] + 1,
             "iscrowd": 0} for j in range(n)]
    if is_gt:
        areas = target_areas(d).tolist()
        crowd = d["iscrowd"].long().cpu().tolist() if "iscrowd" in d else [0] * n
        for a, area, c in zip(anns, areas, crowd):
            a["area"], a["iscrowd"] = area, int(c)
    else:
        for a, s in zip(anns, d["scores"].double().cpu().tolist()):
            a["score"] = s
    if iou_type == "segm":
        from pycocotools import mask as mask_utils

        for a, rle in zip(anns, _rles(d["masks"])):
            a["segmentation"] = rle
            if not is_gt:  # box and area of the mask, as COCO.loadRes sets them
                a["area"] = float(mask_utils.area(rle))
                a["bbox"] = mask_utils.toBbox(rle).tolist()
    if iou_type == "keypoints":
        kps = d["keypoints"].double().cpu()
        for a, k in zip(anns, kps):
            a["keypoints"] = k.flatten().tolist()
            a["num_keypoints"] = int((k[:, 2] > 0).sum())
    if is_gt or iou_type == "bbox":
        boxes = _xywh(d["boxes"])
    elif iou_type == "keypoints":  # the keypoints' extent, as COCO.loadRes sets it
        k = d["keypoints"].double().cpu()
        lo, hi = k[..., :2].amin(1), k[..., :2].amax(1)
        boxes = torch.cat([lo, hi - lo], dim=1).tolist()
    else:  # segm detections: set from the masks above
        return anns
    for a, box in zip(anns, boxes):
        a["bbox"] = box
        if "area" not in a:
            a["area"] = box[2] * box[3]
    return anns


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def coco_evaluate(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    *,
    iou_type: str = "bbox",
    oks_sigmas: Sequence[float] | None = None,
) -> dict[str, float]:
    """COCO AP/AR of per-image predictions against per-image targets (keys in the module doc).

    Args:
        predictions, targets: one dict per image, same length and order.
        iou_type: ``"bbox"``, ``"segm"`` or ``"keypoints"``.
        oks_sigmas: per-keypoint OKS sigmas (length K); defaults to the COCO person sigmas,
            which only fit K = 17 (e.g. pass ``trp.data.KEYPOINT_OKS_SIGMAS`` for shapes).

    Raises:
        ValueError: no images, length mismatch, bad shapes, or missing/mismatched sigmas.
        KeyError: a dict lacks a key that ``iou_type`` needs.
    """
    from pycocotools.cocoeval import COCOeval

    _check_iou_type(iou_type)
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("coco_evaluate needs at least one image")
    for i, (p, t) in enumerate(zip(predictions, targets)):
        _check_image(p, t, iou_type, i)
    images, gt_anns, dt_anns, labels = [], [], [], set()
    for image_id, (p, t) in enumerate(zip(predictions, targets), start=1):
        info: dict[str, Any] = {"id": image_id}
        if iou_type == "segm":
            info["height"], info["width"] = (int(s) for s in t["masks"].shape[1:])
        images.append(info)
        gt_anns += _annotations(t, image_id, iou_type, len(gt_anns) + 1, is_gt=True)
        dt_anns += _annotations(p, image_id, iou_type, len(dt_anns) + 1, is_gt=False)
        labels |= set(t["labels"].long().tolist()) | set(p["labels"].long().tolist())
    categories = [{"id": label + 1, "name": str(label)} for label in sorted(labels)]
    evaluator = COCOeval(_coco(images, categories, gt_anns),
                         _coco(images, categories, dt_anns), iou_type)
    if iou_type == "keypoints":
        k = targets[0]["keypoints"].shape[1]
        sigmas = COCO_PERSON_SIGMAS if oks_sigmas is None else tuple(oks_sigmas)
        if len(sigmas) != k:
            raise ValueError(f"need one OKS sigma per keypoint: K = {k}, got {len(sigmas)} "
                             "sigmas (the COCO default only fits K = 17)")
        evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(metric_names(iou_type), evaluator.stats)}


class COCOMetric(Metric):
    """Stateful COCO AP/AR; per-image predictions and targets are kept and evaluated in
    ``compute``.

    States are flat tensors concatenated across processes (``dist_reduce_fx="cat"``) plus a
    per-image instance count, so the per-image structure survives a DDP gather in rank order.
    Masks are stored flattened (uint8), which costs ``H * W`` bytes per instance.

    ``update(preds: list[dict], targets: list[dict])`` with the keys of the module doc;
    ``compute()`` returns ``metric_names(iou_type)`` as float64 scalars, all -1 when no image
    was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, *, iou_type: str = "bbox", oks_sigmas: Sequence[float] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        _check_iou_type(iou_type)
        self.iou_type = iou_type
        self.oks_sigmas = None if oks_sigmas is None else tuple(oks_sigmas)
        for side in ("gt", "dt"):
            for name in ("counts", "boxes", "labels", "values"):
                # values: areas for gt, scores for dt
                self.add_state(f"{side}_{name}", default=[], dist_reduce_fx="cat")
            if iou_type == "segm":
                self.add_state(f"{side}_masks", default=[], dist_reduce_fx="cat")
            if iou_type == "keypoints":
                self.add_state(f"{side}_keypoints", default=[], dist_reduce_fx="cat")
        self.add_state("gt_iscrowd", default=[], dist_reduce_fx="cat")
        if iou_type == "segm":
            self.add_state("sizes", default=[], dist_reduce_fx="cat")

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        for i, (p, t) in enumerate(zip(preds, targets)):
            _check_image(p, t, self.iou_type, i)
        dev = self.device
        for p, t in zip(preds, targets):
            n, m = len(t["labels"]), len(p["labels"])
            self.gt_counts.append(torch.tensor([n], device=dev))
            self.dt_counts.append(torch.tensor([m], device=dev))
            self.gt_boxes.append(t["boxes"].double().to(dev).reshape(n, 4))
            # Only bbox evaluation reads predicted boxes (segm and keypoint detections get
            # theirs from masks / keypoints, as in COCO.loadRes); zeros keep the layout.
            self.dt_boxes.append(p["boxes"].double().to(dev).reshape(m, 4) if "boxes" in p
                                 else torch.zeros((m, 4), dtype=torch.float64, device=dev))
            self.gt_labels.append(t["labels"].long().to(dev))
            self.dt_labels.append(p["labels"].long().to(dev))
            self.gt_values.append(target_areas(t).to(dev))
            self.dt_values.append(p["scores"].double().to(dev))
            crowd = t["iscrowd"] if "iscrowd" in t else torch.zeros(n)
            self.gt_iscrowd.append(torch.as_tensor(crowd).long().to(dev))
            if self.iou_type == "segm":
                self.sizes.append(torch.tensor([t["masks"].shape[1:]], device=dev))
                self.gt_masks.append(t["masks"].bool().to(dev, torch.uint8).flatten())
                self.dt_masks.append(p["masks"].bool().to(dev, torch.uint8).flatten())
            if self.iou_type == "keypoints":
                self.gt_keypoints.append(t["keypoints"].double().to(dev))
                self.dt_keypoints.append(p["keypoints"].double().to(dev))

    def _split(self, name: str, counts: list[int]) -> list[Tensor]:
        return list(torch.split(dim_zero_cat(getattr(self, name)).cpu(), counts))

    def compute(self) -> dict[str, Tensor]:
        names = metric_names(self.iou_type)
        if len(self.gt_counts) == 0:
            return {name: torch.tensor(-1.0, dtype=torch.float64) for name in names}
        gt_n = dim_zero_cat(self.gt_counts).cpu().tolist()
        dt_n = dim_zero_cat(self.dt_counts).cpu().tolist()
        targets = [{"boxes": b, "labels": lab, "areas": a, "iscrowd": c} for b, lab, a, c in zip(
            self._split("gt_boxes", gt_n), self._split("gt_labels", gt_n),
            self._split("gt_values", gt_n), self._split("gt_iscrowd", gt_n))]
        preds = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(
            self._split("dt_boxes", dt_n), self._split("dt_labels", dt_n),
            self._split("dt_values", dt_n))]
        if self.iou_type == "keypoints":
            for d, kps in zip(targets, self._split("gt_keypoints", gt_n)):
                d["keypoints"] = kps
            for d, kps in zip(preds, self._split("dt_keypoints", dt_n)):
                d["keypoints"] = kps
        if self.iou_type == "segm":
            sizes = dim_zero_cat(self.sizes).cpu().tolist()
            for side, dicts, counts in (("gt", targets, gt_n), ("dt", preds, dt_n)):
                pixels = [c * h * w for c, (h, w) in zip(counts, sizes)]
                for d, flat, c, (h, w) in zip(dicts, self._split(f"{side}_masks", pixels),
                                              counts, sizes):
                    d["masks"] = flat.reshape(c, h, w).bool()
        result = coco_evaluate(preds, targets, iou_type=self.iou_type, oks_sigmas=self.oks_sigmas)
        return {name: torch.tensor(result[name], dtype=torch.float64) for name in names}
