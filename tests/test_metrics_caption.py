"""Caption metrics (pycocoevalcap), exact match, and the UnifiedEvaluator's flat metrics dict."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from trp.data import KEYPOINT_OKS_SIGMAS
from trp.metrics import (
    CAPTION_METRIC_NAMES,
    UnifiedEvaluator,
    caption_metrics,
    exact_match,
    normalize_answer,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
REFS = ["a small red circle", "a large blue square, partly hidden", "a medium green star"]


@needs_java
def test_caption_scores_with_ptb_tokenizer_and_meteor() -> None:
    perfect = caption_metrics(REFS, REFS)
    assert set(perfect) == set(CAPTION_METRIC_NAMES)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["METEOR"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)
    worse = caption_metrics(["a small red circle", "a blue square", "a yellow cross"], REFS)
    for name in CAPTION_METRIC_NAMES:
        assert worse[name] < perfect[name], name
    assert 0 < worse["METEOR"] < 1


def test_caption_scores_without_java_tokenisation() -> None:
    scores = ("BLEU-4", "ROUGE-L", "CIDEr")
    same = caption_metrics(
        ["A small red circle.", "a large BLUE square partly hidden", "a medium green star"],
        REFS,
        metrics=scores,
        tokenize=False,
    )
    assert same["ROUGE-L"] == pytest.approx(1.0) and same["BLEU-4"] == pytest.approx(1.0, 1e-6)
    # Several references: the best-matching one counts for ROUGE-L.
    multi = caption_metrics(
        ["a red circle"], [["a blue star", "a red circle"]], metrics=("ROUGE-L",), tokenize=False
    )
    assert multi["ROUGE-L"] == pytest.approx(1.0)
    half = caption_metrics(["a red"], ["a red circle"], metrics=("ROUGE-L",), tokenize=False)
    assert 0.5 < half["ROUGE-L"] < 1.0
    with pytest.raises(ValueError, match="subset"):
        caption_metrics(REFS, REFS, metrics=("SPICE",))
    with pytest.raises(ValueError, match="3 predictions for 2"):
        caption_metrics(REFS, REFS[:2], tokenize=False)
    with pytest.raises(ValueError, match="at least one"):
        caption_metrics([], [], tokenize=False)
    with pytest.raises(TypeError, match="single str"):
        caption_metrics("a red circle", "a red circle", tokenize=False)  # type: ignore[arg-type]


def test_exact_match_normalises_case_spaces_and_end_punctuation() -> None:
    assert normalize_answer("  A red   Circle. ") == "a red circle"
    assert exact_match(
        ["A red circle.", "a blue star", "Two."], ["a red circle", "a blue square", ["2", "two"]]
    ) == pytest.approx(2 / 3)
    assert normalize_answer("a red circle, partly hidden") == "a red circle, partly hidden"
    with pytest.raises(TypeError):
        exact_match([1], ["a"])  # type: ignore[list-item]


def _square(x0: int, y0: int, size: int = 8, hw: tuple[int, int] = (32, 32)) -> torch.Tensor:
    m = torch.zeros(hw, dtype=torch.bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def _evaluator() -> UnifiedEvaluator:
    return UnifiedEvaluator(
        oks_sigmas=KEYPOINT_OKS_SIGMAS, caption_tokenize=False, caption_scores=("BLEU-4", "CIDEr")
    )


def test_unified_evaluator_one_flat_dict_with_every_family() -> None:
    ev = _evaluator()
    box_a, box_b = torch.tensor([0.0, 0, 10, 10]), torch.tensor([20.0, 20, 30, 30])
    ev.update("rec", {"box": box_a}, {"box": box_a})
    ev.update("rec", {"box": box_b}, {"box": box_a})  # wrong object
    m1, m2 = _square(0, 0), _square(16, 16)
    ev.update("res", {"mask": m1}, {"mask": m1})
    ev.update("res", {"mask": m1}, {"mask": m1 | m2})  # half the union
    det_t = {"boxes": torch.stack([box_a, box_b]), "labels": torch.tensor([0, 0])}
    det_p = {**det_t, "scores": torch.tensor([0.9, 0.8])}
    ev.update("det", det_p, det_t)
    empty_p = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    neg_t = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "negative": True,
    }
    ev.update("det", empty_p, neg_t)  # a negative answered with nothing: right
    ev.update("det", det_p, neg_t)  # a negative answered with boxes: wrong (and 2 FPs)
    seg_t = {
        "masks": torch.stack([m1, m2]),
        "boxes": torch.stack([box_a, box_b]),
        "labels": torch.tensor([1, 1]),
    }
    ev.update(
        "seg", {"masks": seg_t["masks"], "scores": torch.ones(2), "labels": seg_t["labels"]}, seg_t
    )
    kp = torch.tensor([[[2.0, 2, 2], [8, 8, 2], [5, 5, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    kp_t = {
        "keypoints": kp,
        "boxes": box_a[None],
        "labels": torch.tensor([2]),
        "areas": torch.tensor([64.0]),
    }
    ev.update(
        "keypoints", {"keypoints": kp, "scores": torch.ones(1), "labels": kp_t["labels"]}, kp_t
    )
    depth = torch.full((4, 4), 5.0)
    ev.update("depth", {"depth": depth * 2}, {"depth": depth})
    ev.update("depth", None, {"depth": depth})
    ev.update("region_caption", {"text": "a small red circle."}, {"text": "a small red circle"})
    ev.update("region_caption", {"text": "a blue star"}, {"text": "a large blue square"})
    ev.update(
        "grounded_caption",
        {"text": "There is a red circle.", **det_p},
        {"text": "There is a red circle.", **det_t},
    )
    ev.update("text", {"text": "Two."}, {"text": "Three."})
    ev.update("text", None, {"text": "One."})
    out = ev.compute()
    assert out["rec/ACC@0.5"] == 0.5 and out["rec/IoU"] == 0.5
    assert out["res/gIoU"] == pytest.approx(0.75) and out["res/cIoU"] == pytest.approx(128 / 192)
    assert out["det/AP50"] < 1.0 and out["det/AP50"] > 0.5  # the negative image's two FPs
    assert out["det/mask_AP"] == pytest.approx(1.0)
    assert out["kpt/AP"] == pytest.approx(1.0)
    assert out["depth/AbsRel"] == pytest.approx(1.0) and out["depth/delta1"] == 0.0
    assert out["depth/RMSE"] == pytest.approx(5.0) and out["depth/missing"] == 1.0
    assert out["caption/exact_match"] == 0.5 and 0 < out["caption/BLEU-4"] < 1
    assert out["gcap/exact_match"] == 1.0 and out["gcap/AP50"] == pytest.approx(1.0)
    assert out["text/exact_match"] == 0.0
    assert out["noobj/accuracy"] == 0.5 and out["noobj/count"] == 2
    assert out["det/count"] == 3 and out["text/count"] == 2
    assert all(isinstance(v, float) for v in out.values())


def test_unified_evaluator_perfect_detection_and_missing_tasks() -> None:
    ev = _evaluator()
    box = torch.tensor([[1.0, 1, 9, 9], [12, 12, 20, 24]])
    t = {"boxes": box, "labels": torch.tensor([0, 3])}
    ev.update("det", {**t, "scores": torch.tensor([0.5, 0.7])}, t)
    ev.update("det", None, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "negative": True})
    out = ev.compute()
    assert out["det/AP"] == pytest.approx(1.0) and out["noobj/accuracy"] == 0.0
    for key in (
        "rec/ACC@0.5",
        "res/gIoU",
        "kpt/AP",
        "depth/delta1",
        "caption/CIDEr",
        "det/mask_AP",
        "text/exact_match",
    ):
        assert math.isnan(out[key]), key
    ev.reset()
    assert len(ev) == 0 and ev.compute()["det/count"] == 0


def test_unified_evaluator_rejects_bad_samples() -> None:
    ev = _evaluator()
    with pytest.raises(ValueError, match="unknown task"):
        ev.update("pose", {}, {})
    with pytest.raises(ValueError, match=r"\[4\]"):
        ev.update("rec", {"box": torch.zeros(2, 4)}, {"box": torch.zeros(4)})
    with pytest.raises(KeyError, match="scores"):
        ev.update(
            "det",
            {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)},
            {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)},
        )
    with pytest.raises(ValueError, match="rows"):
        ev.update(
            "det",
            {"boxes": torch.zeros(2, 4), "labels": torch.zeros(1), "scores": torch.zeros(1)},
            {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)},
        )
    with pytest.raises(TypeError, match="bool"):
        ev.update("res", {"mask": torch.zeros(4, 4)}, {"mask": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="text"):
        ev.update("text", {"text": "a"}, {"text": 3})
    with pytest.raises(ValueError, match="unknown caption"):
        UnifiedEvaluator(caption_scores=("SPICE",))
    assert len(ev) == 0  # nothing half-added
