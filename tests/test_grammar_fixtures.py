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
