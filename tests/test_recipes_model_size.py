"""recipe.size: the reference VLM's width and batch, chosen from the measured step time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trp.recipes import ConfigError, compose, train
from trp.recipes.model_size import AUTO_SIZE_ENV, SIZES, apply_size, choose_size, size_of

from .test_recipes_train import TINY


def _probe(seconds: float, calls: list):
    def probe(cfg, steps):
        calls.append((size_of(cfg), steps))
        return seconds

    return probe


@pytest.fixture(autouse=True)
def _rank0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(AUTO_SIZE_ENV, raising=False)


def test_default_is_auto_over_the_narrow_sizes() -> None:
    cfg = compose()
    assert cfg.recipe.size == "auto" and size_of(cfg) == "narrow"
    # The narrow size is what model/tiny_vlm.yaml and data/shapes.yaml hold.
    for key, value in SIZES["narrow"].items():
        assert OmegaConf.select(cfg, key) == value
    assert compose(["recipe=shapes_trp"]).recipe.size is None


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.4, "wide"), (0.7, "narrow")],  # 600 s: 1425 or 814 planned steps vs 1000
)
def test_auto_picks_wide_only_where_the_budget_buys_its_steps(seconds, expected) -> None:
    cfg = compose(["recipe.min_wide_steps=1000"])
    calls: list = []
    decision = choose_size(cfg, _probe(seconds, calls), budget_s=600.0)
    assert calls == [("wide", 12)]  # the probe ran the wide model, on a copy
    assert decision["size"] == expected == cfg.recipe.size == size_of(cfg)
    assert decision["probe_seconds_per_step"] == seconds
    assert decision["predicted_wide_steps"] == int(0.95 * 600 / seconds)
    assert "min_wide_steps=1000" in decision["reason"]
    assert cfg.data.batch_size == SIZES[expected]["data.batch_size"]


def test_forced_sizes_and_explicit_values_are_never_probed() -> None:
    calls: list = []
    for size in ("narrow", "wide"):
        cfg = compose([f"recipe.size={size}"])
        assert choose_size(cfg, _probe(0.1, calls), budget_s=600.0)["size"] == size
        assert size_of(cfg) == size
    # A size key set on the command line wins over auto: the config is used as given.
    cfg = compose(["model.vision.embed_dim=256"])
    decision = choose_size(cfg, _probe(0.1, calls), budget_s=600.0)
    assert decision["size"] == "custom" and cfg.model.vision.embed_dim == 256
    assert cfg.recipe.size is None and "embed_dim=256" in decision["reason"]
    # ... and over a forced size: its other keys are applied, the one set by hand is kept.
    for size in ("narrow", "wide"):
        cfg = compose([f"recipe.size={size}", "data.batch_size=24"])
        decision = choose_size(cfg, _probe(0.1, calls), budget_s=600.0)
        assert decision["size"] == "custom" and cfg.recipe.size is None
        assert cfg.data.batch_size == 24 and "batch_size=24" in decision["reason"]
        width = SIZES[size]["model.language.hidden_size"]
        assert cfg.model.language.hidden_size == width
    # The wide values set by hand stay wide; no budget: auto keeps the config's sizes.
    cfg = compose([f"{k}={v}" for k, v in SIZES["wide"].items()])
    assert choose_size(cfg, _probe(9.0, calls), budget_s=600.0)["size"] == "wide"
    cfg = compose()
    assert choose_size(cfg, _probe(0.1, calls), budget_s=None)["size"] == "narrow"
    assert calls == []


def test_bad_sizes_fail_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"recipe\.size must be one of"):
        compose(["recipe.size=huge"])
    with pytest.raises(ConfigError, match="min_wide_steps"):
        compose(["recipe.min_wide_steps=0"])
    with pytest.raises(ValueError, match="size must be one of"):
        apply_size(compose(), "custom")
    # A launched rank follows rank 0 and never times on its own.
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="recipe.size=narrow or recipe.size=wide"):
        choose_size(compose(), _probe(0.1, []), budget_s=600.0)
    monkeypatch.setenv(AUTO_SIZE_ENV, "wide")
    cfg = compose()
    assert choose_size(cfg, _probe(0.1, []), budget_s=600.0)["size"] == "wide"
    assert size_of(cfg) == "wide"


def _tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = (o.split("=") for o in TINY)
    values = {key: int(value) for key, value in pairs if key in SIZES["narrow"]}
    wide = {**values, "model.vision.embed_dim": 64, "data.batch_size": 6}
    monkeypatch.setitem(SIZES, "narrow", values)
    monkeypatch.setitem(SIZES, "wide", wide)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("min_steps", "expected"), [(1, "wide"), (10**9, "narrow")])
def test_train_times_the_wide_model_and_records_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_steps: int, expected: str
) -> None:
    _tiny_sizes(monkeypatch)
    cfg = compose(
        [
            *TINY,
            f"output_root={tmp_path}",
            "run_name=run",
            "trainer.max_time=00:00:05:00",
            f"recipe.min_wide_steps={min_steps}",
        ]
    )
    summary = train(cfg)
    assert summary["steps"] == 3
    size = json.loads((tmp_path / "run" / "metrics.json").read_text())["size"]
    assert size["requested"] == "auto" and size["size"] == expected
    assert size["probe_seconds_per_step"] > 0 and size["predicted_wide_steps"] > 0
    saved = OmegaConf.load(tmp_path / "run" / "checkpoint" / "config.yaml")
    assert saved.recipe.size == expected
    assert saved.data.batch_size == SIZES[expected]["data.batch_size"]
