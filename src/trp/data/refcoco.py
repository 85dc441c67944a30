"""RefCOCO / RefCOCO+ / RefCOCOg as formatted by lmms-eval (parquet files, read locally).

Expected files under ``root``: ``<split>-*.parquet``, ``data/<split>-*.parquet`` or
``<split>/*.parquet``. Columns: ``question_id``, ``image`` (Hugging Face image struct
``{"bytes": PNG/JPEG bytes, "path": str}``), ``question``, ``answer`` (list of referring
expressions; a plain string is accepted), ``segmentation`` (flat polygon ``[x1, y1, x2, y2,
...]`` or a list of such polygons), ``bbox`` (``[x, y, w, h]`` pixels), ``iscrowd``,
``file_name``.

Only the small columns are read at construction; images are decoded per sample from the
parquet row group that holds them (one row group cached per dataset object, so sequential
access decodes each group once).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

REFCOCO_SPLITS: tuple[str, ...] = ("val", "test", "testA", "testB")
REFCOCO_COLUMNS: tuple[str, ...] = (
    "question_id", "image", "question", "answer", "segmentation", "bbox", "iscrowd", "file_name"
)


def find_refcoco_files(root: str | Path, split: str) -> list[Path]:
    """The parquet files of ``split`` under ``root``, sorted.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no file of ``split``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"RefCOCO directory not found: {root}")
    files = sorted({*root.glob(f"{split}-*.parquet"), *root.glob(f"data/{split}-*.parquet"),
                    *root.glob(f"{split}/*.parquet")})
    if not files:
        flat = [*root.glob("*.parquet"), *root.glob("data/*.parquet")]
        nested = [p for p in root.glob("*/*.parquet") if p.parent.name != "data"]
        present = sorted({p.name.split("-")[0] for p in flat} | {p.parent.name for p in nested})
        raise FileNotFoundError(
            f"no parquet files for split {split!r} under {root} (looked for {split}-*.parquet, "
            f"data/{split}-*.parquet, {split}/*.parquet); splits present: {present or 'none'}"
        )
    return files


def polygon_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO polygon (flat ``[x1, y1, ...]`` or a list of them) to bool ``[H, W]``.

    An empty segmentation gives an all-false mask.
    """
    from pycocotools import mask as mask_utils  # heavy import, only needed here

    polygons = [list(map(float, p)) for p in _as_polygons(segmentation)]
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    for p in polygons:
        if len(p) < 6 or len(p) % 2:
            raise ValueError(f"a polygon needs an even number (>= 6) of coordinates, got {len(p)}")
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _as_polygons(segmentation: Any) -> list[Any]:
    seg = segmentation.tolist() if isinstance(segmentation, np.ndarray) else segmentation
    if seg is None or len(seg) == 0:
        return []
    first = seg[0]
    nested = isinstance(first, list | tuple | np.ndarray)
    return [list(p) for p in seg] if nested else [list(seg)]


class RefCOCODataset(Dataset):
    """Referring samples from lmms-eval RefCOCO-family parquet files.

    Args:
        root: directory holding the parquet files (see the module doc for the layout).
        split: ``"val"``, ``"test"``, ``"testA"`` or ``"testB"`` (RefCOCOg has val/test).
        image_size: ``None`` keeps the original resolution; an ``int`` or ``(h, w)`` resizes
            image (bilinear), mask (nearest) and box to that size (aspect ratio not kept).

    Each sample: ``image`` (float32 ``[3, H, W]`` in [0, 1]), ``expression`` (str, the first
    answer), ``expressions`` (list[str]), ``question`` (str), ``box`` (float32 ``[4]`` xyxy
    pixels), ``mask`` (bool ``[H, W]``), ``question_id``, ``file_name`` (str), ``iscrowd``
    (int), ``orig_size`` (int64 ``[2]``: original height, width).

    Raises:
        FileNotFoundError: missing directory or split.
        ValueError: unknown split or missing columns.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        import pyarrow.parquet as pq  # keeps `import trp.data` free of pyarrow

        if split not in REFCOCO_SPLITS:
            raise ValueError(f"unknown RefCOCO split {split!r}; expected one of {REFCOCO_SPLITS}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be positive (int or (h, w)), got {image_size}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.files = find_refcoco_files(root, split)
        small = [c for c in REFCOCO_COLUMNS if c != "image"]
        self._rows: list[dict[str, Any]] = []
        self._where: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for f, path in enumerate(self.files):
            parquet = pq.ParquetFile(path)
            missing = [c for c in REFCOCO_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"{path} lacks columns {missing}; expected {REFCOCO_COLUMNS}")
            self._rows.extend(parquet.read(columns=small).to_pylist())
            for g in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                self._where.extend((f, g, r) for r in range(n))
        self._cache: tuple[tuple[int, int], list[Any]] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive a pickled copy: leave the decoded row group behind.
        return {**self.__dict__, "_cache": None}

    def _image_cell(self, index: int) -> Any:
        import pyarrow.parquet as pq

        f, g, r = self._where[index]
        if self._cache is None or self._cache[0] != (f, g):
            table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["image"])
            self._cache = ((f, g), table.column("image").to_pylist())
        return self._cache[1][r]

    def _load_image(self, cell: Any) -> Image.Image:
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        else:
            data, path = cell, None
        if data:
            return Image.open(io.BytesIO(data)).convert("RGB")
        if path:
            full = Path(path) if Path(path).is_absolute() else self.root / path
            if not full.is_file():
                raise FileNotFoundError(f"image has no bytes and its path does not exist: {full}")
            return Image.open(full).convert("RGB")
        raise ValueError("image cell has neither bytes nor path")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = self._rows[index]
        pil = self._load_image(self._image_cell(index))
        width, height = pil.size
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(polygon_to_mask(row["segmentation"], height, width))
        x, y, w, h = (float(v) for v in row["bbox"])
        box = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
        if self.image_size is not None and self.image_size != (height, width):
            new_h, new_w = self.image_size
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=True)[0].clamp_(0, 1)
            mask = F.interpolate(mask[None, None].float(), size=(new_h, new_w),
                                 mode="nearest")[0, 0].bool()
            box = box * torch.tensor([new_w / width, new_h / height] * 2)
        answers = row["answer"]
        expressions = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        if not expressions:
            raise ValueError(f"row {index} (question_id {row['question_id']}) has no answer")
        return {
            "image": image,
            "expression": expressions[0],
            "expressions": expressions,
            "question": row["question"],
            "box": box,
            "mask": mask,
            "question_id": row["question_id"],
            "file_name": row["file_name"],
            "iscrowd": int(row["iscrowd"]),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
