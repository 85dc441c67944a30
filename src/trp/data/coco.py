"""COCO-format instance / keypoint annotations (json) with images from a local directory."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class CocoDataset(Dataset):
    """Images with all their instances, read through ``pycocotools.coco.COCO``.

    Args:
        annotation_file: COCO json (``instances_*.json`` or ``person_keypoints_*.json``).
        image_dir: directory holding the images named by ``file_name``.
        include_crowd: keep ``iscrowd=1`` annotations (flagged in ``iscrowd``); by default
            they are dropped, as detection training usually does.
        image_ids: restrict to these image ids (default: all images, sorted by id).

    Each sample: ``image`` (float32 ``[3, H, W]`` in [0, 1]), ``image_id`` (int), ``boxes``
    (float32 ``[N, 4]`` xyxy pixels), ``masks`` (bool ``[N, H, W]``; an annotation without
    segmentation gets its filled box), ``labels`` (int64 ``[N]``, contiguous ``0..C-1`` in
    category-id order, names in ``category_names``), ``category_ids`` (int64 ``[N]``, the
    json ids), ``keypoints`` (float32 ``[N, K, 3]`` ``(x, y, v)``; ``K`` is the longest
    ``keypoints`` list among the categories, 0 for a pure instance file), ``areas`` (float32
    ``[N]``), ``iscrowd`` (bool ``[N]``).

    Raises:
        FileNotFoundError: missing annotation file, image directory or image.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        *,
        include_crowd: bool = False,
        image_ids: Sequence[int] | None = None,
    ) -> None:
        from pycocotools.coco import COCO  # heavy import, kept out of `import trp.data`

        annotation_file, image_dir = Path(annotation_file), Path(image_dir)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {image_dir}")
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            self.coco = COCO(str(annotation_file))
        self.image_dir = image_dir
        self.include_crowd = include_crowd
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        cats = self.coco.loadCats(self.category_ids)
        self.category_names: list[str] = [c["name"] for c in cats]
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.num_keypoints = max((len(c.get("keypoints", [])) for c in cats), default=0)
        known = set(self.coco.getImgIds())
        if image_ids is None:
            self.image_ids = sorted(known)
        else:
            unknown = [i for i in image_ids if i not in known]
            if unknown:
                raise ValueError(f"image ids not in {annotation_file.name}: {unknown[:10]}")
            self.image_ids = list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id} not found: {path}")
        pil = Image.open(path).convert("RGB")
        width, height = pil.size
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        if not self.include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        n, k = len(anns), self.num_keypoints
        boxes = np.zeros((n, 4), dtype=np.float32)
        masks = np.zeros((n, height, width), dtype=bool)
        keypoints = np.zeros((n, k, 3), dtype=np.float32)
        for i, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[i] = (x, y, x + w, y + h)
            if ann.get("segmentation"):
                masks[i] = self.coco.annToMask(ann).astype(bool)
            else:
                masks[i, int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
            if k and ann.get("keypoints"):
                kps = np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
                keypoints[i, : len(kps)] = kps
        category_ids = [a["category_id"] for a in anns]
        return {
            "image": torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255),
            "image_id": int(image_id),
            "boxes": torch.from_numpy(boxes),
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor([self._label[c] for c in category_ids], dtype=torch.int64),
            "category_ids": torch.tensor(category_ids, dtype=torch.int64),
            "keypoints": torch.from_numpy(keypoints),
            "areas": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        }
