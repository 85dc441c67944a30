"""Recipe checkpoints: the model's own ``save_pretrained`` directory plus the run's config.

:func:`save_checkpoint` writes :meth:`TRPForConditionalGeneration.save_pretrained` (host model,
VRT modules and heads in safetensors, tokenizer, ``trp_config.json``) and ``config.yaml``, the
resolved recipe config; :func:`load_checkpoint` loads the model strictly
(:meth:`TRPForConditionalGeneration.from_pretrained`), so a reloaded model in a fresh process
gives identical predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trp.models.trp_model import TRPForConditionalGeneration

__all__ = ["CHECKPOINT_FILES", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILES: tuple[str, ...] = (
    "trp_config.json",
    "heads.safetensors",
    "tokenizer",
    "vlm",
    "config.yaml",
)


def save_checkpoint(
    model: TRPForConditionalGeneration, cfg: DictConfig | dict, directory: str | Path
) -> Path:
    """Write ``model`` and the recipe ``cfg`` to ``directory``; returns it."""
    directory = Path(directory)
    model.save_pretrained(directory)
    conf = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    OmegaConf.save(conf, directory / "config.yaml", resolve=True)
    return directory


def load_checkpoint(directory: str | Path) -> tuple[TRPForConditionalGeneration, DictConfig]:
    """Load a :func:`save_checkpoint` directory; returns ``(model, cfg)``.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
    """
    directory = Path(directory)
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).exists()]
    if not directory.is_dir() or missing:
        raise FileNotFoundError(
            f"not a trp checkpoint: {directory} (missing {missing or 'the directory'}; "
            f"expected {list(CHECKPOINT_FILES)})"
        )
    cfg: Any = OmegaConf.load(directory / "config.yaml")
    model = TRPForConditionalGeneration.from_pretrained(directory)
    # A reference VLM saved before a key existed was built with the form its own config
    # records (the strided stem, causal image attention); the recipe config then says so too
    # (the schema defaults differ).
    host = getattr(model.vlm, "config", None)
    for section, key in _HOST_KEYS:
        value = getattr(host, key, None)
        node = OmegaConf.select(cfg, section)
        if value is not None and node is not None and key not in node:
            node[key] = value
    return model, cfg


# (recipe config section, key) pairs that the reference VLM's own config also records.
_HOST_KEYS = (("model", "fine_stem"), ("model.language", "image_attention"))
