"""End-to-end recipe runs on tiny configs: train, evaluate, save, reload; DDP; bad configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from trp.recipes import ConfigError, compose, evaluate, train
from trp.recipes.checkpoint import CHECKPOINT_FILES

from .test_data_coco import _write_coco
from .test_data_refcoco import _rows, _write

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a few steps, evaluation and reload take seconds.
TINY = [
    "model.image_size=64",
    "model.prototype_rank=8",
    "model.vision.embed_dim=48",
    "model.vision.depth=1",
    "model.vision.num_heads=2",
    "model.language.hidden_size=48",
    "model.language.intermediate_size=96",
    "model.language.num_layers=1",
    "model.language.num_heads=2",
    "model.language.num_kv_heads=2",
    "model.tokenizer.vocab_size=400",
    "model.tokenizer.corpus_samples=40",
    "model.heads.box.d_model=32",
    "model.heads.box.n_heads=2",
    "model.heads.box.dim_feedforward=64",
    "model.heads.box.num_layers=1",
    "model.heads.mask.d_model=32",
    "model.heads.mask.n_heads=2",
    "model.heads.mask.dim_feedforward=64",
    "model.heads.mask.num_layers=1",
    "model.heads.mask.mask_dim=8",
    "data.batch_size=4",
    "data.eval_size=6",
    "eval.batch_size=3",
    "eval.max_new_tokens=20",
    "eval.num_overlays=2",
    "optim.warmup_steps=1",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def _cfg(tmp_path: Path, *extra: str, config_name: str = "train"):
    cfg = compose([*TINY, f"output_root={tmp_path}", *extra], config_name=config_name)
    return cfg


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", ["shapes_vrt", "shapes_trp"])
def test_recipe_trains_evaluates_and_reloads_identically(tmp_path: Path, recipe: str) -> None:
    # The forced phrase (Kosmos-2's protocol) makes every answer ground a target.
    summary = train(_cfg(tmp_path, f"recipe={recipe}", "run_name=run", "eval.prefill_phrase=true"))
    out = tmp_path / "run"
    assert summary["steps"] == 3
    written = json.loads((out / "metrics.json").read_text())
    assert written["samples"] == 6
    # What ran where: every summary names steps, speed, precision and instruction sets.
    from trp.ops import cpu_capability

    assert written["seconds_per_step"] > 0 and written["precision"] in ("32-true", "bf16-mixed")
    assert written["trp_cpu_capability"] == cpu_capability() and written["cpu_model"]
    assert written["planned_steps"] is None  # 3 steps end before the step budget decides
    metrics = written["metrics"]
    keys = ("rec/ACC@0.5", "rec/IoU", "res/gIoU", "res/cIoU", "answers/parsed")
    for key in (*keys, "rec_from_mask/ACC@0.5", "rec_from_mask/IoU"):
        assert 0.0 <= metrics[key] <= 1.0
    # Grammar-constrained decoding: every answer parses strictly and names its target.
    assert metrics["answers/parsed"] == 1.0
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert list((out / "logs").rglob("metrics.csv"))
    for name in CHECKPOINT_FILES:
        assert (out / "checkpoint" / name).exists()
    first = json.loads((out / "predictions.json").read_text())
    assert len(first) == 6

    # The reloaded checkpoint predicts exactly what the trained model predicted.
    again = evaluate(
        out / "checkpoint",
        _cfg(tmp_path, "run_name=eval", "eval.prefill_phrase=true", config_name="evaluate"),
    )
    second = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert second == first
    assert again["metrics"] == pytest.approx(metrics)
    if recipe != "shapes_vrt":
        return

    # The same checkpoint on a RefCOCO parquet directory and on a COCO json.
    _write(tmp_path / "refcoco" / "testA-0.parquet", _rows(3))
    ref = evaluate(
        out / "checkpoint",
        _cfg(
            tmp_path,
            "run_name=ref",
            "data=refcoco",
            f"data.root={tmp_path / 'refcoco'}",
            config_name="evaluate",
        ),
    )
    assert ref["samples"] == 3
    assert len(json.loads((tmp_path / "ref" / "predictions.json").read_text())) == 3
    ann, images = _write_coco(tmp_path)
    coco = evaluate(
        out / "checkpoint",
        _cfg(
            tmp_path,
            "run_name=coco",
            "data=coco",
            f"data.annotation_file={ann}",
            f"data.image_dir={images}",
            config_name="evaluate",
        ),
    )
    assert coco["samples"] == 3  # the crowd annotation is not a referring sample
    assert 0.0 <= coco["metrics"]["rec/ACC@0.5"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "trainer=ddp_cpu",
        "threads=1",
        *TINY,
        f"output_root={tmp_path}",
        "run_name=ddp",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 3
    # Two processes evaluated their halves; the metric states were reduced over both.
    assert summary["samples"] == 6
    assert "rec/ACC@0.5" in summary["metrics"]
    assert "trained 3 steps" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_refcoco_recipe_trains_on_a_parquet_directory(tmp_path: Path) -> None:
    _write(tmp_path / "refcoco" / "val-0.parquet", _rows(4))
    _write(tmp_path / "refcoco" / "testA-0.parquet", _rows(2, offset=4))
    summary = train(
        _cfg(
            tmp_path,
            "recipe=refcoco_vrt",
            f"data.root={tmp_path / 'refcoco'}",
            "data.batch_size=2",
            "trainer.max_steps=2",
            "run_name=ref",
        )
    )
    assert summary["steps"] == 2
    assert summary["samples"] == 2
    assert (tmp_path / "ref" / "checkpoint" / "heads.safetensors").is_file()


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(MissingConfigException, match="recipe/nope") as err:
        compose(["recipe=nope"])
    assert "shapes_vrt" in str(err.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lr=-0.001", "optim.lr must be a positive number"),
        ("model.image_size=100", "divisible by model.patch_size=16"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
        ("recipe.target=points", "recipe.target must be one of"),
        ("data.batch_size=0", "data.batch_size must be a positive int"),
        ("trainer.max_time=9min", "DD:HH:MM:SS"),
        ("loss.box_giou=-1", "loss.box_giou must be a number >= 0"),
        ("loss.mask_points=0", "loss.mask_points must be a positive int"),
        ("loss.box_region_target=points", "loss.box_region_target must be one of"),
    ],
)
def test_bad_config_values_fail_early(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train(_cfg(tmp_path, override))


def test_refcoco_recipe_needs_its_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.root"):
        train(_cfg(tmp_path, "recipe=refcoco_vrt"))
    with pytest.raises(FileNotFoundError, match="RefCOCO directory not found"):
        train(_cfg(tmp_path, "recipe=refcoco_vrt", f"data.root={tmp_path / 'missing'}"))


def test_coco_data_needs_its_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.annotation_file"):
        train(_cfg(tmp_path, "data=coco"))


def test_evaluate_rejects_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a trp checkpoint"):
        evaluate(tmp_path / "nothing", _cfg(tmp_path, config_name="evaluate"))


def test_model_group_switches_to_the_trp_heads() -> None:
    heads = compose(["model=tiny_vlm_deformable"]).model.heads
    assert heads.box.impl == "deformable"
    assert heads.mask.impl == "two_way"
    assert "dim_feedforward" not in heads.mask


def test_auto_precision_is_bf16_on_gpus_and_where_bf16_is_measured_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trp.recipes import precision

    assert precision.resolve_precision("32-true", "gpu") == "32-true"
    assert precision.resolve_precision("auto", "gpu") == "bf16-mixed"
    for speedup, want in ((2.0, "bf16-mixed"), (1.1, "32-true"), (0.7, "32-true")):
        monkeypatch.delenv(precision.AUTO_PRECISION_ENV, raising=False)
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=speedup: s)
        assert precision.resolve_precision("auto", "cpu") == want
        # Decided once: DDP ranks (child processes) inherit the choice instead of re-timing.
        assert os.environ[precision.AUTO_PRECISION_ENV] == want
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=3.0 - speedup: s)
        assert precision.resolve_precision("auto", "cpu") == want
    monkeypatch.setenv(precision.AUTO_PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="TRP_AUTO_PRECISION must be"):
        precision.resolve_precision("auto", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp8", "cpu")


def test_cpu_bf16_speedup_is_a_positive_ratio() -> None:
    from trp.recipes.precision import cpu_bf16_speedup

    ratio = cpu_bf16_speedup(rows=64, dim=32, hidden=64, repeats=2)
    assert math.isfinite(ratio) and ratio > 0
    with pytest.raises(ValueError, match="positive"):
        cpu_bf16_speedup(repeats=0)


HF_TINY = [
    "model=hf_vlm",
    "model.image_size=56",
    "model.prototype_rank=8",
    "model.heads.box.d_model=32",
    "model.heads.box.n_heads=2",
    "model.heads.box.dim_feedforward=64",
    "model.heads.box.num_layers=1",
    "model.heads.mask.d_model=32",
    "model.heads.mask.n_heads=2",
    "model.heads.mask.dim_feedforward=64",
    "model.heads.mask.num_layers=1",
    "model.heads.mask.mask_dim=8",
    "data.batch_size=2",
    "data.eval_size=4",
    "eval.batch_size=2",
    "eval.max_new_tokens=24",
    "eval.num_overlays=1",
    "eval.prefill_phrase=true",
    "optim.warmup_steps=1",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava"])
def test_hf_vlm_recipe_trains_evaluates_and_reloads(tmp_path: Path, family: str) -> None:
    from trp.models.tiny_hf import save_tiny_vlm

    directory = save_tiny_vlm(family, tmp_path / family)
    cfg = compose(
        [*HF_TINY, f"model.pretrained_dir={directory}", f"output_root={tmp_path}", "run_name=run"]
    )
    summary = train(cfg)
    assert summary["steps"] == 3
    metrics = summary["metrics"]
    assert metrics["answers/parsed"] == 1.0  # the forced phrase grounds every answer
    first = json.loads((tmp_path / "run" / "predictions.json").read_text())
    again = evaluate(
        tmp_path / "run" / "checkpoint",
        _cfg(tmp_path, "run_name=eval", "eval.prefill_phrase=true", "eval.batch_size=2",
             "data.eval_size=4", "eval.max_new_tokens=24", "trainer.precision=32-true",
             config_name="evaluate"),
    )  # fmt: skip
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == first
    assert again["metrics"] == pytest.approx(metrics)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava"])
def test_hf_vlm_ddp_two_cpu_processes(tmp_path: Path, family: str) -> None:
    from trp.models.tiny_hf import save_tiny_vlm

    directory = save_tiny_vlm(family, tmp_path / family)
    cmd = [
        sys.executable, str(ROOT / "examples" / "train.py"), "trainer=ddp_cpu", "threads=1",
        *HF_TINY, f"model.pretrained_dir={directory}", "model.lora.enabled=true",
        f"output_root={tmp_path}", "run_name=ddp",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=580, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 4
    assert (tmp_path / "ddp" / "checkpoint" / "vlm" / "trp_adapter.safetensors").is_file()
