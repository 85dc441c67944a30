"""ReferringModule pieces: the robust token loss against dense logits, and the LR schedule."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from trp.recipes import ReferringModule, WarmupCosine
from trp.recipes.module import adamw_warmup_cosine

from .test_models_trp import _batch, _model

LOSS = {
    "token": 1.0,
    "box_l1": 5.0,
    "box_giou": 2.0,
    "box_score": 1.0,
    "mask_ce": 5.0,
    "mask_dice": 5.0,
    "mask_points": 64,
    # Left out, a key takes the recipe schema's default (4.0): these tests turn the probe on
    # where they test it.
    "patch_class": 0.0,
    "patch_class_foreground": 0.0,
}
EVAL = {"max_new_tokens": 16, "constrained": True, "mask_threshold": 0.5}
OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1}


def test_token_loss_is_the_robust_cross_entropy_of_the_dense_logits() -> None:
    model = _model()
    module = ReferringModule(model=model, optim=OPTIM, loss=LOSS, eval=EVAL)
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    loss = module.token_loss(out, batch)

    logits = model.logits(out)[:, :-1].double()
    labels = batch["labels"][:, 1:]
    base = model.vrt_base
    for s, (positions, patches) in enumerate(batch["objects"]):
        for p in positions:
            label = int(labels[s, p - 1]) - base
            others = [int(k) for k in patches if int(k) != label]
            logits[s, p - 1, [base + k for k in others]] = float("-inf")
    expected = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The exclusion matters: objects covering several patches change the loss.
    plain = F.cross_entropy(
        model.logits(out)[:, :-1].reshape(-1, logits.shape[-1]).double(),
        labels.reshape(-1),
        ignore_index=-100,
    )
    assert plain.item() > loss.item()


def test_training_step_returns_a_finite_differentiable_loss() -> None:
    model = _model().train()
    module = ReferringModule(model=model, optim=OPTIM, loss=LOSS, eval=EVAL)
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    losses = module.head_losses(out.predictions, batch)
    assert {
        "box/loss_bbox",
        "box/loss_giou",
        "box/loss_score",
        "mask/loss_mask",
        "mask/loss_dice",
    } <= set(losses)
    total = module.token_loss(out, batch) + sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.vrt.prototypes.down.weight.grad is not None


def test_first_vrt_accuracy_matches_the_dense_argmax() -> None:
    model = _model()
    module = ReferringModule(model=model, optim=OPTIM, loss=LOSS, eval=EVAL)
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    logits = model.logits(out)
    base = model.vrt_base
    hits = []
    for s, (positions, patches) in enumerate(batch["objects"]):
        own = logits[s, positions[0] - 1, base : base + model.vlm.num_patches]
        hits.append(int(own.argmax()) in patches.tolist())
    accuracy = module.first_vrt_accuracy(out, batch)
    assert float(accuracy) == pytest.approx(sum(hits) / len(hits))
    # One-hot VRT rows (patch k of every image = axis k): a state pointing at axis k picks
    # patch k, so states at a target patch are all right and at a non-target all wrong.
    n = model.vlm.num_patches
    protos = torch.eye(n, out.hidden.shape[-1]).repeat(len(batch["objects"]), 1)
    right, wrong = out.hidden.clone(), out.hidden.clone()
    for s, (positions, patches) in enumerate(batch["objects"]):
        right[s, positions[0] - 1] = protos[int(patches[0])]
        outside = sorted(set(range(n)) - set(patches.tolist()))
        wrong[s, positions[0] - 1] = protos[outside[0]]
    for hidden, want in ((right, 1.0), (wrong, 0.0)):
        got = module.first_vrt_accuracy(
            dataclasses.replace(out, hidden=hidden, vrt_rows=protos), batch
        )
        assert float(got) == want


def test_warmup_cosine_is_a_function_of_the_step() -> None:
    sched = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert sched(0) == pytest.approx(0.1)
    assert sched(9) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.55)
    assert sched(110) == pytest.approx(0.1)
    assert sched(500) == pytest.approx(0.1)
    sched.total_steps = 210  # what StepBudget does at the end of the warm-up
    assert sched(110) == pytest.approx(0.55)


class _ClockedModule(L.LightningModule):
    """A linear model whose every step advances a fake clock by ``seconds`` and records its LR."""

    def __init__(self, clock: list[float], seconds: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.clock, self.seconds, self.lrs = clock, seconds, []

    def training_step(self, batch, batch_idx):
        self.clock[0] += self.seconds
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        self.lr_schedule, config = adamw_warmup_cosine(
            self,
            {
                "lr": 1.0,
                "weight_decay": 0.0,
                "betas": [0.9, 0.98],
                "warmup_steps": 20,
                "min_lr_ratio": 0.0,
            },
        )
        return config


def _fit(
    module: L.LightningModule, max_steps: int, callbacks=(), precision: str = "32-true"
) -> L.Trainer:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)))
    trainer = L.Trainer(
        precision=precision,
        gradient_clip_val=1.0,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return trainer


def test_step_budget_fixes_the_step_count_at_the_end_of_the_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trp.recipes.step_budget import StepBudget

    clock = [1000.0]
    monkeypatch.setattr("trp.recipes.step_budget.time.monotonic", lambda: clock[0])
    budget = StepBudget(30.0, decide_at=20, first=5, fill=0.9)
    module = _ClockedModule(clock, seconds=0.5)
    trainer = _fit(module, max_steps=1000, callbacks=[budget])
    # 0.5 s/step; 10 s spent after 20 steps; 0.9 * 20 s left = 36 steps more.
    assert budget.seconds_per_step == pytest.approx(0.5)
    assert budget.steps == 56 and trainer.global_step == 56
    assert module.lr_schedule.total_steps == 56
    # The same as a run of 56 steps without a budget: a run is repeated by its step count.
    again = _ClockedModule([0.0], seconds=0.5)
    _fit(again, max_steps=56)
    assert module.lrs == pytest.approx(again.lrs)
    assert module.lrs[-1] < 0.01


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_optimizer_steps_with_clipping_in_every_precision(precision: str) -> None:
    # Fused AdamW in fp32; Lightning's mixed precision refuses to clip a fused optimizer, so a
    # module that leaves clipping to Lightning gets the plain one there.
    module = _ClockedModule([0.0], seconds=0.1)
    trainer = _fit(module, max_steps=3, precision=precision)
    assert trainer.global_step == 3
    assert bool(trainer.optimizers[0].defaults["fused"]) == (precision == "32-true")


class _SelfClippingModule(_ClockedModule):
    """Routes clipping through trp's clip_gradients, as the recipes' modules do."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        from trp.recipes.module import clip_gradients

        self.seen_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.parameters() if p.grad is not None]
        )
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clipped_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.parameters() if p.grad is not None]
        )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_self_clipping_module_gets_the_fused_optimizer_and_its_gradients_clipped(
    precision: str,
) -> None:
    module = _SelfClippingModule([0.0], seconds=0.1)
    with torch.no_grad():
        module.layer.weight.fill_(100.0)  # gradients far above gradient_clip_val=1
    trainer = _fit(module, max_steps=2, precision=precision)
    assert bool(trainer.optimizers[0].defaults["fused"])
    assert float(module.seen_norm) > 1.5
    assert float(module.clipped_norm) == pytest.approx(1.0, rel=1e-3)


def test_step_budget_keeps_a_smaller_max_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from trp.recipes.step_budget import StepBudget

    clock = [0.0]
    monkeypatch.setattr("trp.recipes.step_budget.time.monotonic", lambda: clock[0])
    budget = StepBudget(3600.0, decide_at=20, first=5)
    trainer = _fit(_ClockedModule(clock, seconds=0.1), max_steps=30, callbacks=[budget])
    assert budget.steps == 30 and trainer.global_step == 30
    with pytest.raises(ValueError, match="budget_s"):
        StepBudget(0.0, decide_at=10)


def test_patch_class_probe_learns_from_the_class_maps() -> None:
    from trp.recipes.conversation import patch_classes

    # A 4 x 4 class map on a 2 x 2 grid: majorities 1, 0, 2, 0 (ties go to the lower label).
    cmap = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 3], [2, 2, 0, 0], [2, 0, 0, 0]]])
    assert patch_classes(cmap, (2, 2)).tolist() == [[1, 0, 2, 0]]
    with pytest.raises(ValueError, match="patch grid"):
        patch_classes(cmap, (3, 3))
    with pytest.raises(ValueError, match="labels >= 0"):
        patch_classes(cmap - 1, (2, 2))

    model = _model().train()
    loss = {**LOSS, "patch_class": 2.0}
    module = ReferringModule(model=model, optim=OPTIM, loss=loss, eval=EVAL, num_patch_classes=6)
    batch = _batch(with_answers=True)
    assert batch["patch_classes"].shape == (len(batch["objects"]), model.vlm.num_patches)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    value = module.patch_class_loss(out.images.maps[0], batch)
    logits = module.patch_probe(out.images.maps[0].flatten(2).transpose(1, 2))
    want = 2.0 * F.cross_entropy(logits.reshape(-1, 6), batch["patch_classes"].reshape(-1))
    torch.testing.assert_close(value, want)
    value.backward()
    assert model.vlm.vision.patch_embed.proj.weight.grad.abs().sum() > 0
    # The foreground term: the same cross-entropy averaged over the object patches only.
    module.loss_cfg["patch_class_foreground"] = 3.0
    labels = batch["patch_classes"].reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, 6), labels, reduction="none")
    assert (labels > 0).any() and (labels == 0).any()
    with torch.no_grad():
        both = module.patch_class_loss(out.images.maps[0], batch)
    torch.testing.assert_close(both, want + 3.0 * ce[labels > 0].mean())
    # The foreground weight alone also makes the probe.
    alone = {**LOSS, "patch_class_foreground": 1.0}
    only = ReferringModule(model=model, optim=OPTIM, loss=alone, eval=EVAL, num_patch_classes=6)
    assert only.patch_probe is not None
    with torch.no_grad():
        logits_only = only.patch_probe(out.images.maps[0].flatten(2).transpose(1, 2))
        ce_only = F.cross_entropy(logits_only.reshape(-1, 6), labels, reduction="none")
        torch.testing.assert_close(
            only.patch_class_loss(out.images.maps[0], batch), ce_only[labels > 0].mean()
        )
    # A batch without object patches has no foreground term (not NaN).
    empty = {**batch, "patch_classes": torch.zeros_like(batch["patch_classes"])}
    with torch.no_grad():
        assert torch.isfinite(module.patch_class_loss(out.images.maps[0], empty))
    # Without the weight (or without classes) there is no probe.
    assert (
        ReferringModule(
            model=model, optim=OPTIM, loss=LOSS, eval=EVAL, num_patch_classes=6
        ).patch_probe
        is None
    )


def test_patch_referent_probe_reads_the_image_states_against_mask_coverage() -> None:
    model = _model().train()
    loss = {**LOSS, "patch_referent": 3.0}
    module = ReferringModule(model=model, optim=OPTIM, loss=loss, eval=EVAL)
    batch = _batch(with_answers=True)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["parses"])
    value = module.patch_referent_loss(out, batch)

    # By hand: the states at the <image> tokens, each patch's covered fraction of the mask.
    gh, gw = model.vlm.config.grid
    h, w = model.image_size
    want = []
    for s in range(len(batch["objects"])):
        states = out.hidden[s][batch["input_ids"][s] == model.image_token_id]
        logits = module.referent_probe(states)[:, 0]
        cells = batch["masks"][s].float().reshape(gh, h // gh, gw, w // gw)
        coverage = cells.mean((1, 3)).flatten()
        want.append(F.binary_cross_entropy_with_logits(logits, coverage, reduction="none"))
    torch.testing.assert_close(value, 3.0 * torch.cat(want).mean())
    # The object covers some patches and leaves others empty.
    assert float(coverage.max()) > 0 and float(coverage.min()) == 0
    value.backward()
    assert model.vlm.language.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.vlm.vision.patch_embed.proj.weight.grad.abs().sum() > 0
    # Off by default; a prompt without its image tokens is refused.
    assert ReferringModule(model=model, optim=OPTIM, loss=LOSS, eval=EVAL).referent_probe is None
    broken = {**batch, "input_ids": batch["input_ids"].clone()}
    broken["input_ids"][0, broken["input_ids"][0] == model.image_token_id] = model.pad_id
    with pytest.raises(ValueError, match="image"):
        module.patch_referent_loss(out, broken)
