"""An offline byte-level BPE tokenizer trained on a text corpus, with the TRP tokens added.

Models in trp are built without network access, so the tokenizer of the reference VLM is
trained from the task's own text (expressions, prompts, answers) with Hugging Face
``tokenizers``: byte-level BPE never produces ``<unk>``, so text outside the corpus (RefCOCO
expressions) still encodes, only less compactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from trp.grammar import IMAGE, add_trp_tokens

__all__ = ["CHAT_TOKENS", "load_tokenizer", "save_tokenizer", "train_tokenizer"]

# End of text (padding), and ChatML's turn delimiters (ChatTemplate's default).
CHAT_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and add the chat, ``<image>`` and TRP tokens.

    Args:
        corpus: training texts (at least one non-empty string).
        vocab_size: target BPE vocabulary (>= 300: the 256 byte symbols plus merges).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token="<|im_end|>"`` and
        ``pad_token="<|endoftext|>"``; VRT ids start at ``len(tokenizer)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300, got {vocab_size!r}")
    texts = [t for t in corpus if isinstance(t, str) and t]
    if not texts:
        raise ValueError("the tokenizer corpus is empty")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    add_trp_tokens(tokenizer, extra=(IMAGE,))
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write ``tokenizer`` to ``directory`` (created) with ``save_pretrained``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (or any local HF tokenizer directory).

    The TRP and ``<image>`` tokens are added when missing, so a host model's own tokenizer
    works too.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    add_trp_tokens(tokenizer, extra=(IMAGE,))
    return tokenizer
