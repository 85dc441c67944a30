"""``encode_hf_conversations``: images + prompts (+ TRP answers) -> a batch for a Hugging Face VLM.

The host's processor applies its chat template and expands its image tokens (Qwen's dynamic
resolution, LLaVA's fixed grid); the answers are encoded by :func:`trp.grammar.encode_text`
(so ``<|VRT_k|>`` becomes ``vrt_base + k``, which no processor knows) and parsed, with target
positions made absolute in the batch's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trp.grammar import TokenVocab, encode_text, parse_ids
from trp.models.trp_model import shift_positions

__all__ = ["encode_hf_conversations", "token_grid"]


def token_grid(processor: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` grid of merged image tokens the processor makes of an image of
    ``image_size`` (H, W): what the VRTs of such an image index."""
    blank = torch.zeros(3, int(image_size[0]), int(image_size[1]), dtype=torch.uint8)
    out = processor.image_processor(images=[blank], return_tensors="pt")
    if "image_grid_thw" in out:
        merge = int(getattr(processor.image_processor, "merge_size", 1))
        _, h, w = (int(v) for v in out["image_grid_thw"][0])
        return (h // merge, w // merge)
    patch = int(getattr(processor, "patch_size", 0) or 0)
    if not patch:
        raise ValueError(f"{type(processor).__name__} names no patch_size to size its grid")
    h, w = out["pixel_values"].shape[-2:]
    return (int(h) // patch, int(w) // patch)


def encode_hf_conversations(
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    vocab: TokenVocab | None = None,
    text_first: bool = False,
) -> dict[str, Any]:
    """Encode one image and one user prompt per sample, and optionally the answers.

    Args:
        processor: the VLM's processor (``AutoProcessor``) with a ``chat_template`` and the
            TRP tokens in its tokenizer (:func:`trp.grammar.add_trp_tokens`).
        images: one image per sample (PIL, array or ``[3, H, W]`` tensor).
        prompts: the user turns.
        answers: TRP answers (training: right-padded full conversations with ``labels`` and
            ``parses``); ``None`` (generation): left-padded prompts.
        vocab: the tokenizer's :class:`TokenVocab` (default: built from it).
        text_first: the prompt before the image in the user turn (in a causal LM the image
            tokens then read the instruction); default: the image first.
    Returns:
        ``input_ids``, ``attention_mask`` [B, L]; ``pixel_values`` and ``image_inputs`` (the
        processor's other tensors: image ones such as ``image_grid_thw``, and per-token ones
        such as ``mm_token_type_ids``, padded like the ids); with answers also
        ``labels`` [B, L] (-100 outside the answers) and ``parses`` (absolute positions).
    """
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one image per prompt, got {len(images)} and {len(prompts)}")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"need one answer per prompt, got {len(answers)} and {len(prompts)}")
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat_template: save the model's processor with "
            "its template (save_pretrained) or set processor.chat_template"
        )
    tokenizer = processor.tokenizer
    vocab = vocab or TokenVocab.from_tokenizer(tokenizer)
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    rows, label_rows, parses, pixels = [], [], [], []
    extra: dict[str, list[Tensor]] = {}
    token_inputs: dict[str, list[list[int]]] = {}
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        content: list[dict[str, str]] = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content[::-1] if text_first else content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[image], return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        pixels.append(enc["pixel_values"])
        for key, value in enc.items():
            if key in ("input_ids", "attention_mask", "pixel_values") or not isinstance(
                value, Tensor
            ):
                continue
            if value.dim() == 2 and value.shape == enc["input_ids"].shape:
                # Per-token tensors (e.g. Qwen's mm_token_type_ids): padded like the ids.
                token_inputs.setdefault(key, []).append(value[0].tolist())
            else:
                extra.setdefault(key, []).append(value)
        labels = [-100] * len(prompt_ids)
        if answers is not None:
            answer = encode_text(tokenizer, answers[i], vrt_base=vocab.vrt_base)
            parses.append(
                shift_positions(parse_ids(answer, vocab=vocab, strict=True), len(prompt_ids))
            )
            prompt_ids = prompt_ids + answer + [eos]
            labels = labels + answer + [eos]
        rows.append(prompt_ids)
        label_rows.append(labels)
    length = max(len(r) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad, dtype=torch.long)
    attention = torch.zeros(b, length, dtype=torch.long)
    labels_t = torch.full((b, length), -100, dtype=torch.long)
    left = answers is None  # generation needs left padding
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        cols = slice(length - len(row), length) if left else slice(0, len(row))
        input_ids[i, cols] = torch.tensor(row)
        attention[i, cols] = 1
        labels_t[i, cols] = torch.tensor(lab)
    image_inputs = {k: torch.cat(v, dim=0) for k, v in extra.items()}
    for key, per_row in token_inputs.items():
        padded = torch.zeros(b, length, dtype=torch.long)
        for i, values in enumerate(per_row):
            start = length - len(rows[i]) if left else 0
            padded[i, start : start + len(values)] = torch.tensor(values)
        image_inputs[key] = padded
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": torch.cat(pixels, dim=0),
        "image_inputs": image_inputs,
    }
    if answers is not None:
        out["labels"] = labels_t
        out["parses"] = parses
    return out
