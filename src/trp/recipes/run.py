"""One-call entry points of the recipes: :func:`train` (fit, save, evaluate) and :func:`evaluate`.

Both take a composed config (``examples/train.py`` composes it with Hydra from the packaged
``trp.configs``; :func:`compose` does the same from Python). Outputs go to ``cfg.output_dir``:
``checkpoint/`` (safetensors + config + tokenizer), ``metrics.json``, ``predictions.json``,
``overlays/*.png`` and the CSV (optionally TensorBoard) logs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from trp.data import SHAPE_CLASSES
from trp.machine import keep_freed_memory, machine
from trp.models.build import build_hf_model, build_model, build_tokenizer
from trp.models.trp_model import TRPForConditionalGeneration
from trp.recipes.checkpoint import load_checkpoint, save_checkpoint
from trp.recipes.config import ConfigError, validate_config
from trp.recipes.conversation import HFReferringCollator, ReferringCollator
from trp.recipes.data import ReferringDataModule, build_datasets, corpus
from trp.recipes.model_size import StepTimer, choose_size, repeat_overrides
from trp.recipes.module import ReferringModule
from trp.recipes.overlays import save_overlays
from trp.recipes.precision import resolve_precision
from trp.recipes.step_budget import StepBudget

__all__ = ["compose", "evaluate", "format_metrics", "parse_max_time", "train"]


def compose(overrides: Sequence[str] = (), *, config_name: str = "train") -> DictConfig:
    """Compose the packaged config with Hydra overrides (as on the command line)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="trp.configs", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    # Keys added with + and bad values fail here, naming the key (trp.recipes.schema).
    validate_config(cfg)
    return cfg


def parse_max_time(value: str | None) -> float | None:
    """``"DD:HH:MM:SS"`` -> seconds (None stays None)."""
    if value is None:
        return None
    d, h, m, s = (int(p) for p in str(value).split(":"))
    return float(((d * 24 + h) * 60 + m) * 60 + s)


def _is_hf(cfg: DictConfig) -> bool:
    """``model=hf_vlm``: a local Hugging Face VLM instead of the reference VLM."""
    return "pretrained_dir" in cfg.model


def _collators(cfg: DictConfig, model: TRPForConditionalGeneration) -> tuple[Any, ...]:
    size = (int(cfg.model.image_size), int(cfg.model.image_size))
    common: dict[str, Any] = {
        "image_size": size,
        "target": cfg.recipe.target,
        "num_vrt": int(cfg.recipe.num_vrt),
        "prompt_first": bool(cfg.recipe.prompt_first),
    }
    if model.processor is not None:
        from trp.models.hf_conversation import token_grid

        common.update(processor=model.processor, grid=token_grid(model.processor, size))
        return (
            HFReferringCollator(**common, with_answers=True),
            HFReferringCollator(**common, with_answers=False),
        )
    grid = int(cfg.model.image_size) // int(cfg.model.patch_size)
    common.update(tokenizer=model.tokenizer, grid=(grid, grid))
    return (
        ReferringCollator(**common, with_answers=True),
        ReferringCollator(**common, with_answers=False),
    )


def _datamodule(
    cfg: DictConfig, model: TRPForConditionalGeneration, train_set, held_out
) -> ReferringDataModule:
    train_collate, eval_collate = _collators(cfg, model)
    return ReferringDataModule(
        train=train_set,
        held_out=held_out,
        train_collate=train_collate,
        eval_collate=eval_collate,
        batch_size=int(cfg.data.batch_size),
        eval_batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.data.num_workers),
    )


def _module(cfg: DictConfig, model: TRPForConditionalGeneration) -> ReferringModule:
    # Synthetic scenes label every pixel (background + the shape classes).
    classes = len(SHAPE_CLASSES) + 1 if cfg.data.name == "shapes" else 0
    return ReferringModule(
        model=model,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        eval=OmegaConf.to_container(cfg.eval, resolve=True),
        target=cfg.recipe.target,
        keep_images=int(cfg.eval.num_overlays),
        num_patch_classes=classes,
    )


def _budget_seconds(cfg: DictConfig) -> float | None:
    """The training budget a step count is planned for: ``trainer.max_time`` in seconds with
    ``trainer.fit_steps_to_time``, else None (``max_time`` then just stops the run)."""
    seconds = parse_max_time(cfg.trainer.max_time)
    return seconds if seconds and cfg.trainer.fit_steps_to_time else None


def _trainer(
    cfg: DictConfig, output_dir: Path, *, logger: bool = True, budget: bool = False
) -> L.Trainer:
    """The Lightning trainer of ``cfg.trainer``; ``budget``: a training run, whose
    ``max_time`` (with ``fit_steps_to_time``) becomes a step count (:class:`StepBudget`)."""
    t = cfg.trainer
    strategy: Any = t.strategy
    if t.strategy == "ddp" and t.process_group_backend:
        from lightning.pytorch.strategies import DDPStrategy

        # A HF host's ranks can leave different parameters without a gradient in a step (a
        # batch's answers decide which VRT rows, token rows and head paths are used): DDP must
        # look for them, or the ranks wait on different all-reduce buckets forever.
        strategy = DDPStrategy(
            process_group_backend=t.process_group_backend, find_unused_parameters=_is_hf(cfg)
        )
    loggers: list[Any] = []
    if logger and cfg.logger.csv:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(str(output_dir), name="logs"))
    if logger and cfg.logger.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(output_dir), name="tensorboard"))
    callbacks: list[Any] = []
    seconds = _budget_seconds(cfg)
    if budget and seconds:
        again = repeat_overrides(cfg.recipe.get("size"))
        callbacks.append(
            StepBudget(seconds, decide_at=int(cfg.optim.warmup_steps), repeat_overrides=again)
        )
    return L.Trainer(
        callbacks=callbacks,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=resolve_precision(str(t.precision), str(t.accelerator)),
        max_steps=int(t.max_steps),
        max_time=t.max_time,
        log_every_n_steps=int(t.log_every_n_steps),
        gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=bool(t.enable_progress_bar),
        enable_checkpointing=False,
        logger=loggers or False,
        default_root_dir=str(output_dir),
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def _setup(cfg: DictConfig) -> None:
    validate_config(cfg)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)


def training_facts(trainer: L.Trainer, seconds: float) -> dict[str, Any]:
    """What a training run did and on what: ``steps``, ``train_seconds``,
    ``seconds_per_step``, ``precision``, ``planned_steps`` (the count :class:`StepBudget`
    fixed, or None) and :func:`trp.machine.machine` — the CPU model and instruction sets."""
    steps = int(trainer.global_step)
    budget = next((c for c in trainer.callbacks if isinstance(c, StepBudget)), None)
    return {
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps, 3) if steps else None,
        "precision": str(trainer.precision),
        "planned_steps": budget.steps if budget is not None else None,
        **machine(),
    }


def format_training(facts: dict[str, Any]) -> str:
    """One line per fact of :func:`training_facts` (the header of the printed metrics)."""
    isa = facts["trp_cpu_capability"] or "no trp._C"
    limits = " ".join(f"{k}={v}" for k, v in facts["isa_limits"].items())
    lines = [
        f"trained {facts['steps']} steps in {facts['train_seconds']:.0f} s "
        f"({facts['seconds_per_step']} s/step), precision {facts['precision']}, "
        f"{facts['threads']} threads",
        f"CPU: {facts['cpu_model']}; kernels {isa}, ATen {facts['aten_cpu_capability']}"
        + (f" ({limits})" if limits else ""),
    ]
    size = facts.get("size")
    if size:
        lines.append(f"model size {size['size']} ({size['reason']})")
    planned = facts["planned_steps"]
    if planned is not None:
        again = " ".join(
            [
                f"trainer.max_steps={planned}",
                "trainer.max_time=null",
                *repeat_overrides(size["size"] if size else None),
            ]
        )
        lines.append(f"repeat this run's schedule on any machine: {again}")
    if planned is not None and facts["steps"] < planned:
        lines.append(
            f"stopped by trainer.max_time at step {facts['steps']} of the {planned} planned: "
            "the machine slowed down after the warm-up, the schedule had not ended"
        )
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column text table of ``metrics``."""
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def _run_eval(
    trainer: L.Trainer,
    module: ReferringModule,
    datamodule: ReferringDataModule,
    output_dir: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``trainer.test`` on the held-out set, then metrics.json / predictions.json / overlays."""
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    summary = {"metrics": metrics, "samples": len(datamodule.held_out), **extra}
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        _write_predictions(module.predictions, output_dir / "predictions.json")
        overlays = save_overlays(
            [
                {
                    "image": p["image"],
                    "box": p["box"],
                    "target_box": p["target_box"],
                    "mask": p["mask"],
                    "name": f"sample_{p['index']:04d}",
                    "text": f"{p['expression']} -> {p['answer']}",
                }
                for p in module.predictions
                if p["image"] is not None
            ],
            output_dir / "overlays",
        )
        summary["overlays"] = [str(p) for p in overlays]
        if "seconds_per_step" in extra:
            print("\n" + format_training(extra))
        print("\n" + format_metrics(metrics))
        print(f"\nmetrics: {output_dir / 'metrics.json'}")
        print(f"predictions: {output_dir / 'predictions.json'}")
        print("overlays:\n" + "\n".join(f"  {p}" for p in overlays))
    return summary


def _write_predictions(predictions: list[dict[str, Any]], path: Path) -> None:
    from pycocotools import mask as mask_utils

    from trp.metrics import paired_box_iou

    rows = []
    for p in predictions:
        iou = float(paired_box_iou(torch.tensor([p["box"]]), torch.tensor([p["target_box"]]))[0])
        m, t = p["mask"], p["target_mask"]
        union = int((m | t).sum())
        rle = mask_utils.encode(m.numpy().astype("uint8", order="F").copy(order="F"))
        rows.append(
            {
                "index": p["index"],
                "expression": p["expression"],
                "unit": p["unit"],
                "answer": p["answer"],
                "parsed": p["parsed"],
                "found": p["found"],
                "box": [round(v, 2) for v in p["box"]],
                "score": p["score"],
                "target_box": [round(v, 2) for v in p["target_box"]],
                "box_iou": round(iou, 4),
                "mask_iou": round(int((m & t).sum()) / union, 4) if union else 0.0,
                "mask_rle": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _build_model(cfg: DictConfig, tokenizer: Any) -> TRPForConditionalGeneration:
    """The recipe's model: the reference VLM over ``tokenizer``, or (None) the local HF VLM."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if tokenizer is None:
        return build_hf_model(model_cfg)
    return build_model(model_cfg, tokenizer=tokenizer)


def _probe_seconds_per_step(
    cfg: DictConfig, steps: int, tokenizer: Any, train_set, held_out
) -> float:
    """Seconds per step of a short single-process fit of ``cfg`` whose model is thrown away
    (``recipe.size: auto`` times the wide model with it)."""
    OmegaConf.update(
        cfg,
        "trainer",
        {
            "strategy": "auto",
            "devices": 1,
            "num_nodes": 1,
            "max_steps": steps,
            "max_time": None,
            "enable_progress_bar": False,
        },
        merge=True,
    )
    model = _build_model(cfg, tokenizer)
    timer = StepTimer()
    trainer = _trainer(cfg, Path(cfg.output_dir), logger=False)
    trainer.callbacks.append(timer)
    trainer.fit(_module(cfg, model), datamodule=_datamodule(cfg, model, train_set, held_out))
    return timer.seconds_per_step


def _choose_size(cfg: DictConfig, probe) -> dict[str, Any]:
    """Resolve ``recipe.size`` (:func:`trp.recipes.model_size.choose_size`) and print it."""
    budget_s = _budget_seconds(cfg)
    if _is_hf(cfg) and cfg.recipe.get("size") is not None:
        if cfg.recipe.size != "auto":
            raise ConfigError(
                f"recipe.size={cfg.recipe.size} sizes the reference VLM; a Hugging Face VLM "
                "has its checkpoint's sizes: set recipe.size=null (data.batch_size sets the batch)"
            )
        cfg.recipe.size = None  # auto: nothing to choose, the checkpoint fixes the sizes
    size = choose_size(cfg, probe, budget_s=budget_s)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"model size: {size['size']} ({size['reason']})", flush=True)
    return size


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the recipe of ``cfg``, save the checkpoint, evaluate on the held-out set.

    Returns the summary written to ``metrics.json`` (``metrics``, :func:`training_facts`,
    ``checkpoint``, ``overlays``).
    """
    if cfg.recipe.name == "shapes_unified":
        from trp.recipes.unified import train_unified

        if cfg.recipe.get("size") is not None:
            raise ConfigError(
                f"recipe.size={cfg.recipe.size} sizes the referring recipes' model; "
                "recipe=shapes_unified takes model.* and data.batch_size as given: "
                "set recipe.size=null"
            )

        return train_unified(cfg)
    _setup(cfg)
    output_dir = Path(cfg.output_dir)
    image_size = int(cfg.model.image_size)
    train_set, held_out = build_datasets(cfg.data, image_size=image_size)
    tokenizer = None
    if not _is_hf(cfg):
        tok_cfg = cfg.model.tokenizer
        texts = None if tok_cfg.dir else corpus(train_set, num_samples=int(tok_cfg.corpus_samples))
        tokenizer = build_tokenizer(tok_cfg, texts)

    def probe(probe_cfg: DictConfig, steps: int) -> float:
        return _probe_seconds_per_step(probe_cfg, steps, tokenizer, train_set, held_out)

    size = _choose_size(cfg, probe)
    # The model starts from the seed whether or not a probe drew batches and weights before it.
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = _build_model(cfg, tokenizer)
    module = _module(cfg, model)
    datamodule = _datamodule(cfg, model, train_set, held_out)
    trainer = _trainer(cfg, output_dir, budget=True)
    start = time.monotonic()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.monotonic() - start
    checkpoint = output_dir / "checkpoint"
    if trainer.is_global_zero:
        save_checkpoint(model, cfg, checkpoint)
    extra = {
        "recipe": cfg.recipe.name,
        "size": size,
        **training_facts(trainer, seconds),
        "checkpoint": str(checkpoint),
    }
    if trainer.is_global_zero:
        print(f"\ntrained {extra['steps']} steps in {seconds:.0f} s; checkpoint: {checkpoint}")
    return _run_eval(trainer, module, datamodule, output_dir, extra)


def evaluate(checkpoint: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a :func:`save_checkpoint` directory on the held-out set of ``cfg.data``.

    The model, tokenizer and recipe come from the checkpoint; data, eval and trainer settings
    from ``cfg``. Writes ``metrics.json`` and ``predictions.json`` to ``cfg.output_dir``.
    """
    model, saved = load_checkpoint(checkpoint)
    # The saved sections replace the packaged defaults (plain nodes: the checkpoint's model
    # may be of another schema than the evaluate config's default).
    plain: Any = OmegaConf.to_container(cfg, resolve=True)
    plain["model"] = OmegaConf.to_container(saved.model, resolve=True)
    plain["recipe"] = OmegaConf.to_container(saved.recipe, resolve=True)
    unified = saved.recipe.name == "shapes_unified"
    if unified:
        # A unified model is evaluated on its own task mixture and target kinds; with
        # data=shapes_unified the held-out size and seed come from the evaluate config.
        data = OmegaConf.to_container(saved.data, resolve=True)
        asked = plain["data"]
        if asked["name"] not in ("shapes", saved.data.name):
            raise ValueError(
                f"a {saved.recipe.name} checkpoint is evaluated on its own scenes "
                f"(data={saved.data.name}), not data={asked['name']}"
            )
        # data.eval_size / eval_seed (keys of both schemas) are honoured; the checkpoint's
        # mixture and target kinds are kept.
        data.update({k: asked[k] for k in ("eval_size", "eval_seed")})
        if "eval_per_task" in asked:  # data=shapes_unified: its value, else the checkpoint's
            data["eval_per_task"] = asked["eval_per_task"]
        elif "eval_per_task" not in data:  # a checkpoint from before the key: as it was
            data["eval_per_task"] = False
        plain["data"] = data
    cfg = OmegaConf.create(plain)
    if unified:
        from trp.recipes.unified import evaluate_unified

        return evaluate_unified(model, cfg, checkpoint)
    _setup(cfg)
    _, held_out = build_datasets(cfg.data, image_size=int(cfg.model.image_size), with_train=False)
    module = _module(cfg, model)
    datamodule = _datamodule(cfg, model, held_out, held_out)
    trainer = _trainer(cfg, Path(cfg.output_dir), logger=False)
    return _run_eval(
        trainer,
        module,
        datamodule,
        Path(cfg.output_dir),
        {"recipe": cfg.recipe.name, "checkpoint": str(checkpoint)},
    )
