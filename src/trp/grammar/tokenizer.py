"""Hugging Face tokenizer integration: special tokens, embeddings, token text, conversations.

VRTs are not in the text vocabulary: a VRT id is ``vrt_base + local_patch_index`` with
``vrt_base = len(tokenizer)`` once the TRP tokens are added (:mod:`trp.vrt` binds those rows per
image). Everything here takes ``vrt_base`` and treats ids at or above it as VRTs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trp.grammar.parse import parse_ids
from trp.grammar.tokens import TRP_SPECIAL_TOKENS, VPT, VRT_PATTERN
from trp.grammar.types import ParseResult

__all__ = [
    "ChatTemplate",
    "EncodedConversation",
    "TokenVocab",
    "add_trp_tokens",
    "encode_conversation",
    "encode_text",
    "num_new_embeddings",
    "resize_embeddings",
    "trp_token_ids",
    "vrt_base_of",
]


def _check_tokenizer(tokenizer: Any) -> None:
    for attr in ("convert_tokens_to_ids", "encode", "get_vocab", "add_tokens"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")


def add_trp_tokens(tokenizer: Any, *, extra: Sequence[str] = ()) -> int:
    """Add the TRP special tokens (and ``extra`` ones) to ``tokenizer``; returns how many were new.

    Idempotent: a second call adds nothing and returns 0. The tokens are added unsplittable and
    unnormalised but not "special", so ``decode(..., skip_special_tokens=True)`` keeps them.
    """
    from tokenizers import AddedToken

    _check_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    wanted = [t for t in dict.fromkeys((*TRP_SPECIAL_TOKENS, *extra)) if t not in vocab]
    for t in wanted:
        if not isinstance(t, str) or not t:
            raise ValueError(f"tokens must be non-empty strings, got {t!r}")
    if not wanted:
        return 0
    return int(
        tokenizer.add_tokens(
            [
                AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False)
                for t in wanted
            ]
        )
    )


def trp_token_ids(tokenizer: Any) -> dict[str, int]:
    """Id of each TRP special token; raises when :func:`add_trp_tokens` was not called."""
    _check_tokenizer(tokenizer)
    # Token by token, not get_vocab(): that builds the whole vocabulary's dict (~0.6 ms at a
    # 1k vocabulary, tens of ms at 150k) and collation asks once per conversation.
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TRP_SPECIAL_TOKENS}
    missing = [
        t
        for t, i in ids.items()
        if not isinstance(i, int) or i < 0 or tokenizer.convert_ids_to_tokens(i) != t
    ]
    if missing:
        raise ValueError(f"tokenizer lacks TRP tokens {missing}; call add_trp_tokens(tokenizer)")
    return {t: int(i) for t, i in ids.items()}


def vrt_base_of(tokenizer: Any) -> int:
    """``len(tokenizer)`` once the TRP tokens are in it: the id of VRT ``<|VRT_0|>``."""
    trp_token_ids(tokenizer)
    return len(tokenizer)


def _embedding_rows(model: Any) -> int:
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    return int(model.get_input_embeddings().weight.shape[0])


def num_new_embeddings(model: Any, tokenizer: Any) -> int:
    """Rows the model's input embedding lacks for ``tokenizer`` (0 when it already has them).

    VRT rows are not counted: they are bound per image by :mod:`trp.vrt`.
    """
    _check_tokenizer(tokenizer)
    return max(0, len(tokenizer) - _embedding_rows(model))


def resize_embeddings(model: Any, tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> int:
    """Grow the model's embeddings (and tied/untied LM head) to cover ``tokenizer``.

    New rows start at the mean of the old ones (transformers' ``mean_resizing``), so the added
    tokens do not disturb the model before training. Returns the number of rows added.
    """
    before = _embedding_rows(model)
    if num_new_embeddings(model, tokenizer):
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    return _embedding_rows(model) - before


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-unicode table, used by every byte-level BPE.
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


class TokenVocab:
    """Text of every token id, for parsing token ids.

    ``pieces[i]`` is token ``i``'s text as latin-1 (one character per byte, so a token may end
    inside a UTF-8 sequence); ids ``>= vrt_base`` render as ``<|VRT_k|>``. Build it with
    :meth:`from_tokenizer`, or directly from pieces for tests and custom vocabularies.
    """

    def __init__(self, *, pieces: Sequence[str], vrt_base: int) -> None:
        pieces = list(pieces)
        if not all(isinstance(p, str) for p in pieces):
            raise TypeError("pieces must be strings")
        if any(not p.isascii() and max(map(ord, p)) > 255 for p in pieces):
            raise ValueError("pieces must be latin-1 strings (one character per byte)")
        if isinstance(vrt_base, bool) or not isinstance(vrt_base, int) or vrt_base < len(pieces):
            raise ValueError(
                f"vrt_base must be an int >= len(pieces)={len(pieces)}, got {vrt_base!r}"
            )
        self.pieces = pieces
        self.vrt_base = vrt_base
        self._vrt: list[str] = []

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        vrt_base: int | None = None,
        ignore_ids: Iterable[int] | None = None,
    ) -> TokenVocab:
        """Build from a Hugging Face tokenizer that has the TRP tokens.

        ``vrt_base`` defaults to ``len(tokenizer)``. ``ignore_ids`` render as empty text
        (default: the bos/eos/pad ids), so generated sequences parse with their end and padding.
        Byte-level BPE tokenizers (GPT-2, Qwen2, Llama 3) are read exactly from their byte
        table; others through ``decode`` of each token after an anchor token.
        """
        specials = trp_token_ids(tokenizer)
        n = len(tokenizer)
        base = n if vrt_base is None else vrt_base
        if ignore_ids is None:
            ignore_ids = [
                i
                for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                if i is not None
            ]
        ignore = {int(i) for i in ignore_ids}
        if ignore & set(specials.values()):
            raise ValueError("ignore_ids must not contain TRP tokens")
        added = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
        if _is_byte_level(tokenizer):
            table = _byte_decoder()
            raw = tokenizer.convert_ids_to_tokens(list(range(n)))
            pieces = []
            for i, tok in enumerate(raw):
                if i in added or tok is None:
                    pieces.append((added.get(i) or "").encode("utf-8").decode("latin-1"))
                else:
                    pieces.append(bytes(table[c] for c in tok).decode("latin-1"))
        else:
            anchor = next(i for i in range(n) if i not in added)
            head = tokenizer.decode(
                [anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            pieces = []
            for i in range(n):
                if i in added:
                    pieces.append(added[i].encode("utf-8").decode("latin-1"))
                    continue
                both = tokenizer.decode(
                    [anchor, i], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                pieces.append(both[len(head) :].encode("utf-8").decode("latin-1"))
        for i in ignore:
            if 0 <= i < n:
                pieces[i] = ""
        return cls(pieces=pieces, vrt_base=base)

    def piece(self, token_id: int) -> str:
        """Latin-1 text of one token id (``<|VRT_k|>`` for VRTs)."""
        if token_id >= self.vrt_base:
            k = token_id - self.vrt_base
            cache = self._vrt
            while len(cache) <= k:
                cache.append(f"<|VRT_{len(cache)}|>")
            return cache[k]
        if token_id < 0 or token_id >= len(self.pieces):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {len(self.pieces)}) and below "
                f"vrt_base={self.vrt_base}"
            )
        return self.pieces[token_id]

    def render(self, ids: Iterable[int]) -> tuple[str, list[int]]:
        """Latin-1 text of ``ids`` and the start offset of each token in it."""
        pieces = self.pieces
        n = len(pieces)
        parts = []
        starts = []
        at = 0
        for i in ids:
            p = pieces[i] if 0 <= i < n else self.piece(int(i))
            starts.append(at)
            at += len(p)
            parts.append(p)
        return "".join(parts), starts

    def decode(self, ids: Iterable[int]) -> str:
        """The answer text of ``ids`` with VRTs as ``<|VRT_k|>`` (invalid UTF-8 replaced)."""
        text, _ = self.render(ids)
        return text.encode("latin-1").decode("utf-8", "replace")


# Per tokenizer: (vocabulary size, text) -> ids of the text pieces encode_text has seen. The
# conversations of a data set repeat the same few pieces (turn markers, expressions, the
# grammar's tags), and a Hugging Face ``encode`` call costs ~0.2 ms of Python: without the
# cache, tokenising took ~20 ms of each 16-sample training batch. The size is part of the key,
# so tokens added later (add_trp_tokens) never meet a stale entry.
_PIECE_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], tuple[int, ...]]] = (
    weakref.WeakKeyDictionary()
)
_PIECE_CACHE_SIZE = 65536


def _encode_piece(tokenizer: Any, text: str) -> tuple[int, ...]:
    """``tokenizer.encode(text, add_special_tokens=False)``, memoised per tokenizer."""
    try:
        cache = _PIECE_CACHE.setdefault(tokenizer, {})
    except TypeError:  # neither hashable nor weakly referable: no cache
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    key = (len(tokenizer), text)
    ids = cache.get(key)
    if ids is None:
        if len(cache) >= _PIECE_CACHE_SIZE:
            cache.clear()
        ids = cache[key] = tuple(tokenizer.encode(text, add_special_tokens=False))
    return ids


def encode_text(tokenizer: Any, text: str, *, vrt_base: int | None = None) -> list[int]:
    """Token ids of ``text``, with each ``<|VRT_k|>`` becoming ``vrt_base + k``.

    ``vrt_base`` defaults to ``len(tokenizer)``. No bos/eos are added.
    """
    _check_tokenizer(tokenizer)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    base = len(tokenizer) if vrt_base is None else vrt_base
    if base < len(tokenizer):
        raise ValueError(f"vrt_base={base} overlaps the text vocabulary ({len(tokenizer)} ids)")
    ids: list[int] = []
    pos = 0
    for m in VRT_PATTERN.finditer(text):
        if m.start() > pos:
            ids.extend(_encode_piece(tokenizer, text[pos : m.start()]))
        ids.append(base + int(m.group(1)))
        pos = m.end()
    if pos < len(text):
        ids.extend(_encode_piece(tokenizer, text[pos:]))
    return ids


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """How turns are laid out: ``turn_start`` (``{role}`` is filled in), content, ``turn_end``.

    The default is ChatML (Qwen). The answer's ``turn_end`` is supervised so the model learns to
    stop; the host tokenizer should map it to its end-of-turn token.
    """

    turn_start: str = "<|im_start|>{role}\n"
    turn_end: str = "<|im_end|>\n"
    roles: tuple[str, ...] = ("system", "user", "assistant")
    answer_role: str = "assistant"


@dataclass(frozen=True)
class EncodedConversation:
    """One encoded conversation.

    ``input_ids``/``labels``/``attention_mask`` are ``Tensor[L]`` (labels are -100 outside the
    answers); ``answers`` holds the parse of each answer turn with ``positions`` in sequence
    coordinates; ``vpt_positions`` (``Tensor[P]``) are the ``[VPT]`` placeholder positions.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    answers: tuple[ParseResult, ...]
    vpt_positions: torch.Tensor


def _shift(result: ParseResult, by: int) -> ParseResult:
    assert result.positions is not None
    positions = tuple(
        tuple(tuple(p + by for p in target) for target in triplet) for triplet in result.positions
    )
    return ParseResult(
        triplets=result.triplets,
        texts=result.texts,
        task=result.task,
        diagnostics=result.diagnostics,
        spans=result.spans,
        offsets=result.offsets,
        positions=positions,
    )


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    vocab: TokenVocab | None = None,
    template: ChatTemplate | None = None,
    strict: bool = True,
) -> EncodedConversation:
    """Encode ``[{"role": …, "content": …}, …]`` for training.

    Labels are the input ids on each answer turn (content and ``turn_end``) and -100 elsewhere.
    Answer contents are parsed (``strict``: canonical grammar required) so every target token's
    position is known. ``vocab`` (default: built from the tokenizer) fixes ``vrt_base``.
    """
    _check_tokenizer(tokenizer)
    template = template or ChatTemplate()
    vocab = vocab or TokenVocab.from_tokenizer(tokenizer)
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty sequence of {'role', 'content'} mappings")
    vpt_id = trp_token_ids(tokenizer)[VPT]
    ids: list[int] = []
    labels: list[int] = []
    answers = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not {"role", "content"} <= set(msg):
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in template.roles:
            raise ValueError(f"message {i}: role {role!r} not in {template.roles}")
        if not isinstance(content, str):
            raise TypeError(f"message {i}: content must be a str")
        head = encode_text(
            tokenizer, template.turn_start.format(role=role), vrt_base=vocab.vrt_base
        )
        body = encode_text(tokenizer, content, vrt_base=vocab.vrt_base)
        tail = encode_text(tokenizer, template.turn_end, vrt_base=vocab.vrt_base)
        ids += head
        labels += [-100] * len(head)
        start = len(ids)
        ids += body + tail
        if role == template.answer_role:
            labels += body + tail
            answers.append(_shift(parse_ids(body, vocab=vocab, strict=strict), start))
        else:
            labels += [-100] * (len(body) + len(tail))
    if not answers:
        raise ValueError(f"the conversation has no {template.answer_role!r} turn")
    input_ids = torch.tensor(ids, dtype=torch.long)
    return EncodedConversation(
        input_ids=input_ids,
        labels=torch.tensor(labels, dtype=torch.long),
        attention_mask=torch.ones_like(input_ids),
        answers=tuple(answers),
        vpt_positions=(input_ids == vpt_id).nonzero().flatten(),
    )
