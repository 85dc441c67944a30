"""Shared builders for the grammar tests: an offline tokenizer trained on generated answers."""

from __future__ import annotations

import random
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trp.grammar import add_trp_tokens, format_detection, format_grounded_caption, format_rec

WORDS = ("person", "dog", "cat", "car", "the", "left", "red", "a", "on", "of", "is", "what")


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Generated answers and questions (every task family, both target kinds)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        patches = [[rng.randrange(64)] for _ in range(2)] if i % 2 else None
        out.append(
            format_detection(
                [(words[0], 1), (words[1], 2)], patches=patches, task_block=i % 3 == 0
            ).text
        )
        out.append(format_rec(" ".join(words), unit=rng.choice(["box", "mask"])).text)
        out.append(
            format_grounded_caption(
                f"A {words[0]} near {words[1]}.", [(2, 2 + len(words[0]), [0])]
            ).text
        )
        out.append(f"What is the {words[2]} in [VPT]? It is {rng.randrange(100)} [3]<REF>.")
    return out


def train_tokenizer(kind: str = "bpe") -> Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        # WordLevel over words, single punctuation and whitespace runs, fused back verbatim.
        from tokenizers import Regex

        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *specials])
    tok.train_from_iterator(corpus(), trainer)
    return tok


@cache
def offline_tokenizer(kind: str = "bpe") -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over a freshly trained model, with the TRP tokens."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(kind),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>" if kind != "bpe" else None,
    )
    add_trp_tokens(tok)
    return tok


# The host models' own special tokens (names as in their released tokenizers): the grammar can
# never produce them, so constrained decoding must never allow them.
QWEN2_5_VL_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_5_VL_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")


def plain_corpus() -> list[str]:
    """The corpus without tags or VRTs (host tokenizers are trained on ordinary text)."""
    import re

    return [re.sub(r"<[^<>]*>|\[VPT\]", " ", t) for t in corpus()]


@cache
def host_tokenizer(host: str) -> PreTrainedTokenizerFast:
    """An offline stand-in for Qwen2.5-VL's (byte-level BPE) or LLaVA-1.5's (SentencePiece-style
    BPE) tokenizer: a small trained model with the host's special and added tokens, then TRP's."""
    from tokenizers import AddedToken

    if host == "qwen2_5_vl":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(plain_corpus(), trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        fast.add_special_tokens(
            {
                "additional_special_tokens": [
                    t for t in QWEN2_5_VL_SPECIALS if t not in fast.all_special_tokens
                ]
            }
        )
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN2_5_VL_ADDED])
    elif host == "llava":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        )
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
        tok.train_from_iterator(plain_corpus(), trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        fast.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    else:
        raise ValueError(f"unknown host {host!r}")
    add_trp_tokens(fast)
    return fast
