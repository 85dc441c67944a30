"""Builders of the reference model from plain config mappings (Hydra / OmegaConf or dicts).

Everything is built offline: the vision encoder and the LM from configs with random init, or
from local weights; the tokenizer trained on the task's corpus or loaded from a local directory.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config

from trp.heads import BoxHead, DepthHead, KeypointHead, MaskHead
from trp.models.reference_vlm import (
    ReferenceVLMConfig,
    ReferenceVLMForConditionalGeneration,
)
from trp.models.tokenizer import load_tokenizer, train_tokenizer
from trp.models.trp_model import TRPForConditionalGeneration
from trp.vrt import VRTCausalLM

__all__ = [
    "HEAD_IMPLS",
    "build_head",
    "build_model",
    "build_hf_model",
    "build_model_from_saved",
    "build_tokenizer",
]


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return cfg[key] if key in cfg and cfg[key] is not None else default


def build_tokenizer(cfg: Mapping[str, Any], corpus: Iterable[str] | None = None):
    """Load ``cfg.dir`` when set, else train a byte-level BPE of ``cfg.vocab_size`` on
    ``corpus``."""
    from trp.recipes.schema import TokenizerConfig, complete  # here: trp.recipes imports us

    cfg = complete(TokenizerConfig, cfg, "model.tokenizer")  # defaults: the recipe schema's
    directory = cfg["dir"]
    if directory is not None:
        return load_tokenizer(directory)
    if corpus is None:
        raise ValueError("tokenizer.dir is not set and no corpus was given to train one")
    return train_tokenizer(corpus, vocab_size=int(cfg["vocab_size"]))


# impl -> the trp.heads class and the decoder settings that name stands for.
HEAD_IMPLS: dict[str, dict[str, tuple[type[nn.Module], dict[str, str]]]] = {
    "box": {
        "light": (BoxHead, {"decoder": "light", "cross_attention": "dense"}),
        "deformable": (BoxHead, {"decoder": "detr", "cross_attention": "deformable"}),
    },
    "mask": {
        "light": (MaskHead, {"decoder": "light", "cross_attention": "dense"}),
        "two_way": (MaskHead, {"decoder": "two_way"}),
    },
    "keypoint": {"light": (KeypointHead, {})},
    "depth": {"light": (DepthHead, {})},
}


def build_head(
    unit: str,
    cfg: Mapping[str, Any],
    *,
    in_dim: int,
    in_channels: list[int],
    fine_channels: int = 0,
) -> nn.Module:
    """The head of ``unit`` from ``cfg`` (``impl`` plus the head's keyword arguments, which may
    override the impl's decoder settings); ``fine_channels`` (of the model's fine stem) goes to
    the light heads, which read fine features."""
    if unit not in HEAD_IMPLS:
        raise ValueError(f"no head for unit {unit!r}; known: {sorted(HEAD_IMPLS)}")
    kwargs = dict(cfg)
    impl = kwargs.pop("impl", "light")
    if impl not in HEAD_IMPLS[unit]:
        raise ValueError(f"unknown {unit} head impl {impl!r}; known: {sorted(HEAD_IMPLS[unit])}")
    cls, preset = HEAD_IMPLS[unit][impl]
    kwargs = {**preset, **kwargs}
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(
            f"model.heads.{unit}: {cls.__name__} ({impl!r}) takes no {unknown}; "
            "switching impl needs that head's own settings (e.g. model=tiny_vlm_deformable)"
        )
    if fine_channels and kwargs.get("decoder") == "light":
        kwargs["fine_channels"] = fine_channels
    return cls(in_dim=in_dim, in_channels=in_channels, **kwargs)


def build_model(cfg: Mapping[str, Any], *, tokenizer) -> TRPForConditionalGeneration:
    """The reference model of a ``model`` config: a
    :class:`ReferenceVLMForConditionalGeneration` host (timm ViT + Qwen2 LM, random init)
    wrapped in :class:`TRPForConditionalGeneration` with the configured heads.

    ``cfg``: ``image_size``, ``patch_size``, ``vision`` (timm settings and optional local
    ``weights``), ``language`` (Qwen2 sizes), ``heads`` (unit -> head config),
    ``prototype_rank``, ``prototype_zero_init``, ``vrt_query_shift``, ``detach_queries``,
    ``contextual_vrt``, ``route`` and ``fine_channels`` (> 0: a stride-4 ConvStem feeds the
    heads' pixel readouts and, with ``vision.conv_stem``, the ViT; ``fine_stem``: its form). Keys
    left out take the recipe schema's defaults (:class:`trp.recipes.schema.TinyVLMConfig`, the
    YAML's values).
    """
    from trp.recipes.schema import TinyVLMConfig, complete  # here: trp.recipes imports us

    # Also refuses language.pretrained_dir (ConfigError, a ValueError naming model=hf_vlm).
    cfg = complete(TinyVLMConfig, cfg, "model")
    language = dict(cfg["language"])
    if language.get("pretrained_dir") is not None:
        raise ValueError(
            "model.language.pretrained_dir: the reference VLM builds its LM from the sizes; "
            "fine-tune a local Hugging Face VLM with model=hf_vlm model.pretrained_dir=DIR"
        )
    hidden, heads = int(language["hidden_size"]), int(language["num_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} must be divisible by num_heads={heads}")
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(language["intermediate_size"]),
        num_hidden_layers=int(language["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(language["num_kv_heads"]),
        max_position_embeddings=int(language["max_positions"]),
        tie_word_embeddings=bool(language["tie_embeddings"]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=str(language["attn_implementation"]),
    )
    vision = {k: v for k, v in dict(cfg["vision"]).items() if k != "weights"}
    fine_channels = int(cfg["fine_channels"])
    config = ReferenceVLMConfig(
        vision=vision,
        text_config=text,
        image_size=int(cfg["image_size"]),
        patch_size=int(cfg["patch_size"]),
        fine_channels=fine_channels,
        fine_stem=str(cfg["fine_stem"]),
        image_attention=str(language["image_attention"]),
        image_token_id=int(tokenizer.convert_tokens_to_ids("<image>")),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vlm = ReferenceVLMForConditionalGeneration(config)
    weights = cfg["vision"]["weights"]
    if weights is not None:
        _load_vision_weights(vlm.vision, weights)
    return _compose(vlm, tokenizer, cfg, fine_channels=fine_channels)


def build_hf_model(cfg: Mapping[str, Any]) -> TRPForConditionalGeneration:
    """A local Hugging Face VLM (``cfg.pretrained_dir``: the model and processor as
    ``save_pretrained`` wrote them; nothing is downloaded) as a trp model.

    ``cfg``: ``pretrained_dir``, ``heads`` (unit -> head config; the heads read the VLM's merged
    patch features at the LM width), ``prototype_rank``, ``prototype_zero_init``,
    ``contextual_vrt``, ``vrt_query_shift``, ``detach_queries``, ``route``, ``freeze``
    (``vision`` / ``projector`` / ``language`` booleans), ``lora`` (``enabled``, ``r``,
    ``alpha``, ``dropout``, ``target_modules``), ``gradient_checkpointing`` and
    ``torch_dtype`` (``float32`` / ``bfloat16``).
    """
    from transformers import AutoProcessor

    from trp.grammar import add_trp_tokens, resize_embeddings
    from trp.models.hf_host import HFVLMHost

    directory = Path(str(cfg["pretrained_dir"]))
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained_dir={directory}: not a Hugging Face model directory (no config.json)"
        )
    from trp.recipes.schema import HFVLMConfig, complete  # here: trp.recipes imports us

    cfg = complete(HFVLMConfig, cfg, "model")  # keys left out: the recipe schema's defaults
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    name = str(cfg["torch_dtype"])
    if name not in dtypes:
        raise ValueError(f"model.torch_dtype must be one of {sorted(dtypes)}, got {name!r}")
    processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    tokenizer = processor.tokenizer
    add_trp_tokens(tokenizer)
    host = HFVLMHost.from_pretrained(directory, dtype=dtypes[name])
    resize_embeddings(host.model, tokenizer)
    freeze = dict(cfg["freeze"])
    host.freeze([part for part, on in freeze.items() if on])
    lora = dict(cfg["lora"])
    if lora.pop("enabled"):
        host.enable_lora(**lora)
    if bool(cfg["gradient_checkpointing"]):
        host.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    image_token = tokenizer.convert_ids_to_tokens(host.image_token_id)
    model = _compose(host, tokenizer, cfg, fine_channels=0, image_token=image_token)
    model.processor = processor
    return model


def _compose(
    vlm, tokenizer, cfg: Mapping[str, Any], *, fine_channels: int, image_token: str = "<image>"
):
    width = int(vlm.get_input_embeddings().weight.shape[1])
    heads = {
        unit: build_head(
            unit, head_cfg, in_dim=width, in_channels=[vlm.vision_dim], fine_channels=fine_channels
        )
        for unit, head_cfg in cfg["heads"].items()
    }
    return TRPForConditionalGeneration(
        vlm=vlm,
        tokenizer=tokenizer,
        heads=heads,
        # cfg is complete (build_model / build_hf_model, or a saved complete config).
        prototype_rank=int(cfg["prototype_rank"]),
        prototype_zero_init=bool(cfg["prototype_zero_init"]),
        contextual_vrt=bool(cfg["contextual_vrt"]),
        vrt_query_shift=int(cfg["vrt_query_shift"]),
        detach_queries=bool(cfg["detach_queries"]),
        route=str(cfg["route"]),
        image_token=image_token,
        config={"model": dict(cfg), "host": type(vlm).__name__},
    )


def _load_vision_weights(vision: nn.Module, path: str | Path) -> None:
    """Load a local ViT state dict strictly: missing or unexpected keys name themselves."""
    state = _load_state_dict(path)
    result = vision.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"model.vision.weights={path}: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
        )


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model_from_saved(directory: Path) -> TRPForConditionalGeneration:
    """Rebuild a :meth:`TRPForConditionalGeneration.save_pretrained` directory (strict)."""
    import json

    from safetensors.torch import load_model

    names = ("trp_config.json", "heads.safetensors", "tokenizer", "vlm")
    missing = [n for n in names if not (directory / n).exists()]
    if not directory.is_dir() or missing:
        raise FileNotFoundError(
            f"not a trp model directory: {directory} (missing {missing or 'the directory'})"
        )
    saved = json.loads((directory / "trp_config.json").read_text())
    cfg = saved["model"]
    processor = None
    if saved.get("host") == "HFVLMHost":
        from transformers import AutoProcessor

        from trp.models.hf_host import HFVLMHost

        processor = AutoProcessor.from_pretrained(
            str(directory / "tokenizer"), local_files_only=True
        )
        tokenizer = processor.tokenizer
        vrt = VRTCausalLM.from_pretrained(directory / "vlm", model_class=HFVLMHost)
        vlm = vrt.unwrap()
        extra = {"image_token": tokenizer.convert_ids_to_tokens(vlm.image_token_id)}
    elif saved.get("host") == ReferenceVLMForConditionalGeneration.__name__:
        tokenizer = load_tokenizer(directory / "tokenizer")
        vrt = VRTCausalLM.from_pretrained(
            directory / "vlm", model_class=ReferenceVLMForConditionalGeneration
        )
        vlm = vrt.unwrap()
        extra = {}
    else:
        raise ValueError(f"{directory}: unknown host model {saved.get('host')!r}")
    model = _compose(vlm, tokenizer, cfg, fine_channels=int(_get(cfg, "fine_channels", 0)), **extra)
    model.processor = processor
    model.vrt.prototypes.load_state_dict(vrt.prototypes.state_dict())
    if vrt.context is not None and model.vrt.context is not None:
        model.vrt.context.load_state_dict(vrt.context.state_dict())
    load_model(model.router, str(directory / "heads.safetensors"), strict=True)
    model.eval()
    return model
