"""Validation of a composed recipe config: bad values fail early with a message naming the key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from trp.recipes.conversation import TARGET_KINDS
from trp.recipes.data import DATASETS
from trp.recipes.precision import PRECISIONS

__all__ = [
    "BOX_REGION_TARGETS",
    "STRATEGIES",
    "ConfigError",
    "validate_config",
]

STRATEGIES: tuple[str, ...] = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed")
BOX_REGION_TARGETS: tuple[str, ...] = ("box", "mask")


class ConfigError(ValueError):
    """A recipe config value is invalid (the message names the key and the allowed values)."""


def _positive(cfg: DictConfig, key: str, value: Any, *, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value <= 0:
        kind = "a positive int" if integer else "a positive number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for values a run would only trip over later (or never)."""
    model, data, trainer, optim = cfg.model, cfg.data, cfg.trainer, cfg.optim
    _positive(cfg, "optim.lr", optim.lr)
    if float(optim.weight_decay) < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    if int(optim.warmup_steps) < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if not 0.0 <= float(optim.min_lr_ratio) <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {optim.min_lr_ratio}")
    for key, value in cfg.loss.items():
        if key == "mask_points":
            _positive(cfg, "loss.mask_points", value, integer=True)
        elif key == "box_region_target":
            if value not in BOX_REGION_TARGETS:
                raise ConfigError(
                    f"loss.box_region_target must be one of {BOX_REGION_TARGETS}, got {value!r}"
                )
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"loss.{key} must be a number >= 0, got {value!r}")
    for key in ("image_size", "patch_size"):
        _positive(cfg, f"model.{key}", model[key], integer=True)
    if model.image_size % model.patch_size:
        raise ConfigError(
            f"model.image_size={model.image_size} must be divisible by "
            f"model.patch_size={model.patch_size} (the ViT patch grid must be whole)"
        )
    if model.language.pretrained_dir is None and (
        model.language.hidden_size % model.language.num_heads
    ):
        raise ConfigError(
            f"model.language.hidden_size={model.language.hidden_size} must be "
            f"divisible by model.language.num_heads={model.language.num_heads}"
        )
    if not model.heads:
        raise ConfigError("model.heads must configure at least one head (box and/or mask)")
    if cfg.recipe.target not in TARGET_KINDS:
        raise ConfigError(f"recipe.target must be one of {TARGET_KINDS}, got {cfg.recipe.target!r}")
    _positive(cfg, "recipe.num_vrt", cfg.recipe.num_vrt, integer=True)
    if data.name not in DATASETS:
        raise ConfigError(f"data.name must be one of {DATASETS}, got {data.name!r}")
    _positive(cfg, "data.batch_size", data.batch_size, integer=True)
    _positive(cfg, "data.eval_size", data.eval_size, integer=True)
    _positive(cfg, "eval.batch_size", cfg.eval.batch_size, integer=True)
    _positive(cfg, "eval.max_new_tokens", cfg.eval.max_new_tokens, integer=True)
    if int(data.num_workers) < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {data.num_workers}")
    _positive(cfg, "threads", cfg.threads, integer=True)
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {PRECISIONS}, got {trainer.precision!r}"
        )
    if str(trainer.strategy) not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {STRATEGIES}, got {trainer.strategy!r}")
    _positive(cfg, "trainer.devices", trainer.devices, integer=True)
    if int(trainer.max_steps) < 0:
        raise ConfigError(f"trainer.max_steps must be >= 0, got {trainer.max_steps}")
    if trainer.max_time is not None:
        parts = str(trainer.max_time).split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"trainer.max_time must be 'DD:HH:MM:SS', got {trainer.max_time!r}")
