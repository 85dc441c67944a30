"""Checkpoints as a directory: ``model.safetensors`` + ``config.yaml`` + ``tokenizer/``.

The weights are the model's state dict in safetensors (tied tensors, e.g. the LM's input
embedding and LM head, are stored once by ``safetensors.torch.save_model``); the config is the
resolved recipe config the model is rebuilt from; the tokenizer is saved with
``save_pretrained``. :func:`load_checkpoint` rebuilds the model and loads the weights strictly,
so a reloaded model gives identical predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trp.models.build import build_vlm
from trp.models.tokenizer import load_tokenizer, save_tokenizer
from trp.models.vlm import ReferringVLM

__all__ = ["CHECKPOINT_FILES", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILES: tuple[str, ...] = ("model.safetensors", "config.yaml", "tokenizer")


def save_checkpoint(model: ReferringVLM, cfg: DictConfig | dict, directory: str | Path) -> Path:
    """Write ``model`` (weights + tokenizer) and ``cfg`` to ``directory``; returns it."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    conf = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    OmegaConf.save(conf, directory / "config.yaml", resolve=True)
    save_tokenizer(model.tokenizer, directory / "tokenizer")
    return directory


def load_checkpoint(directory: str | Path) -> tuple[ReferringVLM, DictConfig]:
    """Rebuild the model of a :func:`save_checkpoint` directory; returns ``(model, cfg)``.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).exists()]
    if not directory.is_dir() or missing:
        raise FileNotFoundError(
            f"not a trp checkpoint: {directory} (missing {missing or 'the directory'}; "
            f"expected {list(CHECKPOINT_FILES)})"
        )
    cfg: Any = OmegaConf.load(directory / "config.yaml")
    tokenizer = load_tokenizer(directory / "tokenizer")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # The safetensors file holds every weight: do not read the initial vision weights again.
    model_cfg["vision"]["weights"] = None
    model = build_vlm(model_cfg, tokenizer=tokenizer)
    load_model(model, str(directory / "model.safetensors"), strict=True)
    model.eval()
    return model, cfg
