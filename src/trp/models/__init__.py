"""trp.models: the one model class and the reference VLM.

:class:`TRPForConditionalGeneration` wraps a host VLM (a Hugging Face ``PreTrainedModel``) with
VRT binding, routed decoder heads and generation through the host's own ``generate``;
:class:`ReferenceVLMForConditionalGeneration` is the small reference host (timm ViT + Qwen2 LM)
the offline recipes train. Everything builds offline: models from configs (random init) or
local weights, the tokenizer trained on the task's corpus (:func:`train_tokenizer`) or loaded
from a local directory.
"""

from trp.models.build import (
    HEAD_IMPLS,
    build_head,
    build_model,
    build_model_from_saved,
    build_tokenizer,
)
from trp.models.fine_stem import STEM_KINDS, ConvStem, StemDownsample
from trp.models.hf_host import HFVLMHost
from trp.models.image_encoding import ImageEncoding
from trp.models.predict import load_image, predict, save_overlay
from trp.models.reference_vlm import (
    ReferenceVLMConfig,
    ReferenceVLMForConditionalGeneration,
    build_vision_encoder,
)
from trp.models.tokenizer import CHAT_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer
from trp.models.trp_model import (
    TRPForConditionalGeneration,
    TRPGeneration,
    TRPOutput,
    shift_positions,
)

__all__ = [
    "CHAT_TOKENS",
    "HEAD_IMPLS",
    "HFVLMHost",
    "ConvStem",
    "ImageEncoding",
    "ReferenceVLMConfig",
    "ReferenceVLMForConditionalGeneration",
    "STEM_KINDS",
    "StemDownsample",
    "TRPForConditionalGeneration",
    "TRPGeneration",
    "TRPOutput",
    "build_head",
    "build_model",
    "build_model_from_saved",
    "build_tokenizer",
    "build_vision_encoder",
    "load_image",
    "load_tokenizer",
    "predict",
    "save_overlay",
    "save_tokenizer",
    "shift_positions",
    "train_tokenizer",
]
