"""Datasets of the recipes and the LightningDataModule that batches them.

``data.name``: ``"shapes"`` (synthetic referring scenes, offline), ``"refcoco"`` (an lmms-eval
RefCOCO parquet directory; ``data.root`` is required) or ``"coco"`` (a COCO instances json +
image directory; every instance becomes a referring sample whose expression is its category
name). lmms-eval ships only evaluation splits (val/test/testA/testB), so a RefCOCO recipe
fine-tunes on one split and evaluates on another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from trp.data import REFCOCO_SPLITS, CocoDataset, RefCOCODataset, ShapesDataset
from trp.grammar import format_rec
from trp.recipes.conversation import PROMPTS, clean_expression

__all__ = [
    "DATASETS",
    "CocoInstances",
    "IndexedDataset",
    "ReferringDataModule",
    "build_datasets",
    "corpus",
]

DATASETS: tuple[str, ...] = ("shapes", "refcoco", "coco")


class IndexedDataset(Dataset):
    """Adds ``index`` (the sample's position) to the samples of ``dataset`` when missing."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        sample.setdefault("index", index)
        return sample


def build_datasets(
    cfg: Mapping[str, Any], *, image_size: int, with_train: bool = True
) -> tuple[Dataset | None, Dataset]:
    """``(train, eval)`` datasets of ``cfg`` (the ``data`` config group); ``train`` is None
    without ``with_train`` (evaluation needs only the held-out split).

    Raises:
        ValueError: unknown dataset or bad sizes. FileNotFoundError: a missing RefCOCO root.
    """
    name = cfg["name"]
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "shapes":
        common = {
            "image_size": image_size,
            "task": "rec",
            "min_shapes": int(cfg["min_shapes"]),
            "max_shapes": int(cfg["max_shapes"]),
        }
        if cfg.get("kind_weights") is not None:
            common["kind_weights"] = tuple(float(w) for w in cfg["kind_weights"])
        if int(cfg["seed"]) == int(cfg["eval_seed"]):
            raise ValueError("data.seed and data.eval_seed must differ (held-out scenes)")
        train = ShapesDataset(num_samples=int(cfg["train_size"]), seed=int(cfg["seed"]), **common)
        held_out = ShapesDataset(
            num_samples=int(cfg["eval_size"]), seed=int(cfg["eval_seed"]), **common
        )
        return IndexedDataset(train), IndexedDataset(held_out)
    if name == "coco":
        for key in ("annotation_file", "image_dir"):
            if not cfg.get(key):
                raise ValueError(
                    f"the coco dataset needs data.{key} (a COCO instances json and "
                    "its image directory)"
                )
        coco = CocoInstances(
            CocoDataset(cfg["annotation_file"], cfg["image_dir"]), image_size=image_size
        )
        return IndexedDataset(coco), IndexedDataset(_Subset(coco, cfg.get("eval_size")))
    root = cfg.get("root")
    if not root:
        raise ValueError(
            "the refcoco dataset needs data.root=<directory of lmms-eval RefCOCO "
            "parquet files> (e.g. python examples/train.py recipe=refcoco_vrt "
            "data.root=/data/refcoco)"
        )
    if not Path(root).is_dir():
        raise FileNotFoundError(f"RefCOCO directory not found: {root} (data.root)")
    for key in ("train_split", "eval_split"):
        if cfg[key] not in REFCOCO_SPLITS:
            raise ValueError(f"data.{key}={cfg[key]!r}; expected one of {REFCOCO_SPLITS}")
    held_out = IndexedDataset(
        _Subset(
            RefCOCODataset(root, cfg["eval_split"], image_size=image_size), cfg.get("eval_size")
        )
    )
    if not with_train:
        return None, held_out
    return IndexedDataset(RefCOCODataset(root, cfg["train_split"], image_size=image_size)), held_out


class CocoInstances(Dataset):
    """One referring sample per instance of a :class:`trp.data.CocoDataset`: the expression is
    the category name, image / box / mask are resized to ``image_size`` (square). With several
    instances of a category in an image the expression is ambiguous; REC/RES then measure
    whether the model picked this one."""

    def __init__(self, dataset: CocoDataset, *, image_size: int) -> None:
        self.dataset = dataset
        self.image_size = image_size
        coco = dataset.coco
        self.items: list[tuple[int, int]] = []
        for i, image_id in enumerate(dataset.image_ids):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            kept = [a for a in anns if not a.get("iscrowd", 0)]
            self.items.extend((i, j) for j in range(len(kept)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} instances")
        i, j = self.items[index]
        sample = self.dataset[i]
        _, h, w = sample["image"].shape
        size = (self.image_size, self.image_size)
        image = F.interpolate(
            sample["image"][None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0].clamp_(0, 1)
        mask = F.interpolate(sample["masks"][j][None, None].float(), size=size, mode="nearest")[
            0, 0
        ].bool()
        scale = torch.tensor([size[1] / w, size[0] / h] * 2)
        label = int(sample["labels"][j])
        return {
            "image": image,
            "expression": self.dataset.category_names[label],
            "box": sample["boxes"][j] * scale,
            "mask": mask,
            "image_id": sample["image_id"],
        }


class _Subset(Dataset):
    """The first ``limit`` samples (all when ``limit`` is None)."""

    def __init__(self, dataset: Dataset, limit: int | None) -> None:
        self.dataset = dataset
        n = len(dataset)  # type: ignore[arg-type]
        self.length = n if limit is None else min(int(limit), n)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return self.dataset[index]


def corpus(dataset: Dataset, *, num_samples: int) -> Iterator[str]:
    """Texts to train the tokenizer on: prompts and answers for the first ``num_samples``
    expressions of ``dataset`` (the chat delimiters and TRP tags are added tokens)."""
    n = min(num_samples, len(dataset))  # type: ignore[arg-type]
    for i in range(n):
        sample = dataset[i]
        expr = clean_expression(str(sample["expression"]))
        for unit, prompt in PROMPTS.items():
            yield f"user\n\n{prompt.format(expr)}\nassistant\n"
            yield format_rec(expr, unit=unit).text


class ReferringDataModule(L.LightningDataModule):
    """Train / held-out loaders over referring datasets with the recipe's collate functions.

    Args:
        train, held_out: datasets; train_collate, eval_collate: their collate callables.
        batch_size, eval_batch_size: loader batch sizes; num_workers: loader workers (the
            collate runs in them, tokenisation included).
    """

    def __init__(
        self,
        *,
        train: Dataset,
        held_out: Dataset,
        train_collate: Callable,
        eval_collate: Callable,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_set, self.held_out = train, held_out
        self.train_collate, self.eval_collate = train_collate, eval_collate
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            collate_fn=self.train_collate if train else self.eval_collate,
        )

    def transfer_batch_to_device(
        self, batch: dict, device: torch.device, dataloader_idx: int
    ) -> dict:
        # Only the top-level tensors and the processor's image inputs move: parses are frozen
        # dataclasses Lightning cannot walk, and the robust-loss bookkeeping is consumed on
        # the host.
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "image_inputs" in out:
            out["image_inputs"] = {k: v.to(device) for k, v in out["image_inputs"].items()}
        return out

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.held_out, train=False)
