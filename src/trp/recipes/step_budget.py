"""A wall-clock training budget turned into a step count, measured during the warm-up.

A run stopped by the clock is not reproducible: how far it gets, and where a time-based
learning-rate schedule is on each step, depend on the machine and its load. :class:`StepBudget`
instead times the steps of the warm-up, and when the warm-up ends (before the cosine decay
begins) fixes ``max_steps`` to the number of steps that fill the budget on this machine; the
schedule then runs over exactly that many steps. So a run is defined by its seed and step
count: ``trainer.max_steps=N trainer.max_time=null`` repeats a budgeted run of N steps
(same precision) on any machine, and a slow CPU trains fewer steps of the same schedule rather
than a schedule cut short. ``trainer.max_time`` stays the hard stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L

__all__ = ["PLANNED_FRACTION", "StepBudget"]

# The fraction of the remaining budget a plan fills (the rest absorbs jitter).
PLANNED_FRACTION = 0.95


class StepBudget(L.Callback):
    """Fix ``trainer.max_steps`` from the speed of the first steps.

    Args:
        budget_s: the training wall-clock budget (seconds, from the start of fit).
        decide_at: the step whose end fixes the count — the end of the learning-rate warm-up,
            so the schedule's decay only ever sees the final count (at least ``first + 10``).
        first: steps left out of the timing (allocator and cache warm-up).
        fill: the fraction of the remaining budget planned for (the rest absorbs jitter, so the
            hard ``max_time`` stop does not cut the schedule short).
        repeat_overrides: overrides the printed repeat command needs besides the step count
            (e.g. the ``recipe.size`` that ``auto`` chose).

    After the decision :attr:`steps` is the count and :attr:`seconds_per_step` the measured
    speed; ``module.lr_schedule.total_steps`` (a :class:`trp.recipes.WarmupCosine`) follows
    ``max_steps``. Under DDP rank 0's count is broadcast, so every rank stops at the same step.
    """

    def __init__(
        self,
        budget_s: float,
        *,
        decide_at: int,
        first: int = 5,
        fill: float = PLANNED_FRACTION,
        repeat_overrides: Sequence[str] = (),
    ) -> None:
        if not budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {budget_s}")
        if first < 0 or not 0 < fill <= 1:
            raise ValueError(f"need first >= 0 and 0 < fill <= 1, got {first}, {fill}")
        self.budget_s = float(budget_s)
        self.first = int(first)
        self.decide_at = max(int(decide_at), self.first + 10)
        self.fill = float(fill)
        self.repeat_overrides = "".join(f" {o}" for o in repeat_overrides)
        self.steps: int | None = None
        self.seconds_per_step: float | None = None
        self._start = 0.0
        self._first_at: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.first:
            self._first_at = time.monotonic()
        if step != self.decide_at or self._first_at is None or self.steps is not None:
            return
        now = time.monotonic()
        per_step = (now - self._first_at) / (self.decide_at - self.first)
        left = self.budget_s - (now - self._start)
        steps = self.decide_at + max(0, math.floor(left * self.fill / per_step))
        if trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps)
        steps = int(trainer.strategy.broadcast(steps, src=0))
        trainer.fit_loop.epoch_loop.max_steps = steps
        schedule = getattr(pl_module, "lr_schedule", None)
        if schedule is not None:
            schedule.total_steps = max(steps, schedule.warmup_steps + 1)
        self.steps, self.seconds_per_step = steps, per_step
        if trainer.is_global_zero:
            print(
                f"\nstep budget: {per_step:.3f} s/step over steps {self.first}-{self.decide_at} "
                f"-> {steps} steps fill {self.budget_s:.0f} s "
                f"(reproduce with trainer.max_steps={steps} trainer.max_time=null"
                f"{self.repeat_overrides})"
            )
