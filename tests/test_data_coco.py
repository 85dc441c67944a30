import json

import pytest
import torch
from PIL import Image

from trp.data import CocoDataset


def _write_coco(tmp_path, with_keypoints: bool = True):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (255, 0, 0)).save(images / "a.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(images / "b.png")
    dog = {"id": 18, "name": "dog"}
    person = {"id": 1, "name": "person"}
    if with_keypoints:
        person["keypoints"] = ["nose", "left_eye", "right_eye"]
    anns = [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [2, 3, 10, 5], "area": 50,
         "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [20, 4, 6, 10], "area": 60,
         "iscrowd": 0, "segmentation": [[20, 4, 26, 4, 26, 14, 20, 14]],
         **({"keypoints": [22, 6, 2, 21, 5, 1, 0, 0, 0], "num_keypoints": 2}
            if with_keypoints else {})},
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16,
         "iscrowd": 1, "segmentation": {"size": [24, 32], "counts": [0, 4, 20, 4, 20, 4, 20, 4,
                                                                     692]}},
        {"id": 4, "image_id": 9, "category_id": 18, "bbox": [1, 1, 3, 3], "area": 9,
         "iscrowd": 0},
    ]
    data = {"images": [{"id": 9, "file_name": "b.png", "height": 16, "width": 16},
                       {"id": 7, "file_name": "a.png", "height": 24, "width": 32}],
            "annotations": anns, "categories": [dog, person]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_reads_instances_and_keypoints(tmp_path):
    ann, images = _write_coco(tmp_path)
    ds = CocoDataset(ann, images)
    assert len(ds) == 2
    assert ds.image_ids == [7, 9]
    assert ds.category_names == ["person", "dog"]
    assert ds.num_keypoints == 3
    s = ds[0]
    assert s["image_id"] == 7
    assert s["image"].shape == (3, 24, 32)
    assert s["boxes"].tolist() == [[2, 3, 12, 8], [20, 4, 26, 14]]  # crowd dropped
    assert s["labels"].tolist() == [1, 0]
    assert s["category_ids"].tolist() == [18, 1]
    assert s["masks"].shape == (2, 24, 32)
    assert s["masks"][0].sum().item() == 50
    assert s["keypoints"].shape == (2, 3, 3)
    assert s["keypoints"][1].tolist() == [[22, 6, 2], [21, 5, 1], [0, 0, 0]]
    assert s["keypoints"][0].abs().sum() == 0
    assert s["areas"].tolist() == [50.0, 60.0]
    assert not s["iscrowd"].any()
    # No segmentation: the filled box stands in for the mask.
    assert ds[1]["masks"][0].sum().item() == 9


def test_crowd_kept_on_request_and_no_keypoints(tmp_path):
    ann, images = _write_coco(tmp_path, with_keypoints=False)
    ds = CocoDataset(ann, images, include_crowd=True, image_ids=[7])
    s = ds[0]
    assert len(ds) == 1
    assert s["iscrowd"].tolist() == [False, False, True]
    assert s["masks"][2].sum().item() == 16
    assert s["keypoints"].shape == (3, 0, 3)


def test_clear_errors(tmp_path):
    ann, images = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDataset(tmp_path / "missing.json", images)
    with pytest.raises(FileNotFoundError, match="image directory"):
        CocoDataset(ann, tmp_path / "nope")
    with pytest.raises(ValueError, match="image ids"):
        CocoDataset(ann, images, image_ids=[123])
    (images / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="image 9 not found"):
        CocoDataset(ann, images)[1]
    assert isinstance(CocoDataset(ann, images)[0]["boxes"], torch.Tensor)
