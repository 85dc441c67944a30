"""Builders of the reference VLM's parts from plain config mappings (Hydra / OmegaConf or dicts).

Everything is built offline: the vision encoder and the LM from configs with random init, or
from local weights; the tokenizer trained on the task's corpus or loaded from a local directory.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trp.grammar import resize_embeddings
from trp.heads import BoxHead, MaskHead
from trp.models.fine_stem import ConvStem, StemDownsample
from trp.models.light_heads import LightBoxHead, LightMaskHead
from trp.models.tokenizer import load_tokenizer, train_tokenizer
from trp.models.vlm import ReferringVLM

__all__ = [
    "HEAD_IMPLS",
    "build_head",
    "build_language_model",
    "build_tokenizer",
    "build_vision_encoder",
    "build_vlm",
]


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return cfg[key] if key in cfg and cfg[key] is not None else default


def build_vision_encoder(
    cfg: Mapping[str, Any],
    *,
    image_size: int,
    patch_size: int,
    stem: ConvStem | StemDownsample | None = None,
) -> nn.Module:
    """A timm ViT without classifier: ``timm.create_model(name, pretrained=False, ...)``.

    ``cfg``: ``name`` (timm architecture), ``embed_dim``, ``depth``, ``num_heads``, optional
    ``weights`` (a local ``.safetensors`` / ``.pth`` state dict; never downloaded) and
    ``fused_attn`` (default true: scaled-dot-product attention kernels).

    With a ``stem`` (a :class:`ConvStem`, stride 4, or a :class:`StemDownsample`) the patch
    embedding is timm's ``HybridEmbed`` over it: a convolutional stem instead of one linear map
    per patch ("Early Convolutions Help Transformers See Better", Xiao et al. 2021), which
    learns shapes far sooner from scratch.
    """
    import timm

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    extra: dict[str, Any] = {}
    if stem is not None:
        if patch_size % stem.stride:
            raise ValueError(
                f"patch_size={patch_size} must be divisible by the stem stride {stem.stride}"
            )
        extra["embed_layer"] = functools.partial(_stem_embed, stem=stem)
    model = timm.create_model(
        cfg["name"],
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=int(cfg["embed_dim"]),
        depth=int(cfg["depth"]),
        num_heads=int(cfg["num_heads"]),
        num_classes=0,
        **extra,
    )
    weights = _get(cfg, "weights")
    if weights is not None:
        model.load_state_dict(_load_state_dict(weights), strict=False)
    fused = bool(_get(cfg, "fused_attn", True))
    for module in model.modules():
        # timm's attention layers choose between F.scaled_dot_product_attention and the plain
        # matmul-softmax path with this flag; on a CPU with short sequences the plain path's
        # backward is the faster one.
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def _stem_embed(
    *,
    stem: ConvStem | StemDownsample,
    img_size,
    patch_size,
    in_chans: int,
    embed_dim: int,
    **kwargs,
):
    """timm ``embed_layer`` factory: ``HybridEmbed`` over ``stem``, one token per
    ``patch_size`` pixels (a ``patch_size / stride`` convolution on the stem's map)."""
    from timm.layers import HybridEmbed, to_2tuple

    img, patch = to_2tuple(img_size), to_2tuple(patch_size)
    s = stem.stride
    return HybridEmbed(
        stem,
        img_size=img,
        patch_size=(patch[0] // s, patch[1] // s),
        feature_size=(img[0] // s, img[1] // s),
        feature_ratio=s,
        in_chans=in_chans,
        embed_dim=embed_dim,
        **kwargs,
    )


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_language_model(cfg: Mapping[str, Any], *, vocab_size: int) -> nn.Module:
    """A causal LM: ``Qwen2ForCausalLM(Qwen2Config(...))`` from ``cfg`` or ``from_pretrained``.

    ``cfg``: ``pretrained_dir`` (a local HF model directory) or ``hidden_size``,
    ``intermediate_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``max_positions``,
    ``tie_embeddings``; ``attn_implementation`` (``"sdpa"`` by default, or ``"eager"``).
    """
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    attn = str(_get(cfg, "attn_implementation", "sdpa"))
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn!r}")
    local = _get(cfg, "pretrained_dir")
    if local is not None:
        if not Path(local).is_dir():
            raise FileNotFoundError(f"language model directory not found: {local}")
        return AutoModelForCausalLM.from_pretrained(str(local), attn_implementation=attn)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} must be divisible by num_heads={heads}")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(_get(cfg, "num_kv_heads", heads)),
        max_position_embeddings=int(_get(cfg, "max_positions", 512)),
        tie_word_embeddings=bool(_get(cfg, "tie_embeddings", True)),
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config)


def build_tokenizer(cfg: Mapping[str, Any], corpus: Iterable[str] | None = None):
    """Load ``cfg.dir`` when set, else train a byte-level BPE of ``cfg.vocab_size`` on
    ``corpus``."""
    directory = _get(cfg, "dir")
    if directory is not None:
        return load_tokenizer(directory)
    if corpus is None:
        raise ValueError("tokenizer.dir is not set and no corpus was given to train one")
    return train_tokenizer(corpus, vocab_size=int(_get(cfg, "vocab_size", 1000)))


HEAD_IMPLS: dict[str, dict[str, type[nn.Module]]] = {
    "box": {"light": LightBoxHead, "deformable": BoxHead},
    "mask": {"light": LightMaskHead, "two_way": MaskHead},
}


def build_head(
    unit: str,
    cfg: Mapping[str, Any],
    *,
    in_dim: int,
    in_channels: list[int],
    fine_channels: int = 0,
) -> nn.Module:
    """The head of ``unit`` from ``cfg`` (``impl`` plus the head's keyword arguments);
    ``fine_channels`` (of the model's fine stem) goes to heads that read fine features."""
    if unit not in HEAD_IMPLS:
        raise ValueError(f"no head for unit {unit!r}; known: {sorted(HEAD_IMPLS)}")
    kwargs = dict(cfg)
    impl = kwargs.pop("impl", "light")
    if impl not in HEAD_IMPLS[unit]:
        raise ValueError(f"unknown {unit} head impl {impl!r}; known: {sorted(HEAD_IMPLS[unit])}")
    cls = HEAD_IMPLS[unit][impl]
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(
            f"model.heads.{unit}: {cls.__name__} ({impl!r}) takes no {unknown}; "
            "switching impl needs that head's own settings (e.g. model=tiny_vlm_deformable)"
        )
    if fine_channels and "fine_channels" in accepted:
        kwargs["fine_channels"] = fine_channels
    return cls(in_dim=in_dim, in_channels=in_channels, **kwargs)


def build_vlm(cfg: Mapping[str, Any], *, tokenizer) -> ReferringVLM:
    """The reference :class:`ReferringVLM` from a ``model`` config and a tokenizer.

    ``cfg``: ``image_size``, ``patch_size``, ``vision``, ``language``, ``heads`` (unit -> head
    config), ``prototype_rank``, ``prototype_zero_init``, ``vrt_query_shift``,
    ``detach_queries``, ``contextual_vrt`` and ``fine_channels`` (> 0: a :class:`ConvStem` of
    that width feeds stride-4 features to the heads that read them, and with
    ``vision.conv_stem`` also replaces the ViT's patch embedding).
    """
    image_size, patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
    fine_channels = int(_get(cfg, "fine_channels", 0))
    if fine_channels < 0:
        raise ValueError(f"fine_channels must be >= 0, got {fine_channels}")
    stem = ConvStem(fine_channels) if fine_channels else None
    conv_stem = bool(_get(cfg["vision"], "conv_stem", False))
    if conv_stem and stem is None:
        raise ValueError("vision.conv_stem needs a stem: set fine_channels > 0")
    downsample = int(_get(cfg["vision"], "stem_downsample", 0))
    if downsample < 0 or (downsample and not conv_stem):
        raise ValueError(
            f"vision.stem_downsample must be >= 0 and needs vision.conv_stem, got {downsample}"
        )
    vit_stem = StemDownsample(stem, downsample) if downsample else stem
    vision = build_vision_encoder(
        cfg["vision"],
        image_size=image_size,
        patch_size=patch_size,
        stem=vit_stem if conv_stem else None,
    )
    language = build_language_model(cfg["language"], vocab_size=len(tokenizer))
    resize_embeddings(language, tokenizer)
    width = int(language.config.hidden_size)
    vision_dim = int(cfg["vision"]["embed_dim"])
    heads = {
        unit: build_head(
            unit, head_cfg, in_dim=width, in_channels=[vision_dim], fine_channels=fine_channels
        )
        for unit, head_cfg in cfg["heads"].items()
    }
    grid = image_size // patch_size
    return ReferringVLM(
        vision=vision,
        language=language,
        tokenizer=tokenizer,
        heads=heads,
        grid=(grid, grid),
        image_size=(image_size, image_size),
        vision_dim=vision_dim,
        prototype_rank=int(_get(cfg, "prototype_rank", 64)),
        prototype_zero_init=bool(_get(cfg, "prototype_zero_init", True)),
        detach_queries=bool(_get(cfg, "detach_queries", False)),
        vrt_query_shift=int(_get(cfg, "vrt_query_shift", 1)),
        fine_stem=stem,
        contextual_vrt=bool(_get(cfg, "contextual_vrt", False)),
    )
