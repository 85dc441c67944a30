"""trp.models: reference compositions — a tiny VLM from a timm ViT and a transformers causal LM,
answering in TRP with VRT or ``<REF>`` targets decoded by unit heads.

Everything builds offline: models from configs (random init) or local weights, the tokenizer
trained on the task's corpus (:func:`train_tokenizer`) or loaded from a local directory.
"""

from trp.models.build import (
    HEAD_IMPLS,
    build_head,
    build_language_model,
    build_tokenizer,
    build_vision_encoder,
    build_vlm,
)
from trp.models.fine_stem import ConvStem, StemDownsample
from trp.models.light_heads import LightBoxHead, LightMaskHead, MaskReadout
from trp.models.tokenizer import CHAT_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer
from trp.models.vlm import Generation, ReferringVLM, TargetQueries

__all__ = [
    "CHAT_TOKENS",
    "ConvStem",
    "StemDownsample",
    "HEAD_IMPLS",
    "Generation",
    "LightBoxHead",
    "LightMaskHead",
    "MaskReadout",
    "ReferringVLM",
    "TargetQueries",
    "build_head",
    "build_language_model",
    "build_tokenizer",
    "build_vision_encoder",
    "build_vlm",
    "load_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
]
