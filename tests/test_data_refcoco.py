import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trp.data import RefCOCODataset, collate, find_refcoco_files, polygon_to_mask


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        x, y = 4 + i, 6
        rows.append({
            "question_id": str(offset + i),
            "image": {"bytes": _png(40, 30, (10 * i, 0, 0)), "path": f"img{i}.png"},
            "question": "Please carefully observe the area circled in the image.",
            "answer": [f"thing {offset + i}", "another phrase"],
            # A 10 x 8 axis-aligned rectangle as a flat polygon.
            "segmentation": [x, y, x + 10, y, x + 10, y + 8, x, y + 8],
            "bbox": [x, y, 10, 8],
            "iscrowd": 0,
            "file_name": f"COCO_train2014_{offset + i:012d}.jpg",
        })
    return rows


def _write(path, rows, row_group_size=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def test_reads_samples_across_files_and_row_groups(tmp_path):
    _write(tmp_path / "val-00000-of-00002.parquet", _rows(3))
    _write(tmp_path / "val-00001-of-00002.parquet", _rows(2, offset=3))
    _write(tmp_path / "testA-00000-of-00001.parquet", _rows(1, offset=9))
    ds = RefCOCODataset(tmp_path, "val")
    assert len(ds) == 5
    s = ds[4]
    assert s["expression"] == "thing 4"
    assert s["expressions"] == ["thing 4", "another phrase"]
    assert s["question_id"] == "4"
    assert s["file_name"].endswith("000000000004.jpg")
    assert s["image"].shape == (3, 30, 40)
    assert abs(s["image"][0, 0, 0].item() - 10 / 255) < 1e-6  # image of row 1 of file 2
    assert s["box"].tolist() == [5.0, 6.0, 15.0, 14.0]
    assert s["mask"].dtype == torch.bool
    assert s["mask"].sum().item() == 80
    rows, cols = torch.nonzero(s["mask"], as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (
        6, 13, 5, 14)
    assert s["orig_size"].tolist() == [30, 40]
    assert len(RefCOCODataset(tmp_path, "testA")) == 1
    # Workers get the dataset pickled: the cached row group is not shipped, reads still work.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cache is None
    assert torch.equal(clone[4]["image"], s["image"])


def test_split_subdirectory_layout_and_resize(tmp_path):
    _write(tmp_path / "testB" / "part0.parquet", _rows(2))
    ds = RefCOCODataset(tmp_path, "testB", image_size=(60, 20))
    s = ds[0]
    assert s["image"].shape == (3, 60, 20)
    assert s["mask"].shape == (60, 20)
    assert s["box"].tolist() == pytest.approx([2.0, 12.0, 7.0, 28.0])
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 60, 20)
    assert batch["expression"] == ["thing 0", "thing 1"]


def test_string_answer_and_nested_polygons(tmp_path):
    rows = _rows(1)
    rows[0]["answer"] = "a single phrase"
    _write(tmp_path / "test-0.parquet", rows)
    assert RefCOCODataset(tmp_path, "test")[0]["expressions"] == ["a single phrase"]
    two = [[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 12, 10, 12, 12, 10, 12]]
    assert polygon_to_mask(two, 20, 20).sum() == 16 + 4
    assert polygon_to_mask([], 5, 6).shape == (5, 6)
    assert not polygon_to_mask([], 5, 6).any()
    with pytest.raises(ValueError, match="coordinates"):
        polygon_to_mask([1, 2, 3, 4], 5, 5)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        RefCOCODataset(tmp_path / "nope", "val")
    _write(tmp_path / "val-0.parquet", _rows(1))
    with pytest.raises(FileNotFoundError, match=r"splits present: \['val'\]"):
        find_refcoco_files(tmp_path, "testA")
    with pytest.raises(ValueError, match="unknown RefCOCO split"):
        RefCOCODataset(tmp_path, "train2014")
    bad = [{k: v for k, v in r.items() if k != "segmentation"} for r in _rows(1)]
    _write(tmp_path / "bad" / "test-0.parquet", bad)
    with pytest.raises(ValueError, match=r"lacks columns \['segmentation'\]"):
        RefCOCODataset(tmp_path / "bad", "test")
    with pytest.raises(IndexError):
        RefCOCODataset(tmp_path, "val")[1]
    assert np.asarray(RefCOCODataset(tmp_path, "val")[0]["image"]).max() <= 1.0
