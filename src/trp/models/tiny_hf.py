"""Tiny random Hugging Face VLMs saved like a user's local checkpoint (nothing downloaded).

``save_tiny_vlm(family, directory)`` writes a model and its processor with ``save_pretrained``:
what ``model=hf_vlm model.pretrained_dir=DIR`` loads. Used by the tests, the example and the
benchmarks; the weights are random, the code paths are the real ones.

Families: ``qwen2_5_vl`` (Qwen2.5-VL), ``qwen2_vl`` (Qwen2-VL), ``llava`` (CLIP tower + Qwen2
LM).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_FAMILIES", "save_tiny_vlm", "tiny_tokenizer"]

TINY_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen2_vl", "llava")

_QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def tiny_tokenizer(special: tuple[str, ...]):
    """A byte-level BPE trained offline on a few TRP answers, with the family's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("red", "green", "blue", "circle", "square", "triangle", "star", "left", "right")
    corpus = [
        f"<Phrase>the {a} {b}</Phrase>(<Unit>box</Unit>[0]<REF>). Locate the {a} {b}."
        for a in words
        for b in words
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.add_tokens(list(special), special_tokens=True)
    return hf


def _text_config(tokenizer, hidden: int) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_tiny_vlm(family: str, directory: str | Path, *, hidden: int = 64, seed: int = 0) -> Path:
    """Build a tiny random VLM of ``family`` and save it with its processor to
    ``directory`` (``save_pretrained``); returns the directory."""
    import torch

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; known: {list(TINY_FAMILIES)}")
    directory = Path(directory)
    torch.manual_seed(seed)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        model, processor = _qwen(family, hidden)
    else:
        model, processor = _llava(hidden)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _qwen(family: str, hidden: int):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = tiny_tokenizer(_QWEN_TOKENS)
    start, end, image, video = tok.convert_tokens_to_ids(list(_QWEN_TOKENS))
    text = {
        **_text_config(tok, hidden),
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }
    common = {
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        "image_token_id": image,
        "video_token_id": video,
        "tie_word_embeddings": True,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if family == "qwen2_5_vl":
        vision = {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        }
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        )
    else:
        vision = {
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        )
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_QWEN_TEMPLATE,
    )
    return model, processor


def _llava(hidden: int):
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tiny_tokenizer(("<image>",))
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 32,
    }
    text = {"model_type": "qwen2", **_text_config(tok, hidden)}
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor
