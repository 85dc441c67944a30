import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trp.data import KEYPOINT_OKS_SIGMAS, ShapesDataset
from trp.metrics import BBOX_NAMES, KEYPOINT_NAMES, COCOMetric, coco_evaluate


@pytest.fixture(scope="module")
def scenes():
    """Ground truth of 6 synthetic keypoint scenes (boxes, masks, labels, keypoints)."""
    ds = ShapesDataset(num_samples=6, seed=3, image_size=64, task="keypoints")
    out = []
    for i in range(len(ds)):
        s = ds[i]
        out.append({k: s[k] for k in ("boxes", "masks", "labels", "keypoints")})
    return out


def _perfect(targets):
    return [{**t, "scores": torch.linspace(0.9, 0.5, len(t["labels"]))} for t in targets]


def _shifted(targets, dx=1.0):
    preds = []
    for j, t in enumerate(targets):
        shift = dx * (1 + j % 3)  # different shifts per image
        kps = t["keypoints"].clone()
        kps[..., 0] += shift
        preds.append({
            "boxes": t["boxes"] + torch.tensor([shift, 0.0, shift, 0.0]),
            "masks": torch.roll(t["masks"], shifts=int(shift), dims=2),
            "keypoints": kps,
            "labels": t["labels"],
            "scores": torch.linspace(0.9, 0.3, len(t["labels"])),
        })
    return preds


def _direct(preds, targets, iou_type):
    """An independent pycocotools run: json-style GT dict and loadRes on result lists."""
    images, anns, results = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets), start=1):
        h, w = t["masks"].shape[1:]
        images.append({"id": i, "height": h, "width": w})
        for b, m, lab, k in zip(t["boxes"].tolist(), t["masks"], t["labels"].tolist(),
                                t["keypoints"]):
            rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": lab + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                         "area": float(m.sum()), "segmentation": rle,
                         "keypoints": k.flatten().tolist(),
                         "num_keypoints": int((k[:, 2] > 0).sum())})
        for b, m, lab, s, k in zip(p["boxes"].tolist(), p["masks"], p["labels"].tolist(),
                                   p["scores"].tolist(), p["keypoints"]):
            r = {"image_id": i, "category_id": lab + 1, "score": s}
            if iou_type == "bbox":
                r["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            elif iou_type == "segm":
                r["segmentation"] = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            else:
                r["keypoints"] = k.flatten().tolist()
            results.append(r)
    cats = sorted({a["category_id"] for a in anns})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c} for c in cats]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = np.array(KEYPOINT_OKS_SIGMAS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_predictions_score_one(scenes, iou_type):
    out = coco_evaluate(_perfect(scenes), scenes, iou_type=iou_type,
                        oks_sigmas=KEYPOINT_OKS_SIGMAS)
    names = KEYPOINT_NAMES if iou_type == "keypoints" else BBOX_NAMES
    assert list(out) == list(names)
    assert out["AP"] == pytest.approx(1.0)
    assert out["AP50"] == pytest.approx(1.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_shifted_predictions_match_a_direct_pycocotools_run(scenes, iou_type):
    preds = _shifted(scenes)
    out = coco_evaluate(preds, scenes, iou_type=iou_type, oks_sigmas=KEYPOINT_OKS_SIGMAS)
    expected = _direct(preds, scenes, iou_type)
    assert list(out.values()) == pytest.approx(list(expected), abs=1e-12)
    assert 0.0 < out["AP"] < 1.0  # the shift matters, so the comparison is not trivial


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_stateful_metric_matches_the_function(scenes, iou_type):
    preds = _shifted(scenes)
    if iou_type != "bbox":  # segm / keypoint detections need no boxes
        preds = [{k: v for k, v in p.items() if k != "boxes"} for p in preds]
    metric = COCOMetric(iou_type=iou_type, oks_sigmas=KEYPOINT_OKS_SIGMAS)
    metric.update(preds[:4], scenes[:4])
    metric.update(preds[4:], scenes[4:])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx(coco_evaluate(preds, scenes, iou_type=iou_type,
                                              oks_sigmas=KEYPOINT_OKS_SIGMAS))


def test_hand_made_boxes():
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}
    # IoU 81/100 with the GT plus a lower-scored false positive of the same class.
    pred = {"boxes": torch.tensor([[1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]),
            "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([0, 0])}
    out = coco_evaluate([pred], [target])
    assert out["AP50"] == pytest.approx(1.0)
    assert out["AP75"] == pytest.approx(1.0)
    # Matched at IoU thresholds 0.50..0.80 (7 of 10): AP = 0.7.
    assert out["AP"] == pytest.approx(0.7)
    assert out["APl"] == -1.0  # no large ground truth: undefined, as in pycocotools


def test_no_detections_and_empty_metric():
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2])}
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long)}
    assert coco_evaluate([none], [target])["AP"] == 0.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(COCOMetric().compute()["AP"]) == -1.0


def test_bad_inputs_raise(scenes):
    with pytest.raises(ValueError, match="at least one image"):
        coco_evaluate([], [])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        coco_evaluate(_perfect(scenes[:2]), scenes[:1])
    with pytest.raises(KeyError, match="scores"):
        coco_evaluate([{"boxes": scenes[0]["boxes"], "labels": scenes[0]["labels"]}],
                      scenes[:1])
    with pytest.raises(ValueError, match="one OKS sigma per keypoint"):
        coco_evaluate(_perfect(scenes), scenes, iou_type="keypoints")
    bad = _perfect(scenes[:1])
    bad[0]["scores"] = bad[0]["scores"][:0]
    with pytest.raises(ValueError, match="'scores' has"):
        coco_evaluate(bad, scenes[:1])
    with pytest.raises(TypeError, match="'labels' must be a Tensor"):
        coco_evaluate([{**_perfect(scenes[:1])[0], "labels": [0]}], scenes[:1])
    with pytest.raises(ValueError, match="unknown iou_type"):
        COCOMetric(iou_type="mask")
