"""``recipe.size``: the demo model's width and batch, chosen from this machine's measured speed.

What ten minutes of training buy depends on the CPU threefold between hosts of one name and
tenfold between AVX2-only fp32 and AMX bf16. Two sizes of the reference VLM were measured
(docs/recipes.md, "One size does not fit every CPU"):

* ``narrow`` (ViT and LM 128 wide, 2 ViT and 4 LM heads, batch 16): cheap steps, but it stops
  improving at about REC ACC@0.5 0.65 (1642 and 2848 steps end at the same place);
* ``wide`` (192 wide, 3 heads as timm's ``vit_tiny``, batch 32): 2.2-2.7x the cost of a step
  and more learned per step (REC 0.69 at 1000 steps against the narrow model's 0.52, six heads
  of 32), so it wins wherever the budget buys it enough steps and loses where it does not.

``auto`` times a few training steps of the wide model inside ``trainer.fit`` (the real cost,
Lightning's overhead included), predicts how many steps the run's ``trainer.max_time`` buys
(as :class:`~trp.recipes.step_budget.StepBudget` will plan them) and picks ``wide`` when that is
at least ``recipe.min_wide_steps``, else ``narrow``. The choice is written into the config
(``recipe.size``) before the model is built, so the checkpoint, ``metrics.json`` and the repeat
command (``trainer.max_steps=N trainer.max_time=null recipe.size=<size>``) name it. A size's keys
set explicitly to other values win, over ``auto`` and over a forced ``narrow`` / ``wide`` alike:
the config is then used as given (``custom``), and the run says so. Rank 0 publishes the
decision in ``TRP_AUTO_SIZE``; the ranks Lightning launches for DDP read it (and never time
on their own), so every rank builds the same model.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from trp.recipes.schema import MODEL_SIZES, ConfigError
from trp.recipes.step_budget import PLANNED_FRACTION

__all__ = [
    "AUTO_SIZE_ENV",
    "PROBE_SKIP",
    "PROBE_STEPS",
    "SIZES",
    "SizeDecision",
    "StepTimer",
    "apply_size",
    "choose_size",
    "repeat_overrides",
    "size_of",
]

# Every key a size sets (dotted paths of the train config) and its value per size.
SIZES: dict[str, dict[str, int]] = {
    "narrow": {
        "model.vision.embed_dim": 128,
        "model.vision.num_heads": 2,
        "model.language.hidden_size": 128,
        "model.language.intermediate_size": 512,
        "model.language.num_heads": 4,
        "model.language.num_kv_heads": 4,
        "data.batch_size": 16,
    },
    "wide": {
        "model.vision.embed_dim": 192,
        "model.vision.num_heads": 3,
        "model.language.hidden_size": 192,
        "model.language.intermediate_size": 768,
        "model.language.num_heads": 3,
        "model.language.num_kv_heads": 3,
        "data.batch_size": 32,
    },
}
# Where the decision of ``auto`` is kept for the processes Lightning launches (DDP).
AUTO_SIZE_ENV = "TRP_AUTO_SIZE"
# Steps of the probe fit; the first PROBE_SKIP are left out of the timing (warm-up).
PROBE_STEPS = 12
PROBE_SKIP = 4


class SizeDecision(dict):
    """What :func:`choose_size` decided: ``size`` (narrow / wide / custom), ``requested``
    (the ``recipe.size`` asked for), ``probe_seconds_per_step`` and ``predicted_wide_steps``
    (None unless ``auto`` timed the wide model), ``reason`` (one line for the printed table)."""


def size_of(cfg: DictConfig) -> str:
    """The size whose every key ``cfg`` holds (``narrow`` / ``wide``), else ``custom``."""
    for name, keys in SIZES.items():
        if all(OmegaConf.select(cfg, key) == value for key, value in keys.items()):
            return name
    return "custom"


def _set_by_hand(cfg: DictConfig, size: str) -> dict[str, Any]:
    """The size keys ``cfg`` sets to a value that is neither ``size``'s nor the narrow one the
    packaged YAMLs hold: values a user (or a recipe) chose, which a forced size must keep."""
    own = {}
    for key, value in SIZES[size].items():
        current = OmegaConf.select(cfg, key)
        if current not in (value, SIZES["narrow"][key]):
            own[key] = current
    return own


def apply_size(cfg: DictConfig, size: str) -> None:
    """Set every key of ``SIZES[size]`` in ``cfg`` (in place) and ``recipe.size`` to ``size``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    for key, value in SIZES[size].items():
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.recipe.size = size


def repeat_overrides(size: str | None) -> list[str]:
    """What a repeat of a run of ``size`` needs besides its step count: the size itself once
    ``auto`` resolved it (``custom`` / None: the run's own overrides already say it)."""
    return [f"recipe.size={size}"] if size in SIZES else []


def choose_size(
    cfg: DictConfig,
    probe_steps: Callable[[DictConfig, int], float],
    *,
    budget_s: float | None,
) -> SizeDecision:
    """Resolve ``cfg.recipe.size`` in place (see the module doc) and say what was decided.

    Args:
        cfg: the composed train config; its ``recipe.size`` is ``auto``, ``narrow``, ``wide``
            or None (the config's sizes as given).
        probe_steps: ``(config, steps) -> seconds per step`` of a short training run of that
            config (the recipe's own trainer; only called for ``auto`` with a time budget).
        budget_s: the training budget (``trainer.max_time`` with ``fit_steps_to_time``) or
            None: ``auto`` then has nothing to fill and keeps the config's own sizes.
    """
    requested = cfg.recipe.get("size")
    decision = SizeDecision(
        requested=requested, probe_seconds_per_step=None, predicted_wide_steps=None
    )
    if requested is None:
        decision.update(size=size_of(cfg), reason="recipe.size=null: the config's sizes")
        return decision
    if requested not in MODEL_SIZES:
        raise ConfigError(
            f"recipe.size must be one of {list(MODEL_SIZES)} or null, got {requested!r}"
        )
    if requested in SIZES:
        own = _set_by_hand(cfg, requested)
        apply_size(cfg, requested)
        if not own:
            decision.update(size=requested, reason=f"recipe.size={requested}")
            return decision
        # Sizes set on the command line win over a forced size too: never dropped silently.
        for key, value in own.items():
            OmegaConf.update(cfg, key, value, merge=False)
        cfg.recipe.size = None
        keys = ", ".join(f"{k}={v}" for k, v in own.items())
        decision.update(
            size="custom", reason=f"recipe.size={requested} with the sizes set ({keys})"
        )
        return decision
    current = size_of(cfg)
    if current == "wide":
        apply_size(cfg, "wide")
        decision.update(size="wide", reason="recipe.size=auto kept the wide sizes set")
        return decision
    if current == "custom":
        # Sizes set on the command line win; auto never overwrites them.
        keys = ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in SIZES["narrow"])
        cfg.recipe.size = None
        decision.update(size="custom", reason=f"recipe.size=auto kept the sizes set ({keys})")
        return decision
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # A rank Lightning launched builds the model rank 0 chose; it never times on its own.
        published = os.environ.get(AUTO_SIZE_ENV)
        if published not in SIZES:
            raise ConfigError(
                f"recipe.size=auto on rank {os.environ['LOCAL_RANK']} without the decision of "
                f"rank 0 ({AUTO_SIZE_ENV} is {published!r}): a launcher that starts every rank "
                "itself needs recipe.size=narrow or recipe.size=wide"
            )
        apply_size(cfg, published)
        decision.update(size=published, reason=f"recipe.size=auto, rank 0 chose {published}")
        return decision
    if budget_s is None:
        apply_size(cfg, current)
        decision.update(
            size=current,
            reason=f"recipe.size=auto without trainer.max_time: the config's sizes ({current})",
        )
        return decision
    wide = copy.deepcopy(cfg)
    apply_size(wide, "wide")
    per_step = float(probe_steps(wide, PROBE_STEPS))
    if not per_step > 0:
        raise RuntimeError(f"recipe.size=auto: the wide model's probe measured {per_step} s/step")
    min_steps = int(cfg.recipe.min_wide_steps)
    # As StepBudget plans them.
    predicted = int(PLANNED_FRACTION * budget_s / per_step)
    size = "wide" if predicted >= min_steps else "narrow"
    apply_size(cfg, size)
    os.environ[AUTO_SIZE_ENV] = size
    decision.update(
        size=size,
        probe_seconds_per_step=round(per_step, 3),
        predicted_wide_steps=predicted,
        reason=(
            f"recipe.size=auto: the wide model ran {per_step:.3f} s/step here, "
            f"{predicted} steps in the budget {'>=' if size == 'wide' else '<'} "
            f"recipe.min_wide_steps={min_steps}"
        ),
    )
    return decision


class StepTimer(L.Callback):
    """Seconds per step of the training steps after the first ``skip`` (Lightning callback)."""

    def __init__(self, skip: int = PROBE_SKIP) -> None:
        self.skip = int(skip)
        self.start: float | None = None
        self.seconds_per_step = float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self.skip:
            self.start = time.monotonic()
        elif self.start is not None and step > self.skip:
            self.seconds_per_step = (time.monotonic() - self.start) / (step - self.skip)
