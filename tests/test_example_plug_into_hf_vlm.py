"""The HF-VLM example runs end to end (training step with every head's losses, generation,
parsing, decoding) on CPU within its time budget."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plug_into_hf_vlm.py"


def _load():
    spec = importlib.util.spec_from_file_location("plug_into_hf_vlm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_generates_and_decodes():
    start = time.perf_counter()
    out = _load().run(image_size=112, seed=0, max_new_tokens=24)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"example took {elapsed:.1f} s"
    losses = out["losses"]
    for key in (
        "loss_lm",
        "box/loss_bbox",
        "box/loss_giou",
        "box/loss_score",
        "mask/loss_mask",
        "mask/loss_dice",
        "keypoint/loss_kpt_l1",
        "keypoint/loss_oks",
        "depth/loss_silog",
        "depth/loss_grad",
    ):
        assert key in losses
        assert math.isfinite(losses[key])
        assert losses[key] > 0
    d = out["decoded"]
    assert len(d["text"]) == 2
    # The forced prefixes make row 0 a box triplet and row 1 a mask triplet; the grammar
    # processor guarantees both parse, so each head decodes at least one object of its row.
    assert d["boxes"].shape[0] >= 1
    assert d["boxes"].shape[1] == 4
    assert {s for s, _ in d["box_owner"]} == {0}
    assert d["masks"]["masks"].shape[1:] == (112, 112)
    assert d["masks"]["masks"].dtype == torch.bool
    assert {s for s, _ in d["mask_owner"]} == {1}
