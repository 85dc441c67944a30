"""trp.models.predict and examples/predict.py: one image + one prompt -> JSON triplets with
boxes in pixels of the original image and masks as COCO RLE at the original size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.test_models_hf import HEADS
from tests.test_models_trp import _model
from trp.models import load_image, predict, save_overlay
from trp.models.build import build_hf_model
from trp.models.tiny_hf import save_tiny_vlm
from trp.recipes import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "<Phrase>the red circle</Phrase>(<Unit>box</Unit>"


def _check(result: dict, height: int, width: int) -> None:
    assert result["parsed"] and result["triplets"], result
    triplet = result["triplets"][0]
    assert triplet["phrase"] == "the red circle" and triplet["unit"] == "box"
    target = triplet["targets"][0]
    x0, y0, x1, y1 = target["box"]
    assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert target["mask"]["size"] == [height, width]
    assert 0.0 <= target["score"] <= 1.0


def test_predict_reference_model_in_original_pixels(tmp_path) -> None:
    model = _model()
    image = torch.rand(3, 90, 120)
    result = predict(model, image, "Locate the red circle.", answer_prefix=PREFIX)
    _check(result, 90, 120)
    path = save_overlay(image, result, tmp_path / "o.png")
    assert Image.open(path).size == (120, 90)
    with pytest.raises(ValueError, match="Tensor"):
        predict(model, torch.rand(90, 120), "x")
    with pytest.raises(ValueError, match="prompt"):
        predict(model, image, " ")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava"])
def test_predict_script_on_a_saved_hf_checkpoint(tmp_path, family: str) -> None:
    directory = save_tiny_vlm(family, tmp_path / family)
    torch.manual_seed(0)
    model = build_hf_model({"pretrained_dir": str(directory), "heads": HEADS, "prototype_rank": 8})
    cfg = OmegaConf.create({"model": {"pretrained_dir": str(directory)}, "recipe": {"name": "t"}})
    save_checkpoint(model, cfg, tmp_path / "ck")
    pixels = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "i.png")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/predict.py"),
            f"checkpoint={tmp_path / 'ck'}",
            f"image={tmp_path / 'i.png'}",
            "prompt=Locate the red circle.",
            f"overlay={tmp_path / 'o.png'}",
            "max_new_tokens=8",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) >= {"answer", "parsed", "triplets", "overlay"}
    assert Path(result["overlay"]).is_file()
    bad = subprocess.run(
        [sys.executable, str(ROOT / "examples/predict.py"), "image=x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "missing" in bad.stderr
