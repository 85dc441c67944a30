"""The schema of the recipe configs: Hydra structured configs (dataclasses) in one place.

Every packaged YAML config extends a dataclass registered here in Hydra's ``ConfigStore``
(``defaults: [<name>_schema, _self_]``, Hydra's "static schema with many configs" pattern), so
the dataclass fixes the keys, their types and their defaults, and ``__post_init__`` checks the
values. Hydra rejects a wrong type or an override of an unknown key while it composes;
:func:`validate` (called by :func:`trp.recipes.compose` and before any run) rejects the rest:
keys added with ``+`` (Hydra adds them even to structured nodes), bad values, head settings the
head class does not take. Every error is a :class:`ConfigError` naming the full key.
:func:`complete` gives Python callers that pass partial mappings (``ReferringModule``,
``build_model``) the same defaults and checks, so no code path keeps defaults of its own.

Adding a key: add the field (type, default = the YAML's value, a one-line comment) to its
dataclass, its check to that class's ``__post_init__``, and the key with the same value and
comment to the YAML file(s) of that group (``tests/test_recipes_schema.py`` fails when a YAML
file and its schema disagree). A new option of a group with keys of its own (``model/foo.yaml``)
subclasses the group's base dataclass (:class:`ModelConfig`, :class:`DataConfig`,
:class:`TrainerConfig`) and registers it with :func:`register` before composing; a ``recipe``
option (``@package _global_``) may set any existing key; keys of its own go into a subclass
of :class:`RecipeConfig` registered with ``register("recipe_schema", name, cls)`` and named in
the recipe's defaults list (``- /recipe_schema@recipe: name``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from trp.data.refcoco import REFCOCO_SPLITS
from trp.models.fine_stem import STEM_KINDS
from trp.models.reference_vlm import IMAGE_ATTENTION
from trp.recipes.conversation import TARGET_KINDS
from trp.recipes.precision import PRECISIONS

# recipe.size (trp.recipes.model_size): auto or one of the sizes.
MODEL_SIZES: tuple[str, ...] = ("auto", "narrow", "wide")

__all__ = [
    "ACCELERATORS",
    "BOX_REGION_TARGETS",
    "PROCESS_GROUP_BACKENDS",
    "STRATEGIES",
    "TORCH_DTYPES",
    "CocoDataConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedTrainerConfig",
    "EvalConfig",
    "EvaluateConfig",
    "FreezeConfig",
    "HFVLMConfig",
    "LanguageConfig",
    "LoRAConfig",
    "LoggerConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RecipeConfig",
    "RefCOCODataConfig",
    "ShapesDataConfig",
    "TinyVLMConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TrainerConfig",
    "VisionConfig",
    "complete",
    "register",
    "validate",
]

BOX_REGION_TARGETS: tuple[str, ...] = ("box", "mask")
ACCELERATORS: tuple[str, ...] = ("cpu", "gpu", "cuda", "mps", "auto")
PROCESS_GROUP_BACKENDS: tuple[str, ...] = ("gloo", "nccl", "mpi")
TORCH_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
ROUTES: tuple[str, ...] = ("all", "unit")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")
DEEPSPEED_STAGES: tuple[int, ...] = (1, 2, 3)


def _lightning_strategies() -> tuple[str, ...]:
    """``"auto"`` and every strategy name Lightning's registry resolves (ddp, fsdp,
    deepspeed_stage_2, ...): the names ``trainer.strategy`` may hold."""
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *sorted(StrategyRegistry.available_strategies()))


STRATEGIES: tuple[str, ...] = _lightning_strategies()


class ConfigError(ValueError):
    """A recipe config key or value is invalid (the message names the full key)."""


class _Invalid(Exception):
    """Raised by ``__post_init__``: ``message`` holds ``{at}`` where the node's path goes, so a
    check written once per dataclass names the full key wherever the node sits."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(key: str, value: Any, *, integer: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else _number(value)
    if not ok or value <= 0:
        kind = "a positive int" if integer else "a positive number"
        raise _Invalid(f"{{at}}{key} must be {kind}, got {value!r}")


def _at_least(key: str, value: Any, low: float) -> None:
    if not _number(value) or value < low:
        raise _Invalid(f"{{at}}{key} must be >= {low:g}, got {value!r}")


def _one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise _Invalid(f"{{at}}{key} must be one of {allowed}, got {value!r}")


# --------------------------------------------------------------------------- root sections
@dataclass
class OptimConfig:
    """AdamW + linear warm-up + cosine decay (``trp.recipes.module.WarmupCosine``)."""

    lr: float = 1.0e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    # Cosine decay to lr * min_lr_ratio over the run's steps (max_steps, or the count
    # trainer.fit_steps_to_time measures to fill max_time).
    min_lr_ratio: float = 0.05

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _at_least("weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _Invalid(f"{{at}}betas must be two numbers in [0, 1), got {list(self.betas)}")
        _at_least("warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _Invalid(f"{{at}}min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LossConfig:
    """Weights of the training loss terms (each >= 0; 0 turns a term off)."""

    token: float = 1.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    box_score: float = 1.0
    box_region: float = 5.0
    box_region_target: str = "mask"
    mask_ce: float = 5.0
    mask_dice: float = 5.0
    mask_points: int = 1024
    patch_class: float = 4.0
    patch_class_foreground: float = 4.0
    patch_referent: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "mask_points":
                _positive("mask_points", value, integer=True)
            elif f.name == "box_region_target":
                _one_of("box_region_target", value, BOX_REGION_TARGETS)
            elif not _number(value) or value < 0:
                raise _Invalid(f"{{at}}{f.name} must be a number >= 0, got {value!r}")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy constrained generation, then the heads."""

    batch_size: int = 50
    threads: int = 1
    max_new_tokens: int = 32
    constrained: bool = True
    prefill_phrase: bool = False
    mask_threshold: float = 0.5
    num_overlays: int = 8

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size, integer=True)
        _positive("threads", self.threads, integer=True)
        _positive("max_new_tokens", self.max_new_tokens, integer=True)
        if not 0.0 < self.mask_threshold < 1.0:
            raise _Invalid(f"{{at}}mask_threshold must lie in (0, 1), got {self.mask_threshold}")
        _at_least("num_overlays", self.num_overlays, 0)


@dataclass
class LoggerConfig:
    """Loggers written under the output directory."""

    csv: bool = True
    tensorboard: bool = False


# --------------------------------------------------------------------------- model group
# Head arguments the builder derives from the model (LM width, vision widths, fine stem).
_DERIVED: tuple[str, ...] = ("in_dim", "in_channels", "fine_channels")


def _check_heads(heads: dict[str, Any]) -> None:
    """Each head's settings against its class's signature (``trp.models.build.HEAD_IMPLS``):
    the head classes own their settings and defaults, so a new unit or impl needs no schema
    change, and a misspelt or mistyped setting still fails here, naming the key."""
    from trp.models.build import HEAD_IMPLS

    if not heads:
        raise _Invalid("{at}heads must configure at least one head (box and/or mask)")
    for unit, settings in heads.items():
        at = f"{{at}}heads.{unit}"
        if unit not in HEAD_IMPLS:
            raise _Invalid(f"{at}: no head for unit {unit!r}; known: {sorted(HEAD_IMPLS)}")
        if not isinstance(settings, dict):
            raise _Invalid(f"{at} must be a mapping of head settings, got {settings!r}")
        impl = settings.get("impl", "light")
        _one_of(f"heads.{unit}.impl", impl, tuple(sorted(HEAD_IMPLS[unit])))
        cls, preset = HEAD_IMPLS[unit][impl]
        params = inspect.signature(cls).parameters
        for key, value in settings.items():
            if key == "impl":
                continue
            if key in _DERIVED:
                raise _Invalid(f"{at}.{key} is derived from the model (the LM and vision widths)")
            if key not in params or key in preset:
                raise _Invalid(
                    f"{at}.{key}: {cls.__name__} ({impl!r}) takes no {key!r}; it takes "
                    f"{sorted(k for k in params if k not in (*preset, *_DERIVED))}"
                )
            default = params[key].default
            # The head's own default fixes the setting's type (bool before int: bool is an int).
            for kind in (bool, int, float, str):
                if isinstance(default, kind):
                    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                    if kind is float:
                        ok = _number(value)
                    if not ok:
                        raise _Invalid(
                            f"{at}.{key} must be of type {kind.__name__} (like {default!r}), "
                            f"got {value!r}"
                        )
                    break


def _light_heads() -> dict[str, Any]:
    return {
        "box": {
            "impl": "light",
            "d_model": 128,
            "n_heads": 4,
            "dim_feedforward": 256,
            "num_layers": 2,
            "reference_noise": 0.0,
            "region": True,
            "extent_scale": 4,
            "mask_dim": 32,
        },
        "mask": {
            "impl": "light",
            "d_model": 128,
            "n_heads": 4,
            "dim_feedforward": 256,
            "num_layers": 2,
            "mask_dim": 32,
        },
    }


@dataclass
class ModelConfig:
    """What every model of the ``model`` group has: the VRT modules, the query routing and
    the heads (``trp.models.TRPForConditionalGeneration``'s arguments)."""

    prototype_rank: int = 64
    prototype_zero_init: bool = False
    vrt_query_shift: int = 0
    detach_queries: bool = True
    contextual_vrt: bool = True
    route: str = "all"
    # unit -> the head's settings (impl + that head class's keyword arguments).
    heads: dict[str, Any] = field(default_factory=_light_heads)

    def __post_init__(self) -> None:
        _positive("prototype_rank", self.prototype_rank, integer=True)
        _one_of("vrt_query_shift", self.vrt_query_shift, (0, 1))
        _one_of("route", self.route, ROUTES)
        _check_heads(self.heads)


@dataclass
class VisionConfig:
    """The reference VLM's timm ViT (random init or a local state dict)."""

    name: str = "vit_tiny_patch16_224"
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 2
    weights: str | None = None
    conv_stem: bool = True
    stem_downsample: int = 0
    fused_attn: bool = False

    def __post_init__(self) -> None:
        for key in ("embed_dim", "depth", "num_heads"):
            _positive(key, getattr(self, key), integer=True)
        if self.embed_dim % self.num_heads:
            raise _Invalid(
                f"{{at}}embed_dim={self.embed_dim} must be divisible by "
                f"{{at}}num_heads={self.num_heads}"
            )
        if self.weights is not None and not Path(self.weights).is_file():
            raise _Invalid(f"{{at}}weights={self.weights}: no such file (a local state dict)")
        _at_least("stem_downsample", self.stem_downsample, 0)
        if self.stem_downsample and not self.conv_stem:
            raise _Invalid("{at}stem_downsample needs {at}conv_stem=true")


@dataclass
class LanguageConfig:
    """The reference VLM's Qwen2 LM, built from these sizes (random init)."""

    pretrained_dir: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 512
    tie_embeddings: bool = True
    attn_implementation: str = "eager"
    image_attention: str = "bidirectional"

    def __post_init__(self) -> None:
        _one_of("image_attention", self.image_attention, IMAGE_ATTENTION)
        if self.pretrained_dir is not None:
            raise _Invalid(
                "{at}pretrained_dir: the reference VLM builds its LM from the sizes; fine-tune "
                "a local Hugging Face VLM with model=hf_vlm model.pretrained_dir=DIR"
            )
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _positive(key, getattr(self, key), integer=True)
        _positive("num_kv_heads", self.num_kv_heads, integer=True)
        _positive("max_positions", self.max_positions, integer=True)
        if self.hidden_size % self.num_heads:
            raise _Invalid(
                f"{{at}}hidden_size={self.hidden_size} must be divisible by "
                f"{{at}}num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise _Invalid(
                f"{{at}}num_heads={self.num_heads} must be a multiple of "
                f"{{at}}num_kv_heads={self.num_kv_heads}"
            )
        _one_of("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class TokenizerConfig:
    """A local tokenizer directory, or a byte-level BPE trained on the recipe's corpus."""

    dir: str | None = None
    vocab_size: int = 1000
    corpus_samples: int = 2000

    def __post_init__(self) -> None:
        if self.dir is not None and not Path(self.dir).is_dir():
            raise _Invalid(f"{{at}}dir={self.dir}: no such directory (a local tokenizer)")
        _positive("vocab_size", self.vocab_size, integer=True)
        _positive("corpus_samples", self.corpus_samples, integer=True)


@dataclass
class TinyVLMConfig(ModelConfig):
    """``model=tiny_vlm``: timm ViT over a ConvStem + tiny Qwen2 LM + light heads."""

    image_size: int = 128
    patch_size: int = 16
    fine_channels: int = 32
    fine_stem: str = "patchify"
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("image_size", self.image_size, integer=True)
        _positive("patch_size", self.patch_size, integer=True)
        if self.image_size % self.patch_size:
            raise _Invalid(
                f"{{at}}image_size={self.image_size} must be divisible by "
                f"{{at}}patch_size={self.patch_size} (the ViT patch grid must be whole)"
            )
        _at_least("fine_channels", self.fine_channels, 0)
        _one_of("fine_stem", self.fine_stem, STEM_KINDS)
        if self.vision.conv_stem and not self.fine_channels:
            raise _Invalid("{at}vision.conv_stem needs a stem: set {at}fine_channels > 0")


def _deformable_heads() -> dict[str, Any]:
    return {
        "box": {
            "impl": "deformable",
            "d_model": 128,
            "n_heads": 4,
            "n_points": 4,
            "dim_feedforward": 256,
            "num_layers": 2,
        },
        "mask": {
            "impl": "two_way",
            "d_model": 128,
            "n_heads": 4,
            "num_blocks": 2,
            "mlp_dim": 256,
            "mask_dim": 32,
        },
    }


@dataclass
class TinyVLMDeformableConfig(TinyVLMConfig):
    """``model=tiny_vlm_deformable``: tiny_vlm with trp.heads' BoxHead (deformable) and
    MaskHead (two-way); no fine stem, PaDT's VRT rows and queries."""

    prototype_zero_init: bool = True
    vrt_query_shift: int = 1
    detach_queries: bool = False
    contextual_vrt: bool = False
    fine_channels: int = 0
    heads: dict[str, Any] = field(default_factory=_deformable_heads)
    vision: VisionConfig = field(
        default_factory=lambda: VisionConfig(
            embed_dim=192, num_heads=3, conv_stem=False, fused_attn=True
        )
    )
    language: LanguageConfig = field(
        default_factory=lambda: LanguageConfig(
            hidden_size=192,
            intermediate_size=768,
            num_heads=3,
            num_kv_heads=3,
            attn_implementation="sdpa",
        )
    )


@dataclass
class FreezeConfig:
    """Which parts of a Hugging Face VLM keep their pretrained weights (no gradient)."""

    vision: bool = True
    projector: bool = False
    language: bool = False


@dataclass
class LoRAConfig:
    """LoRA adapters on the LM (``peft``); VRT prototypes and heads always train fully."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # The attention projections of Qwen2/2.5/3 and Llama decoder layers.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def __post_init__(self) -> None:
        _positive("r", self.r, integer=True)
        _positive("alpha", self.alpha, integer=True)
        if not 0.0 <= self.dropout < 1.0:
            raise _Invalid(f"{{at}}dropout must lie in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise _Invalid("{at}target_modules must name at least one module when enabled")


@dataclass
class HFVLMConfig(ModelConfig):
    """``model=hf_vlm``: a local Hugging Face VLM (``save_pretrained`` directory: model and
    processor) with VRTs and heads; its heads read the VLM's (merged) patch features, so their
    ``in_channels`` is the LM width."""

    pretrained_dir: str = MISSING
    # Side of the square images the recipes' data is rendered / resized to before the host
    # processor applies its own resizing (Qwen's dynamic resolution, LLaVA's fixed grid).
    image_size: int = 448
    # PaDT's zero-initialised prototypes leave a pretrained LM undisturbed at the first step.
    prototype_zero_init: bool = True
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = False
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        directory = Path(self.pretrained_dir)
        if not directory.is_dir():
            raise _Invalid(
                f"{{at}}pretrained_dir={self.pretrained_dir}: no such directory (a local "
                "Hugging Face VLM saved with save_pretrained; nothing is downloaded)"
            )
        if not (directory / "config.json").is_file():
            raise _Invalid(
                f"{{at}}pretrained_dir={self.pretrained_dir} has no config.json "
                "(not a save_pretrained directory)"
            )
        _positive("image_size", self.image_size, integer=True)
        _one_of("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        if self.lora.enabled and self.freeze.language:
            raise _Invalid(
                "{at}lora.enabled with {at}freeze.language=true: the adapters live in the "
                "LM, freeze.language would freeze them too (peft already freezes the base)"
            )


# --------------------------------------------------------------------------- data group
@dataclass
class DataConfig:
    """What every dataset of the ``data`` group has."""

    name: str = MISSING
    eval_size: int = 500
    batch_size: int = 32
    num_workers: int = 1

    def __post_init__(self) -> None:
        _positive("eval_size", self.eval_size, integer=True)
        _positive("batch_size", self.batch_size, integer=True)
        _at_least("num_workers", self.num_workers, 0)


def _data_name(value: str, want: str) -> None:
    if value != want:
        raise _Invalid(
            f"{{at}}name must be {want!r} for this dataset's keys, got {value!r} "
            f"(choose the dataset with data={value})"
        )


@dataclass
class ShapesDataConfig(DataConfig):
    """``data=shapes``: synthetic referring scenes (``trp.data.ShapesDataset``)."""

    name: str = "shapes"
    batch_size: int = 16
    train_size: int = 1000000
    seed: int = 0
    eval_seed: int = 1
    min_shapes: int = 2
    max_shapes: int = 5
    kind_weights: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _data_name(self.name, "shapes")
        _positive("train_size", self.train_size, integer=True)
        if self.seed == self.eval_seed:
            raise _Invalid("{at}seed and {at}eval_seed must differ (held-out scenes)")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise _Invalid(
                f"{{at}}min_shapes={self.min_shapes} and {{at}}max_shapes={self.max_shapes} "
                "must satisfy 1 <= min_shapes <= max_shapes"
            )
        w = list(self.kind_weights)
        if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
            raise _Invalid(
                f"{{at}}kind_weights must be 3 weights >= 0 (attribute, position, relation) "
                f"with a positive sum, got {w}"
            )


@dataclass
class RefCOCODataConfig(DataConfig):
    """``data=refcoco``: lmms-eval RefCOCO parquet files (``trp.data.RefCOCODataset``)."""

    name: str = "refcoco"
    root: str | None = None
    train_split: str = "val"
    eval_split: str = "testA"

    def __post_init__(self) -> None:
        super().__post_init__()
        _data_name(self.name, "refcoco")
        if not self.root:
            raise _Invalid(
                "{at}root is required: the directory of lmms-eval RefCOCO parquet files "
                "(e.g. python examples/train.py recipe=refcoco_vrt data.root=/data/refcoco)"
            )
        _one_of("train_split", self.train_split, REFCOCO_SPLITS)
        _one_of("eval_split", self.eval_split, REFCOCO_SPLITS)


@dataclass
class CocoDataConfig(DataConfig):
    """``data=coco``: a COCO instances json + image directory (``trp.data.CocoDataset``)."""

    name: str = "coco"
    annotation_file: str | None = None
    image_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _data_name(self.name, "coco")
        for key in ("annotation_file", "image_dir"):
            if not getattr(self, key):
                raise _Invalid(
                    f"the coco dataset needs {{at}}{key} (a COCO instances json and its "
                    "image directory)"
                )


# --------------------------------------------------------------------------- trainer group
_MAX_TIME = re.compile(r"^\d+:\d+:\d+:\d+$")


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` settings; the budget is max_steps, or what fits in max_time."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    process_group_backend: str | None = None
    precision: str = "auto"
    max_steps: int = 4000
    max_time: str | None = "00:00:10:00"
    fit_steps_to_time: bool = True
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        _one_of("accelerator", self.accelerator, ACCELERATORS)
        _positive("devices", self.devices, integer=True)
        _positive("num_nodes", self.num_nodes, integer=True)
        _one_of("strategy", self.strategy, STRATEGIES)
        if self.process_group_backend is not None:
            _one_of("process_group_backend", self.process_group_backend, PROCESS_GROUP_BACKENDS)
        _one_of("precision", self.precision, PRECISIONS)
        _at_least("max_steps", self.max_steps, 0)
        if self.max_time is not None and not _MAX_TIME.match(self.max_time):
            raise _Invalid(f"{{at}}max_time must be 'DD:HH:MM:SS', got {self.max_time!r}")
        _positive("log_every_n_steps", self.log_every_n_steps, integer=True)
        if self.gradient_clip_val is not None:
            _positive("gradient_clip_val", self.gradient_clip_val)


@dataclass
class DeepSpeedTrainerConfig(TrainerConfig):
    """``trainer=deepspeed``: DeepSpeed ZeRO (``strategy`` = Lightning's
    ``deepspeed_stage_<zero_stage>[_offload]``; needs the ``deepspeed`` package)."""

    zero_stage: int = 2

    def __post_init__(self) -> None:
        # The stage first: a bad stage would otherwise surface as a bad interpolated strategy.
        _one_of("zero_stage", self.zero_stage, DEEPSPEED_STAGES)
        super().__post_init__()
        if not self.strategy.startswith(f"deepspeed_stage_{self.zero_stage}"):
            raise _Invalid(
                f"{{at}}strategy={self.strategy!r} disagrees with {{at}}zero_stage="
                f"{self.zero_stage} (use deepspeed_stage_{self.zero_stage}[_offload])"
            )


# --------------------------------------------------------------------------- recipe and root
@dataclass
class RecipeConfig:
    """What a recipe (``recipe=...``, a ``@package _global_`` option) names and chooses."""

    name: str = MISSING
    # vrt: answers point with runs of VRTs; ref: latent [0]<REF> slots.
    target: str = "vrt"
    num_vrt: int = 4
    # The instruction before the image tokens (the patches read the expression).
    prompt_first: bool = False
    # The reference VLM's width and batch (trp.recipes.model_size.SIZES): narrow, wide, auto
    # (wide where trainer.max_time buys it min_wide_steps steps, timed on this machine), or
    # null (the model and data sections as given).
    size: str | None = None
    min_wide_steps: int = 600

    def __post_init__(self) -> None:
        _one_of("target", self.target, TARGET_KINDS)
        _positive("num_vrt", self.num_vrt, integer=True)
        if self.size is not None:
            _one_of("size", self.size, MODEL_SIZES)
        _positive("min_wide_steps", self.min_wide_steps, integer=True)


@dataclass
class TrainConfig:
    """The root of ``train.yaml``: the groups plus the run's own sections."""

    # The model and data options extend their own schemas (a subclass of ModelConfig /
    # DataConfig each); Any lets a group hold options of different classes.
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    recipe: RecipeConfig = MISSING
    seed: int = 0
    threads: int = 2
    keep_freed_memory: bool = True
    run_name: str = "${recipe.name}-${now:%Y%m%d-%H%M%S}"
    output_root: str = "outputs"
    output_dir: str = "${output_root}/${run_name}"
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _positive("threads", self.threads, integer=True)


@dataclass
class EvaluateConfig(TrainConfig):
    """The root of ``evaluate.yaml``: the train config plus the checkpoint to evaluate."""

    checkpoint: str | None = None
    run_name: str = "eval-${now:%Y%m%d-%H%M%S}"


# --------------------------------------------------------------------------- registration
# (group, name) -> dataclass; the YAML files extend these by name.
_SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_train_schema"): TrainConfig,
    (None, "base_evaluate_schema"): EvaluateConfig,
    ("model", "tiny_vlm_schema"): TinyVLMConfig,
    ("model", "tiny_vlm_deformable_schema"): TinyVLMDeformableConfig,
    ("model", "hf_vlm_schema"): HFVLMConfig,
    ("data", "shapes_schema"): ShapesDataConfig,
    ("data", "refcoco_schema"): RefCOCODataConfig,
    ("data", "coco_schema"): CocoDataConfig,
    ("trainer", "trainer_schema"): TrainerConfig,
    ("trainer", "deepspeed_schema"): DeepSpeedTrainerConfig,
}


def register(group: str | None, name: str, node: type) -> None:
    """Register dataclass ``node`` as option ``name`` of ``group`` in Hydra's ConfigStore (a
    YAML option of that group then extends it with ``defaults: [<name>, _self_]``)."""
    if not dataclasses.is_dataclass(node):
        raise TypeError(f"schema {name!r} must be a dataclass, got {node!r}")
    _SCHEMAS[(group, name)] = node
    ConfigStore.instance().store(group=group, name=name, node=node)


for (_group, _name), _node in list(_SCHEMAS.items()):
    register(_group, _name, _node)


# --------------------------------------------------------------------------- validation
def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _check_keys(node: Any, path: str) -> None:
    """Every key of a dataclass-typed node must be one of its fields (``+key=...`` adds keys
    to structured nodes too: Hydra opens the struct flag for it)."""
    if isinstance(node, ListConfig):
        return
    if not isinstance(node, DictConfig):
        return
    cls = OmegaConf.get_type(node)
    if cls is not None and dataclasses.is_dataclass(cls):
        known = _fields(cls)
        for key in node:
            if key not in known:
                full = f"{path}.{key}" if path else str(key)
                owners = [
                    name.removesuffix("_schema")
                    for (group, name), other in _SCHEMAS.items()
                    if group == path and key in _fields(other)
                ]
                hint = f" ({key!r} is a key of {path}={', '.join(owners)})" if owners else ""
                raise ConfigError(
                    f"{full}: unknown key{hint}; {path or 'the root'} takes {sorted(known)}"
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            _check_keys(child, f"{path}.{key}" if path else str(key))


def _instantiate(node: DictConfig, path: str) -> None:
    """Run every dataclass node's ``__post_init__`` children first, so a failing check is
    reported at the deepest node that owns it, with that node's path."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _instantiate(child, f"{path}.{key}" if path else str(key))
    cls = OmegaConf.get_type(node)
    if cls is None or not dataclasses.is_dataclass(cls):
        return
    at = f"{path}." if path else ""
    try:
        OmegaConf.to_object(node)
    except _Invalid as err:
        raise ConfigError(err.message.format(at=at)) from None
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{key} is required (set {key}=...)") from None


def complete(cls: type, values: Any, path: str) -> dict[str, Any]:
    """``values`` (a mapping of some of ``cls``'s keys, e.g. what a Python caller passes to
    ``ReferringModule`` or ``build_model``) completed with the schema's defaults and validated;
    a plain dict. Mapping-typed fields (``heads``) are replaced, not merged: a caller's heads
    are the heads. Raises :class:`ConfigError` naming ``path.key``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a schema dataclass")
    given = OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else values
    if not isinstance(given, dict):
        raise ConfigError(f"{path} must be a mapping, got {type(values).__name__}")
    node = OmegaConf.structured(cls)
    known = _fields(cls)
    for key in given:
        if key not in known:
            raise ConfigError(f"{path}.{key}: unknown key; {path} takes {sorted(known)}")
    try:
        mapping_fields = {k for k in known if isinstance(node._get_node(k), DictConfig)}
        typed = {k for k in mapping_fields if OmegaConf.get_type(node._get_node(k)) is dict}
        for key in typed & set(given):
            node[key] = given[key]
        node.merge_with({k: v for k, v in given.items() if k not in typed})
    except OmegaConfBaseException as err:  # its key is relative to the node
        inner = str(getattr(err, "full_key", "") or "")
        key = f"{path}.{inner}" if inner else path
        parent = OmegaConf.select(node, inner.rpartition(".")[0]) if "." in inner else node
        cls_at = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if isinstance(err, ConfigKeyError) and cls_at and dataclasses.is_dataclass(cls_at):
            where = key.rpartition(".")[0]
            raise ConfigError(
                f"{key}: unknown key; {where} takes {sorted(_fields(cls_at))}"
            ) from None
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    _check_keys(node, path)
    _instantiate(node, path)
    return OmegaConf.to_container(node, resolve=True)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (naming the key) for unknown keys and bad values of a
    composed config; a no-op on a valid one."""
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a DictConfig, got {type(cfg).__name__}")
    _check_keys(cfg, "")
    _instantiate(cfg, "")
