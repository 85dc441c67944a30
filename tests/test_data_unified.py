"""UnifiedShapesDataset: task mixture, answers in TRP, targets in the heads' formats."""

from __future__ import annotations

import pytest
import torch

from trp.data import (
    MAX_KEYPOINTS,
    SHAPE_CLASSES,
    TASK_UNITS,
    UNIFIED_TASKS,
    UnifiedShapesDataset,
    collate_unified,
)
from trp.grammar import VPT, parse
from trp.vrt import mask_coverage, target_patches


def _by_task(ds: UnifiedShapesDataset, n: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for i in range(n):
        s = ds[i]
        out.setdefault(s["task"], []).append(s)
    return out


@pytest.fixture(scope="module")
def ref_samples() -> dict[str, list[dict]]:
    mixture = dict.fromkeys(UNIFIED_TASKS, 1.0)
    return _by_task(UnifiedShapesDataset(num_samples=160, seed=3, mixture=mixture), 160)


def test_every_task_appears_and_answers_parse_to_its_unit(ref_samples) -> None:
    assert set(ref_samples) == set(UNIFIED_TASKS)
    for task, samples in ref_samples.items():
        for s in samples:
            r = parse(s["answer"])
            n = s["boxes"].shape[0]
            units = {t.unit for t in r.triplets}
            if TASK_UNITS[task] is None or (task != "depth" and n == 0):
                assert r.triplets == (), (task, s["answer"])
                assert s["targets"] == {}
            else:
                assert units == {TASK_UNITS[task]}, (task, s["answer"])
                assert set(s["targets"]) == units
            if task != "depth":
                assert sum(len(t.targets) for t in r.triplets) == n
                assert s["triplet"].tolist() == [
                    j for j, t in enumerate(r.triplets) for _ in t.targets
                ]
            assert s["masks"].shape == (n, 128, 128) and s["keypoints"].shape == (
                n,
                MAX_KEYPOINTS,
                3,
            )


def test_targets_are_in_the_heads_formats(ref_samples) -> None:
    for s in ref_samples["det"] + ref_samples["rec"]:
        if not s["targets"]:
            continue
        box = s["targets"]["box"]["boxes"]
        xyxy = s["boxes"] / 128
        assert torch.allclose(box[:, :2], (xyxy[:, :2] + xyxy[:, 2:]) / 2)
        assert torch.allclose(box[:, 2:], xyxy[:, 2:] - xyxy[:, :2])
        # The box is the visible mask's tight box.
        for b, m in zip(s["boxes"], s["masks"]):
            rows, cols = m.nonzero(as_tuple=True)
            assert b.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    kp = [s for s in ref_samples["keypoints"] if s["targets"]]
    assert kp
    for s in kp:
        t = s["targets"]["keypoint"]
        assert torch.allclose(t["keypoints"][..., :2] * 128, s["keypoints"][..., :2])
        assert torch.equal(t["keypoints"][..., 2], s["keypoints"][..., 2])
        assert torch.allclose(t["areas"], s["masks"].flatten(1).sum(1).float() / 128**2)
    for s in ref_samples["depth"]:
        d = s["targets"]["depth"]["depth"]
        assert d.shape == (1, 128, 128) and torch.equal(d[0], s["depth"])
        assert float(d.max()) == 10.0  # the background is farthest


def test_negatives_and_empty_images() -> None:
    ds = UnifiedShapesDataset(
        num_samples=60,
        seed=1,
        mixture={"det": 1, "keypoints": 1, "text": 1},
        negative_prob=1.0,
        empty_image_prob=0.5,
    )
    empties = 0
    for i in range(60):
        s = ds[i]
        img = s["image"]
        empty = bool((img == img[:, :1, :1]).all())
        empties += empty
        if s["task"] in ("det", "keypoints"):
            assert s["negative"] and s["answer"] == "None." and s["targets"] == {}
            assert s["boxes"].shape == (0, 4) and s["labels"].numel() == 0
            assert all(c in SHAPE_CLASSES for c in s["categories"]) and s["categories"]
        else:
            assert not s["negative"]
            if empty:
                assert s["answer"] == "Zero."
    assert 10 <= empties <= 50


def test_vrt_runs_name_patches_of_their_object() -> None:
    ds = UnifiedShapesDataset(
        num_samples=40,
        seed=2,
        targets={"rec": "vrt", "det": "vrt", "grounded_caption": "vrt", "seg": "ref"},
        mixture={"rec": 1, "det": 1, "seg": 1, "grounded_caption": 1},
        num_vrt=3,
    )
    seen = set()
    for i in range(40):
        s = ds[i]
        seen.add(s["task"])
        r = parse(s["answer"])
        kinds = {t.kind for tr in r.triplets for t in tr.targets}
        if s["task"] == "seg":
            assert kinds <= {"ref"} and s["vrt_runs"] == [] and s["target_kind"] == "ref"
            continue
        assert kinds <= {"vrt"} and len(s["vrt_runs"]) == s["boxes"].shape[0]
        for run, mask in zip(s["vrt_runs"], s["masks"]):
            allowed = set(target_patches(mask_coverage(mask, (8, 8))).tolist())
            assert 1 <= len(run) <= 3 and set(run) <= allowed
    assert seen == {"rec", "det", "seg", "grounded_caption"}


def test_region_captions_and_grounded_captions(ref_samples) -> None:
    kinds = set()
    for s in ref_samples["region_caption"]:
        assert s["prompt"].count(VPT) == 1 and s["answer"] == s["reference"]
        assert s["reference"].split(",")[0].split()[-1] in SHAPE_CLASSES
        kinds.add(s["prompt_type"])
        assert s["prompt_mask"].any()
    assert len(kinds) >= 2
    for s in ref_samples["grounded_caption"]:
        r = parse(s["answer"])
        rebuilt = r.texts[0] + "".join(t.concept + x for t, x in zip(r.triplets, r.texts[1:]))
        assert rebuilt == s["reference"]
        # Left to right, one object per phrase.
        assert s["boxes"][:, 0].tolist() == sorted(s["boxes"][:, 0].tolist())
    for s in ref_samples["rec"] + ref_samples["det"]:
        assert not s["prompt_mask"].any() and s["prompt_type"] == ""


def test_mixture_weights_and_determinism() -> None:
    ds = UnifiedShapesDataset(num_samples=300, seed=0, mixture={"rec": 1.0, "det": 3.0})
    tasks = [ds.task_of(i) for i in range(300)]
    assert set(tasks) == {"rec", "det"}
    assert 0.65 <= tasks.count("det") / 300 <= 0.85
    again = UnifiedShapesDataset(num_samples=300, seed=0, mixture={"rec": 1.0, "det": 3.0})
    for i in (0, 17, 299):
        a, b = ds[i], again[i]
        assert a["task"] == tasks[i] and a["answer"] == b["answer"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    other = UnifiedShapesDataset(num_samples=300, seed=1, mixture={"rec": 1.0, "det": 3.0})
    assert not torch.equal(other[0]["image"], ds[0]["image"])



def test_balanced_held_out_serves_every_task_in_turn() -> None:
    mixture = {"rec": 1.0, "det": 3.0, "depth": 0.5, "text": 0.0}
    ds = UnifiedShapesDataset(num_samples=30, seed=2, mixture=mixture, balanced=True)
    tasks = [ds.task_of(i) for i in range(30)]
    assert tasks == ["rec", "det", "depth"] * 10  # UNIFIED_TASKS order; weight 0 left out
    assert [ds[i]["task"] for i in (0, 4, 29)] == ["rec", "det", "depth"]

def test_non_square_images_and_collation() -> None:
    ds = UnifiedShapesDataset(num_samples=24, seed=4, image_size=(64, 96), targets="vrt")
    samples = [ds[i] for i in range(24)]
    assert {s["image"].shape for s in samples} == {(3, 64, 96)}
    batch = collate_unified(samples)
    assert batch["image"].shape == (24, 3, 64, 96)
    assert batch["prompt_mask"].shape == (24, 64, 96) and batch["depth"].shape == (24, 64, 96)
    assert isinstance(batch["boxes"], list) and isinstance(batch["triplet"], list)
    assert batch["negative"].dtype == torch.bool and len(batch["targets"]) == 24
    assert len(set(batch["task"])) > 2
    for s in samples:
        for run in s["vrt_runs"]:
            assert max(run) < 4 * 6
    with pytest.raises(ValueError, match="empty"):
        collate_unified([])
    with pytest.raises(ValueError, match="unified"):
        collate_unified([{"image": torch.zeros(3, 4, 4)}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"image_size": 100}, "patch_size"),
        ({"image_size": 8, "patch_size": 4}, ">= 16"),
        ({"mixture": {"rec": 1, "pose": 1}}, "unknown tasks"),
        ({"mixture": {"rec": 0}}, "positive sum"),
        ({"mixture": {"rec": -1, "det": 2}}, ">= 0"),
        ({"targets": "slots"}, "target kinds"),
        ({"targets": {"depth": "vrt"}}, "depth"),
        ({"negative_prob": 1.5}, "negative_prob"),
        ({"max_query_classes": 0}, "max_query_classes"),
        ({"prompt_types": ("lasso",)}, "prompt_types"),
        ({"min_shapes": 0}, "min_shapes"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"num_samples": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        UnifiedShapesDataset(**args)


def test_bad_index_raises() -> None:
    ds = UnifiedShapesDataset(num_samples=4)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
