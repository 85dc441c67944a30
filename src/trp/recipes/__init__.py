"""trp.recipes: Lightning training / evaluation of the reference VLM, configured with Hydra.

``train(cfg)`` fits, saves a safetensors checkpoint and evaluates on held-out data;
``evaluate(checkpoint, cfg)`` evaluates a saved checkpoint; ``compose(overrides)`` builds the
config from the packaged ``trp.configs`` as ``examples/train.py`` does. See ``docs/recipes.md``.
"""

from trp.recipes.checkpoint import load_checkpoint, save_checkpoint
from trp.recipes.config import ConfigError, validate_config
from trp.recipes.conversation import PROMPTS, ReferringCollator, clean_expression
from trp.recipes.data import IndexedDataset, ReferringDataModule, build_datasets, corpus
from trp.recipes.module import ReferringModule, WarmupCosine
from trp.recipes.overlays import draw_overlay, save_overlays
from trp.recipes.run import compose, evaluate, format_metrics, parse_max_time, train

# Imported with the package: it registers data=shapes_unified's schema before any compose.
from trp.recipes.unified import UnifiedCollator, UnifiedModule, train_unified

__all__ = [
    "PROMPTS",
    "ConfigError",
    "IndexedDataset",
    "ReferringCollator",
    "ReferringDataModule",
    "ReferringModule",
    "UnifiedCollator",
    "UnifiedModule",
    "WarmupCosine",
    "build_datasets",
    "clean_expression",
    "compose",
    "corpus",
    "draw_overlay",
    "evaluate",
    "format_metrics",
    "load_checkpoint",
    "parse_max_time",
    "save_checkpoint",
    "save_overlays",
    "train",
    "train_unified",
    "validate_config",
]
