"""``ReferringModule``: the LightningModule that trains and evaluates a
:class:`trp.models.TRPForConditionalGeneration`.

Training loss = token cross-entropy over the answer (text ⊕ the sample's own VRTs, with PaDT's
robust exclusion of the object's other target patches, fused in
:func:`trp.ops.vrt_linear_cross_entropy`) + box losses (:class:`trp.losses.BoxCriterion`) +
mask losses (:class:`trp.losses.MaskCriterion`) of every target through every head.

Evaluation (``test``) generates the answer greedily under the grammar constraint, decodes the
parsed targets and accumulates REC (box head) and RES (mask head) metrics, plus REC of the tight
boxes of the predicted masks (``rec_from_mask/*``, a diagnostic: it tells box-head errors from
wrong objects); per-sample predictions are kept for JSON output and overlays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F

from trp.heads import masks_to_boxes
from trp.losses import BoxCriterion, MaskCriterion, box_cxcywh_to_xyxy, box_region_loss
from trp.metrics import RECMetric, RESMetric
from trp.models.trp_model import TRPForConditionalGeneration, TRPOutput
from trp.recipes.schema import EvalConfig, LossConfig, OptimConfig, complete
from trp.vrt import mask_coverage

__all__ = [
    "ReferringModule",
    "WarmupCosine",
    "WarmupCosineAdamW",
    "adamw_warmup_cosine",
    "clip_gradients",
    "patch_class_loss",
    "patch_probe",
]


class WarmupCosine:
    """LR factor: linear warm-up, then cosine decay over ``total_steps`` to ``min_ratio``.

    A function of the step alone, so a run is repeated by its step count. ``total_steps`` may
    be changed until the warm-up ends (:class:`trp.recipes.step_budget.StepBudget` sets it
    from the measured speed there).
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span if span > 0 else 0.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    module: L.LightningModule, optim: Mapping[str, Any]
) -> tuple[WarmupCosine, dict[str, Any]]:
    """AdamW over ``module``'s trainable parameters (no weight decay on biases, norms and
    embeddings) with a per-step :class:`WarmupCosine` over the trainer's ``max_steps``.

    Returns the schedule (kept by the modules as ``lr_schedule``, which
    :class:`trp.recipes.step_budget.StepBudget` adjusts) and Lightning's optimizer config.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name or "embed" in name else decay).append(p)
    # The fused kernel (one pass per parameter, CPU and CUDA): the per-parameter loop torch
    # otherwise runs on CPUs costs 29 vs 8 ms per step for the demo's 285 tensors. Under bf16
    # autocast only for a module whose configure_gradient_clipping calls clip_gradients (as the
    # recipes' modules do): Lightning's mixed-precision plugin refuses to clip any fused
    # optimizer. Never with fp16's gradient scaler, which would have to unscale inside it.
    trainer = module._trainer
    precision = str(trainer.precision) if trainer is not None else "32-true"
    default_clipping = L.LightningModule.configure_gradient_clipping
    clips_itself = type(module).configure_gradient_clipping is not default_clipping
    safe = "mixed" not in precision or (clips_itself and _unscaled_autocast(module))
    fused = safe and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay
    )
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(optim["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=float(optim["lr"]),
        betas=tuple(optim["betas"]),
        fused=fused or None,
    )
    warmup = int(optim["warmup_steps"])
    max_steps = int(trainer.max_steps) if trainer is not None else 0
    schedule = WarmupCosine(
        warmup_steps=warmup,
        total_steps=max(max_steps, warmup + 1) if max_steps > 0 else 0,
        min_ratio=float(optim["min_lr_ratio"]),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return schedule, {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _unscaled_autocast(module: L.LightningModule) -> bool:
    """Lightning's plain mixed-precision plugin without a gradient scaler (bf16 autocast): the
    case where :func:`clip_gradients` clips a fused optimizer itself."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = module.trainer.precision_plugin
    return isinstance(plugin, MixedPrecision) and plugin.scaler is None


def clip_gradients(
    module: L.LightningModule,
    optimizer: torch.optim.Optimizer,
    clip_val: float | None,
    algorithm: str | None,
) -> None:
    """``Trainer(gradient_clip_val=...)`` for :func:`adamw_warmup_cosine`'s optimizer (the
    modules' ``configure_gradient_clipping``): under bf16 autocast, where no gradient scaler
    exists, the gradients are clipped here (one foreach pass), since Lightning's mixed-precision
    plugin refuses a fused optimizer; every other precision and strategy (fp16's scaler, FSDP,
    DeepSpeed) clips through Lightning as usual."""
    if not clip_val or not _unscaled_autocast(module):
        module.clip_gradients(optimizer, clip_val, algorithm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, float(clip_val), foreach=True)
    else:
        torch.nn.utils.clip_grad_norm_(params, float(clip_val), foreach=True)


class WarmupCosineAdamW(L.LightningModule):
    """The recipes' optimisation for a module with an ``optim`` mapping: AdamW with the
    warm-up + cosine schedule (:func:`adamw_warmup_cosine`, kept as ``lr_schedule``) and its
    gradient clipping (:func:`clip_gradients`)."""

    optim: Mapping[str, Any]
    lr_schedule: WarmupCosine | None

    def configure_optimizers(self) -> dict[str, Any]:
        self.lr_schedule, config = adamw_warmup_cosine(self, self.optim)
        return config

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def patch_probe(
    vision_dim: int, num_classes: int, loss: Mapping[str, Any]
) -> torch.nn.Linear | None:
    """The linear probe of :func:`patch_class_loss` (``vision_dim`` -> ``num_classes``, the
    background included), or ``None`` without classes or with ``loss.patch_class`` and
    ``loss.patch_class_foreground`` both 0."""
    weight = float(loss["patch_class"]) + float(loss["patch_class_foreground"])
    return torch.nn.Linear(vision_dim, num_classes) if num_classes > 0 and weight > 0 else None


def patch_class_loss(
    probe: torch.nn.Linear, fmap: Tensor, labels: Tensor, *, weight: float, foreground: float
) -> Tensor:
    """``weight`` x cross-entropy of the linear ``probe``'s label for every patch of the vision
    map ``fmap`` [B, D, h, w] against ``labels`` [B, h * w] (0 background, 1 + class), plus
    ``foreground`` x its mean over the patches of objects (label > 0): most patches are
    background, and the mean over all of them leaves telling the shapes apart a small share of
    the loss."""
    logits = probe(fmap.flatten(2).transpose(1, 2))  # B x N x K
    labels = labels.to(logits.device)
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"patch_classes must be [B, h * w] = {list(logits.shape[:2])} for the vision map "
            f"{list(fmap.shape)}, got {list(labels.shape)}"
        )
    if int(labels.max()) >= logits.shape[-1]:
        raise ValueError(
            f"patch_classes holds label {int(labels.max())}, the probe has "
            f"{logits.shape[-1]} classes (num_patch_classes)"
        )
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    loss = weight * ce.mean()
    objects = labels.reshape(-1) > 0
    if foreground > 0 and bool(objects.any()):
        loss = loss + foreground * ce[objects].mean()
    return loss


class ReferringModule(WarmupCosineAdamW):
    """Lightning wrapper of a :class:`TRPForConditionalGeneration`.

    Args:
        model: the VLM.
        optim: ``lr``, ``weight_decay``, ``warmup_steps``, ``betas`` and ``min_lr_ratio``
            (cosine decay to ``lr * min_lr_ratio`` over the trainer's ``max_steps``).
        loss: weights ``token``, ``box_l1``, ``box_giou``, ``box_score``, ``box_region`` (CE
            and dice of a box head's ``region_logits``, when it has them, against the filled
            target box or, with ``box_region_target: mask``, the object's mask), ``mask_ce``,
            ``mask_dice`` and ``mask_points`` (points sampled per mask).
        eval: ``max_new_tokens``, ``constrained``, ``mask_threshold``, ``threads`` (intra-op
            threads while evaluating) and ``prefill_phrase`` (force each answer to start with
            the batch's ``answer_prefix``, ``<Phrase>expression</Phrase>(<Unit>unit</Unit>``:
            the model grounds the given phrase, Kosmos-2's REC protocol).
        target: ``"vrt"`` or ``"ref"`` (which target kinds generation may use).
        keep_images: held-out predictions that keep their image (for overlays).
        num_patch_classes: labels of the batches' ``patch_classes`` (background included); with
            ``loss.patch_class > 0`` a linear probe on the vision map learns them (cross-entropy,
            ``train/patch_class``): dense supervision that teaches a from-scratch ViT the shapes
            the expressions name far sooner than the referring losses alone;
            ``loss.patch_class_foreground`` adds its mean over the object patches alone. Not
            part of the model (checkpoints hold the VLM only).

    With ``loss.patch_referent > 0`` a second linear probe reads the LM's last states at the
    ``<image>`` tokens and predicts, for every patch, the fraction of it the referred object's
    mask covers (binary cross-entropy with these soft targets, ``train/patch_referent``). With
    the instruction before the image each patch's state has read the expression, so this is a
    dense referring-segmentation signal on the states that :class:`trp.vrt.VRTContext` turns
    into the VRT classifier rows: every patch of the scene says whether it is the referent,
    where the token loss only rewards the one patch each VRT names. Not part of the model.
    """

    def __init__(
        self,
        *,
        model: TRPForConditionalGeneration,
        optim: Mapping[str, Any],
        loss: Mapping[str, Any],
        eval: Mapping[str, Any],
        target: str = "vrt",
        keep_images: int = 8,
        num_patch_classes: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        # Keys left out take the schema's defaults (trp.recipes.schema, the YAML's values): one
        # place for them; unknown keys and bad values raise ConfigError naming the key.
        self.optim = complete(OptimConfig, optim, "optim")
        self.loss_cfg = loss = complete(LossConfig, loss, "loss")
        self.eval_cfg = complete(EvalConfig, eval, "eval")
        self.target = target
        self.lr_schedule: WarmupCosine | None = None
        self.keep_images = keep_images
        self.box_criterion = BoxCriterion(
            weight_l1=float(loss["box_l1"]),
            weight_giou=float(loss["box_giou"]),
            weight_score=float(loss["box_score"]),
        )
        self.mask_criterion = MaskCriterion(
            weight_ce=float(loss["mask_ce"]),
            weight_dice=float(loss["mask_dice"]),
            num_points=int(loss["mask_points"]),
        )
        # Auxiliary dense supervision of the vision encoder: a linear probe classifies every
        # patch (background or a class) from the vision map, when batches bring patch_classes.
        self.patch_probe = patch_probe(int(model.vlm.vision_dim), num_patch_classes, loss)
        self.referent_probe = (
            torch.nn.Linear(int(model.text_weight.shape[1]), 1)
            if float(loss["patch_referent"]) > 0
            else None
        )
        self.rec = RECMetric()
        self.rec_from_mask = RECMetric()
        self.res = RESMetric()
        self.predictions: list[dict[str, Any]] = []
        self._train_threads = torch.get_num_threads()

    # ------------------------------------------------------------------ training
    def token_loss(self, out: TRPOutput, batch: dict) -> Tensor:
        """Mean robust cross-entropy over the answer tokens (:func:`trp.vrt.vrt_token_loss`)."""
        return self.model.token_loss(out, batch["labels"], batch["objects"])

    def patch_class_loss(self, fmap: Tensor, batch: dict) -> Tensor:
        """:func:`patch_class_loss` of the probe with ``loss.patch_class`` /
        ``loss.patch_class_foreground``."""
        assert self.patch_probe is not None
        return patch_class_loss(
            self.patch_probe,
            fmap,
            batch["patch_classes"],
            weight=float(self.loss_cfg["patch_class"]),
            foreground=float(self.loss_cfg["patch_class_foreground"]),
        )

    def patch_referent_loss(self, out: dict, batch: dict) -> Tensor:
        """``loss.patch_referent`` x binary cross-entropy of the referent probe on the LM's last
        states at the ``<image>`` tokens against each patch's coverage by the target mask."""
        assert self.referent_probe is not None
        ids = batch["input_ids"]
        is_image = ids == self.model.image_token_id  # B x L
        grid = out.images.grids[0]
        n = grid[0] * grid[1]
        counts = is_image.sum(1)
        if bool((counts != n).any()):
            raise ValueError(
                f"the patch_referent probe needs {n} image tokens in every prompt, "
                f"got {counts.tolist()}"
            )
        states = out.hidden[is_image].reshape(ids.shape[0], n, -1)  # B x N x D
        logits = self.referent_probe(states)[..., 0]  # B x N
        coverage = torch.stack([mask_coverage(m, grid).flatten() for m in batch["masks"]]).to(
            logits.device
        )  # B x N
        bce = F.binary_cross_entropy_with_logits(logits, coverage)
        return float(self.loss_cfg["patch_referent"]) * bce

    @torch.no_grad()
    def first_vrt_accuracy(self, out: TRPOutput, batch: dict) -> Tensor | None:
        """Fraction of answers whose first VRT, predicted under teacher forcing (argmax over the
        sample's own patches), is one of its object's target patches: how often the LM picks
        the right object. ``None`` when the batch has no VRT targets."""
        firsts = [
            (s, positions[0] - 1, patches)
            for s, (positions, patches) in enumerate(batch["objects"])
            if positions
        ]
        if not firsts:
            return None
        samples = torch.tensor([s for s, _, _ in firsts])
        rows = out.hidden[samples.to(out.hidden.device), torch.tensor([p for _, p, _ in firsts])]
        index, valid = out.binding.padded_index()  # B x max_P feature rows of each sample
        protos = out.vrt_rows.float()[index[samples].to(out.vrt_rows.device)]  # S x max_P x D
        scores = torch.einsum("sd,spd->sp", rows.float(), protos)
        picked = scores.masked_fill(~valid[samples].to(scores.device), -torch.inf).argmax(1)
        hits = [int(k) in set(ok.tolist()) for k, (_, _, ok) in zip(picked.tolist(), firsts)]
        return torch.tensor(sum(hits) / len(hits))

    def head_losses(self, predictions: dict, batch: dict) -> dict[str, Tensor]:
        """Box and mask criteria of every routed target against its sample's object."""
        losses: dict[str, Tensor] = {}
        if "box" in predictions:
            routed = predictions["box"]
            sample = routed.sample.to(batch["boxes"].device)
            part = self.box_criterion(routed.predictions, {"boxes": batch["boxes"][sample]})
            losses.update({f"box/{k}": v for k, v in part.items()})
            if "region_logits" in routed.predictions:
                weight = float(self.loss_cfg["box_region"])
                masks = None
                if self.loss_cfg["box_region_target"] == "mask":
                    masks = batch["masks_small"][sample]
                region = box_region_loss(
                    routed.predictions["region_logits"], batch["boxes"][sample], masks=masks
                )
                losses.update({f"box/{k}": weight * v for k, v in region.items()})
        if "mask" in predictions:
            routed = predictions["mask"]
            sample = routed.sample.to(batch["masks_small"].device)
            part = self.mask_criterion(routed.predictions, {"masks": batch["masks_small"][sample]})
            losses.update({f"mask/{k}": v for k, v in part.items()})
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.model(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["parses"],
            **batch["image_inputs"],
        )
        token = self.token_loss(out, batch) * float(self.loss_cfg["token"])
        losses = {"token": token, **self.head_losses(out.predictions, batch)}
        if self.patch_probe is not None and "patch_classes" in batch:
            losses["patch_class"] = self.patch_class_loss(out.images.maps[0], batch)
        if self.referent_probe is not None:
            losses["patch_referent"] = self.patch_referent_loss(out, batch)
        total = sum(losses.values())
        bs = batch["images"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self.log("train/token", token, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "token"}, batch_size=bs)
        accuracy = self.first_vrt_accuracy(out, batch)
        if accuracy is not None:
            self.log("train/first_vrt_acc", accuracy, prog_bar=True, batch_size=bs)
        return total

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_batch(self, batch: dict) -> list[dict[str, Any]]:
        """Generate, decode and return one prediction dict per sample (boxes in xyxy pixels,
        masks as bool ``[H, W]``; a sample whose answer has no target gets an empty box/mask)."""
        prefill = bool(self.eval_cfg["prefill_phrase"])
        gen = self.model.generate(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            image_inputs=batch["image_inputs"],
            max_new_tokens=int(self.eval_cfg["max_new_tokens"]),
            constrained=bool(self.eval_cfg["constrained"]),
            allow_ref=self.target == "ref",
            allow_vrt=self.target == "vrt",
            forced_prefix=batch.get("answer_prefix") if prefill else None,
        )
        heads = {unit: routed.predictions for unit, routed in gen.predictions.items()}
        b = batch["images"].shape[0]
        h, w = batch["images"].shape[-2:]
        first: dict[int, int] = {}
        routed = next(iter(gen.predictions.values()), None)
        for q, s in enumerate(routed.sample.tolist() if routed is not None else []):
            first.setdefault(s, q)
        boxes = torch.zeros(b, 4)
        masks = torch.zeros(b, h, w, dtype=torch.bool)
        scores = torch.full((b,), float("nan"))
        found = torch.zeros(b, dtype=torch.bool)
        if first:
            rows = torch.tensor(list(first.values()))
            samples = torch.tensor(list(first.keys()))
            found[samples] = True
            if "box" in heads:
                xyxy = box_cxcywh_to_xyxy(heads["box"]["boxes"][rows].float().cpu())
                boxes[samples] = xyxy.clamp(0, 1) * torch.tensor([w, h, w, h])
                scores[samples] = heads["box"]["scores"][rows].float().sigmoid().cpu()
            if "mask" in heads:
                logits = F.interpolate(
                    heads["mask"]["masks"][rows].float()[:, None],
                    size=(h, w),
                    mode="bilinear",
                    align_corners=False,
                )[:, 0]
                masks[samples] = logits.cpu().sigmoid() > float(self.eval_cfg["mask_threshold"])
        preds = []
        for i in range(b):
            keep = len(self.predictions) + i < self.keep_images
            preds.append(
                {
                    "image": batch["images"][i].cpu() if keep else None,
                    "index": int(batch["index"][i]),
                    "expression": batch["expressions"][i],
                    "unit": batch["units"][i],
                    "answer": gen.texts[i],
                    # A referring answer counts as parsed only when it names a target.
                    "parsed": _grounds(gen.parses[i]),
                    "found": bool(found[i]),
                    "box": boxes[i].tolist(),
                    "score": None if math.isnan(float(scores[i])) else float(scores[i]),
                    "mask": masks[i],
                    "target_box": batch["boxes_xyxy"][i].tolist(),
                    "target_mask": batch["masks"][i].cpu(),
                }
            )
        return preds

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = self.predict_batch(batch)
        pred_boxes = torch.tensor([p["box"] for p in preds])
        self.rec.update(pred_boxes, batch["boxes_xyxy"].float().cpu())
        h, w = batch["images"].shape[-2:]
        from_mask = box_cxcywh_to_xyxy(masks_to_boxes(torch.stack([p["mask"] for p in preds])))
        self.rec_from_mask.update(
            from_mask * torch.tensor([w, h, w, h]), batch["boxes_xyxy"].float().cpu()
        )
        self.res.update(torch.stack([p["mask"] for p in preds]), batch["masks"].cpu())
        self.predictions.extend(preds)

    def on_test_epoch_start(self) -> None:
        # Token-by-token decoding is many tiny matmuls: extra intra-op threads only add
        # synchronisation (ruinous on a loaded machine), so evaluation has its own count.
        self._train_threads = torch.get_num_threads()
        torch.set_num_threads(int(self.eval_cfg["threads"]))
        self.predictions = []
        self.rec.reset()
        self.rec_from_mask.reset()
        self.res.reset()

    def on_test_epoch_end(self) -> None:
        torch.set_num_threads(self._train_threads)
        metrics = {f"rec/{k}": v for k, v in self.rec.compute().items()}
        metrics.update({f"res/{k}": v for k, v in self.res.compute().items()})
        metrics.update({f"rec_from_mask/{k}": v for k, v in self.rec_from_mask.compute().items()})
        parsed = torch.tensor([float(p["parsed"]) for p in self.predictions])
        # The fraction of answers that parse *and* hold a target (plain text does not count).
        metrics["answers/parsed"] = parsed.mean() if parsed.numel() else torch.tensor(0.0)
        self.log_dict(
            {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()},
            sync_dist=False,
        )


def _grounds(parse) -> bool:
    """A strict parse holding at least one target (what a referring prompt asks for)."""
    return parse is not None and any(t.targets for t in parse.triplets)
