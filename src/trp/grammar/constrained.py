"""Grammar-constrained decoding: ``transformers`` logits processors for ``model.generate``.

:class:`TRPLogitsProcessor` masks the scores so every generated answer parses strictly;
:class:`ForcedPrefixLogitsProcessor` emits a fixed answer prefix per sample first (Kosmos-2's
referring protocol: ``<Phrase>expression</Phrase>(<Unit>box</Unit>`` is forced, the model only
localises).

Speed comes from the grammar's structure. A handful of scanner states matter (free text, a
phrase, the literals of a triplet, a target list); in free text every token without ``<`` is
allowed and leaves the state unchanged. So per tokenizer we prepare once (:func:`prepare_tokens`,
cached in memory for as long as the tokenizer lives and on disk, see
:mod:`trp.grammar.token_cache`) the token classes — which tokens are ordinary text, which hold
``<``, which are the grammar's tags, which the host's special tokens — and a sorted index for
"tokens starting with s". Per parser state (:attr:`ScanState.key`) we then probe only the few
tokens the state can tell apart (those with ``<`` in free text, the prefixes of the expected
literal elsewhere) with the real scanner, and combine them with the class mask; the result is
cached per (state, remaining budget) as a short list of allowed or of denied ids, and as a
full-width plan over every score column (padded columns and VRTs included: the row's own patches
outside the open run). A decoding step checks that the rows continue the previous call's, reads
only the new column, feeds each row's token to its parser value and applies one plan per row
(one indexed write; through numpy views on CPU, where a torch call costs a few µs).
"""

from __future__ import annotations

import array
import bisect
import math
import os
import re
import sys
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import LogitsProcessor

from trp.grammar import token_cache
from trp.grammar import tokenizer as _tokenizer_module
from trp.grammar.errors import TRPParseError
from trp.grammar.literals import ENTRY_UNIT, VRT_PARTIAL
from trp.grammar.scanner import ScanState, initial_state
from trp.grammar.tokenizer import TokenVocab, encode_text
from trp.grammar.tokens import GRAMMAR_TAGS, IMAGE, VPT
from trp.grammar.units import resolve_units

__all__ = [
    "ForcedPrefixLogitsProcessor",
    "TRPLogitsProcessor",
    "TokenTable",
    "prepare_tokens",
    "vocab_of",
]

_GRAMMAR_TAG = re.compile(r"<(?:/?(?:Task|Phrase|Unit)>|REF>)")
_NEG = float("-inf")
_MAX_STATES = 20_000
CacheDir = str | os.PathLike[str] | bool | None


# ------------------------------------------------------------------------------------ tokens
class TokenTable:
    """Token classes of one vocabulary (built once per tokenizer by :func:`prepare_tokens`).

    ``ordinary[i]`` (``Tensor[V] bool``): token ``i`` is plain text the grammar may produce — not a
    grammar tag, not end-of-sequence, not empty, not a host special/added token (image, video,
    vision and chat tokens: ``<|image_pad|>``, ``<|im_start|>``, ``<image>`` …), not ``[VPT]``.
    ``free[i]``: ordinary without ``<`` (allowed and state-preserving in free text and phrases);
    ``name_free[i]``: ``free`` without a newline or a piece of ``' Unit: '`` (the same in a task
    line's class name). ``angle`` / ``name_special`` list the ordinary tokens those classes leave
    out, which a state probes one by one.
    """

    def __init__(
        self,
        vocab: TokenVocab,
        *,
        eos: Iterable[int],
        added: Iterable[int] = (),
        banned: Iterable[int] = (),
    ) -> None:
        pieces = vocab.pieces
        eos = tuple(sorted(set(eos)))
        tag_ids: dict[str, list[int]] = {t: [] for t in GRAMMAR_TAGS}
        never = set(added) | set(banned) | set(eos)
        for i, p in enumerate(pieces):
            if p in tag_ids:
                tag_ids[p].append(i)
        tags = {i for ids in tag_ids.values() for i in ids}
        never |= tags
        ordinary = []
        angle, name_special = [], []
        unit_heads = tuple(ENTRY_UNIT[:k] for k in range(1, len(ENTRY_UNIT)))
        for i, p in enumerate(pieces):
            ok = bool(p) and i not in never and p not in (VPT, IMAGE)
            ordinary.append(ok)
            if not ok:
                continue
            if "<" in p:
                angle.append(i)
            elif "\n" in p or ENTRY_UNIT in p or p.endswith(unit_heads):
                name_special.append(i)
        banned_ids = [i for i, ok in enumerate(ordinary) if not ok and i not in tags]
        # Prefix index over ordinary pieces: "tokens starting with s" is one bisect.
        order = sorted((p, i) for i, p in enumerate(pieces) if ordinary[i])
        self._setup(
            pieces,
            vocab.vrt_base,
            eos,
            {t: tuple(ids) for t, ids in tag_ids.items()},
            torch.tensor(ordinary, dtype=torch.bool),
            angle,
            name_special,
            banned_ids,
            [i for _, i in order],
        )

    def _setup(
        self,
        pieces: list[str],
        vrt_base: int,
        eos: tuple[int, ...],
        tag_ids: dict[str, tuple[int, ...]],
        ordinary: torch.Tensor,
        angle: list[int],
        name_special: list[int],
        banned: list[int],
        sorted_ids: list[int],
    ) -> None:
        # The pieces, not the vocabulary object: the cache is keyed weakly by that object.
        self.pieces = pieces
        self.vrt_base = vrt_base
        self.size = len(pieces)
        self.eos = eos
        self.tag_ids = tag_ids
        self.tags = tuple(i for ids in tag_ids.values() for i in ids)
        self.ordinary = ordinary
        self.angle = tuple(angle)
        self.name_special = tuple(name_special)
        self.free = ordinary.clone()
        self.free[list(angle)] = False
        self.name_free = self.free.clone()
        self.name_free[list(name_special)] = False
        self.banned = tuple(banned)
        self._sorted_ids = sorted_ids
        self._sorted = [pieces[i] for i in sorted_ids]
        # Tables of each grammar configuration (units, target kinds), filled lazily.
        self.grammars: dict[tuple[object, ...], _StateTables] = {}
        self._reps: dict[int, list[int]] = {}
        self.costs: dict[str, int] = {}

    # ------------------------------------------------------------------ disk cache
    def _arrays(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What :meth:`_from_arrays` needs, as tensors and json fields."""

        def ids(x: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(x), dtype=torch.long)

        tensors = {
            "ordinary": self.ordinary,
            "angle": ids(self.angle),
            "name_special": ids(self.name_special),
            "banned": ids(self.banned),
            "sorted_ids": ids(self._sorted_ids),
        }
        fields = {
            "size": self.size,
            "vrt_base": self.vrt_base,
            "eos": list(self.eos),
            "tag_ids": {t: list(v) for t, v in self.tag_ids.items()},
        }
        return tensors, fields

    @classmethod
    def _from_arrays(
        cls, pieces: list[str], tensors: dict[str, torch.Tensor], fields: dict[str, Any]
    ) -> TokenTable:
        if fields["size"] != len(pieces) or tensors["ordinary"].shape != (len(pieces),):
            raise ValueError("the cached table does not fit the vocabulary")
        self = cls.__new__(cls)
        self._setup(
            pieces,
            int(fields["vrt_base"]),
            tuple(int(i) for i in fields["eos"]),
            {t: tuple(int(i) for i in v) for t, v in fields["tag_ids"].items()},
            tensors["ordinary"].bool(),
            tensors["angle"].tolist(),
            tensors["name_special"].tolist(),
            tensors["banned"].tolist(),
            tensors["sorted_ids"].tolist(),
        )
        return self

    def starting_with(self, s: str) -> list[int]:
        """Ordinary token ids whose piece starts with ``s`` (non-empty)."""
        lo = bisect.bisect_left(self._sorted, s)
        hi = bisect.bisect_left(self._sorted, s[:-1] + chr(ord(s[-1]) + 1))
        return self._sorted_ids[lo:hi]

    def equal_to(self, s: str) -> list[int]:
        """Ordinary token ids whose piece is exactly ``s``."""
        lo = bisect.bisect_left(self._sorted, s)
        return self._sorted_ids[lo : bisect.bisect_right(self._sorted, s, lo)]

    def representatives(self, cls: torch.Tensor) -> list[int]:
        """A few token ids of a class (``free`` or ``name_free``), to stand for all of it."""
        key = id(cls)
        reps = self._reps.get(key)
        if reps is None:
            reps = self._reps[key] = cls.nonzero()[:64].flatten().tolist()
        return reps

    def default_of(self, text: str | None) -> torch.Tensor | None:
        """The state-preserving class of a kind of free text (None: no free text)."""
        if text in ("body", "phrase"):
            return self.free
        if text == "name":
            return self.name_free
        return None


_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple[object, ...], TokenTable]] = (
    weakref.WeakKeyDictionary()
)
_VOCABS: weakref.WeakKeyDictionary[Any, tuple[int, TokenVocab]] = weakref.WeakKeyDictionary()


def vocab_of(tokenizer: Any, *, cache_dir: CacheDir = None) -> TokenVocab:
    """``TokenVocab.from_tokenizer(tokenizer)``, cached with the tokenizer object and on disk.

    Building the piece table reads every token (~0.5 s at 150k): once per tokenizer object
    (redone when tokens were added since), and once per tokenizer on disk (``cache_dir``, see
    :mod:`trp.grammar.token_cache`; keyed by a digest of the tokenizer's serialized model, added
    tokens, length and bos/eos/pad ids).
    """
    cached = _VOCABS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    root = token_cache.cache_root(cache_dir)
    fp = token_cache.tokenizer_fingerprint(tokenizer) if root is not None else None
    if fp is not None:
        # How the texts are read is part of the key: a change to it invalidates old entries.
        fp = token_cache.digest(fp, _code_digest("vocab"))
    vocab = None
    if fp is not None:
        hit = token_cache.load_entry(root, "vocab", fp)
        if hit is not None:
            try:
                vocab = _vocab_from_arrays(*hit)
            except Exception as err:  # a bad entry is rebuilt, never fatal
                _warn_rebuild("vocab", err)
    if vocab is None:
        vocab = TokenVocab.from_tokenizer(tokenizer)
        if fp is not None:
            token_cache.save_entry(root, "vocab", fp, *_vocab_arrays(vocab))
    _VOCABS[tokenizer] = (len(tokenizer), vocab)
    return vocab


def _vocab_arrays(vocab: TokenVocab) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data = "".join(vocab.pieces).encode("latin-1")
    lengths = torch.tensor([len(p) for p in vocab.pieces], dtype=torch.long)
    tensors = {"bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8), "lengths": lengths}
    if not data:
        tensors["bytes"] = torch.zeros(0, dtype=torch.uint8)
    return tensors, {"vrt_base": vocab.vrt_base, "size": len(vocab.pieces)}


def _vocab_from_arrays(tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> TokenVocab:
    text = tensors["bytes"].numpy().tobytes().decode("latin-1")
    lengths = tensors["lengths"].tolist()
    if len(lengths) != fields["size"] or sum(lengths) != len(text):
        raise ValueError("the cached pieces do not add up")
    pieces = []
    at = 0
    for k in lengths:
        pieces.append(text[at : at + k])
        at += k
    return TokenVocab(pieces=pieces, vrt_base=int(fields["vrt_base"]))


_CODE: dict[str, str] = {}


def _code_digest(kind: str) -> str:
    """A digest of the code that computes the ``kind`` entries (once per process)."""
    d = _CODE.get(kind)
    if d is None:
        if kind == "vocab":
            helpers = ("_byte_decoder", "_is_byte_level")
            code = [TokenVocab.from_tokenizer, _vocab_from_arrays]
            code += [getattr(_tokenizer_module, n, None) for n in helpers]
        else:
            code = [TokenTable.__init__, TokenTable._setup, TokenTable._from_arrays]
        d = _CODE[kind] = token_cache.code_digest(*(c for c in code if c is not None))
    return d


def _warn_rebuild(kind: str, err: Exception) -> None:
    warnings.warn(
        f"trp: ignoring a bad {kind} entry of the token cache ({type(err).__name__}: {err}); "
        "rebuilding it",
        RuntimeWarning,
        stacklevel=3,
    )


def _added_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's added tokens (the host's special, image and chat tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [int(i) for i in decoder]


def prepare_tokens(
    tokenizer: Any,
    *,
    eos_token_id: int | Sequence[int],
    vocab: TokenVocab | None = None,
    banned_ids: Iterable[int] = (),
    cache_dir: CacheDir = None,
) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer`` (built once, then cached in memory and on disk).

    Every added token of the tokenizer except the TRP grammar tags is never allowed (nor are
    ``banned_ids``); ``eos_token_id`` only where the answer is complete. The memory cache is
    keyed by the tokenizer object (or ``vocab`` when given) and dies with it; the per-state
    tables the processor computes live in the returned object, so later ``generate`` calls reuse
    them. The disk cache (``cache_dir``: default ``$TRP_CACHE_DIR`` or ``~/.cache/trp``;
    ``False`` or ``TRP_CACHE_DIR=""``: off) is keyed by a digest of the token texts, the added,
    end and banned ids and the table format, so a later process loads the table instead of
    reading every token (see :mod:`trp.grammar.token_cache`).
    """
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    banned = tuple(sorted({int(i) for i in banned_ids}))
    owner = vocab if vocab is not None else tokenizer
    vocab = vocab if vocab is not None else vocab_of(tokenizer, cache_dir=cache_dir)
    added = tuple(i for i in _added_ids(tokenizer) if i < len(vocab.pieces))
    key = (len(vocab.pieces), vocab.vrt_base, eos, added, banned)
    per_owner = _TABLES.setdefault(owner, {})
    table = per_owner.get(key)
    if table is None:
        table = per_owner[key] = _load_or_build(vocab, eos, added, banned, cache_dir)
    return table


def _load_or_build(
    vocab: TokenVocab,
    eos: tuple[int, ...],
    added: tuple[int, ...],
    banned: tuple[int, ...],
    cache_dir: CacheDir,
) -> TokenTable:
    root = token_cache.cache_root(cache_dir)
    if root is None:
        return TokenTable(vocab, eos=eos, added=added, banned=banned)
    lengths = array.array("q", map(len, vocab.pieces)).tobytes()
    pieces = token_cache.digest(lengths, "".join(vocab.pieces).encode("latin-1"))
    # What the classes are computed from: the texts, the ids, and the grammar's own tokens.
    key = token_cache.digest(
        token_cache.FORMAT,
        "table",
        pieces,
        vocab.vrt_base,
        tuple(sorted(set(eos))),
        tuple(sorted(set(added))),
        banned,
        GRAMMAR_TAGS,
        ENTRY_UNIT,
        VPT,
        IMAGE,
        _code_digest("table"),
    )
    hit = token_cache.load_entry(root, "table", key)
    if hit is not None:
        try:
            return TokenTable._from_arrays(vocab.pieces, *hit)
        except Exception as err:  # a bad entry is rebuilt, never fatal
            _warn_rebuild("table", err)
    table = TokenTable(vocab, eos=eos, added=added, banned=banned)
    token_cache.save_entry(root, "table", key, *table._arrays())
    return table


# ------------------------------------------------------------------------------------ states
@dataclass
class _RowMask:
    """What one state allows at one budget: a short list of allowed or of denied text ids."""

    deny: bool
    ids: torch.Tensor  # LongTensor[k]: denied (deny) or allowed (not deny) text-vocabulary ids
    vrt: bool  # may a VRT come (the row's own patches outside the open run)
    # Full-width plans of this mask for rows that may not point at a VRT, per score layout.
    plans: dict[tuple[int, int, int], _Plan] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.deny and not self.vrt and self.ids.numel() == 0


class _Plan:
    """What one row may produce, over all columns of the scores (text, padded columns and
    VRTs): the sorted ids to set to -inf (``deny``) or the only ids to keep. One
    ``index_fill_`` / ``index_copy_`` applies it."""

    __slots__ = ("deny", "ids", "ids_np", "on_device")

    def __init__(self, deny: bool, ids: torch.Tensor) -> None:
        self.deny = deny
        self.ids = ids
        self.ids_np = ids.numpy()  # a view: numpy indexing on CPU
        self.on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        return not self.deny and self.ids.numel() == 0

    def ids_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.ids
        t = self.on_device.get(device)
        if t is None:
            t = self.on_device[device] = self.ids.to(device)
        return t


def _plan_of(
    rm: _RowMask, n: int, base: int, num_vrt: int, width: int, patches: np.ndarray | None
) -> _Plan:
    """The full-width plan of ``rm`` over ``width`` score columns: text ids ``[0, n)``, padded
    columns ``[n, base)`` and ``[base + num_vrt, width)`` (never allowed), VRTs
    ``[base, base + num_vrt)`` of which ``patches`` (``bool[num_vrt]``; None: none) are
    allowed. Built with numpy: a new open run needs a new plan within the step."""
    text = rm.ids.numpy()
    if rm.deny:
        vrt_denied = (
            np.arange(base, base + num_vrt) if patches is None else np.flatnonzero(~patches) + base
        )
        parts = [text, np.arange(n, base), vrt_denied, np.arange(base + num_vrt, width)]
        return _Plan(True, torch.from_numpy(np.concatenate(parts)))
    if patches is None:
        return _Plan(False, rm.ids)
    return _Plan(False, torch.from_numpy(np.concatenate([text, np.flatnonzero(patches) + base])))


class _StateEntry:
    """Per-state table: the class mask that applies (with the cost of finishing after one of
    its tokens), the probed exceptions with their costs (-1: refused), the VRT cost."""

    __slots__ = (
        "accepting",
        "default",
        "default_cost",
        "exc_cost",
        "exc_ids",
        "masks",
        "max_cost",
        "vrt_cost",
    )

    def __init__(
        self,
        default: torch.Tensor | None,
        default_cost: int,
        exc_ids: list[int],
        exc_cost: list[int],
        vrt_cost: int,
        accepting: bool,
    ) -> None:
        self.default = default
        self.default_cost = default_cost
        self.exc_ids = torch.tensor(exc_ids, dtype=torch.long)
        self.exc_cost = torch.tensor(exc_cost, dtype=torch.long)
        self.vrt_cost = vrt_cost
        self.accepting = accepting
        self.masks: dict[int, _RowMask] = {}
        exc = max(exc_cost, default=-1)
        self.max_cost = max(default_cost, vrt_cost, exc)

    def mask(self, budget: float, table: TokenTable) -> _RowMask:
        """The row mask when ``budget`` tokens remain (this one included)."""
        b = self.max_cost + 1 if budget > self.max_cost else int(budget)
        rm = self.masks.get(b)
        if rm is None:
            rm = self.masks[b] = self._build(b, table)
        return rm

    def _build(self, b: int, table: TokenTable) -> _RowMask:
        n = table.size
        if self.default is not None and 0 <= self.default_cost <= b - 1:
            allowed = self.default.clone()
        else:
            allowed = torch.zeros(n, dtype=torch.bool)
        if len(self.exc_ids):
            allowed[self.exc_ids] = False
            ok = (self.exc_cost >= 0) & (self.exc_cost <= b - 1)
            allowed[self.exc_ids[ok]] = True
        if self.accepting:
            allowed[list(table.eos)] = True
        vrt = 0 <= self.vrt_cost <= b - 1
        count = int(allowed.sum())
        if count > n // 2:
            return _RowMask(True, (~allowed).nonzero().flatten(), vrt)
        return _RowMask(False, allowed.nonzero().flatten(), vrt)


class _StateTables:
    """The per-state tables of one grammar configuration, over one :class:`TokenTable`."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table
        self.entries: dict[tuple[object, ...], _StateEntry] = {}
        self.completions: dict[tuple[object, ...], str] = {}

    def entry(self, state: ScanState, tokenizer: Any) -> _StateEntry:
        key = state.key
        e = self.entries.get(key)
        if e is None:
            if len(self.entries) >= _MAX_STATES:
                # Task-line names and planned phrases make states without bound: start over
                # rather than grow (the common states come back within a call).
                self.entries.clear()
                self.completions.clear()
            e = self.entries[key] = self._compute(state, tokenizer)
        return e

    def completion(self, state: ScanState) -> str:
        key = state.key
        c = self.completions.get(key)
        if c is None:
            c = self.completions[key] = state.completion(0)
        return c

    def cost(self, text: str, tokenizer: Any) -> int:
        costs = self.table.costs
        c = costs.get(text)
        if c is None:
            c = costs[text] = len(encode_text(tokenizer, text, vrt_base=self.table.vrt_base))
        return c

    def probe(self, state: ScanState, piece: str, *, ordinary: bool, tokenizer: Any) -> int:
        """Tokens needed to finish after ``piece`` (-1 when ``piece`` is not allowed)."""
        pend = state.pending
        if ordinary and _GRAMMAR_TAG.search(pend + piece):
            # Tags are emitted as their own tokens, never spelled out of text pieces, so every
            # target has exactly one token to read a query from.
            return -1
        try:
            after = state.feed(piece)
        except TRPParseError:
            return -1
        pend = after.pending
        if "<" in pend:
            follow = after.follow()
            # Nor is a VRT spelled out of text pieces: in a target list the pending text must
            # be the start of a literal the completion can finish.
            if follow.text is None and not any(c.startswith(pend) for c in follow.literals):
                return -1
        try:
            comp = self.completion(after)
        except (TRPParseError, RuntimeError):
            return -1  # no way to finish is known from here: do not go there
        if ordinary and "<" in pend:
            # Nor may a text piece start a tag that only text pieces could finish.
            m = _GRAMMAR_TAG.search(pend + comp)
            if m is not None and m.start() < len(pend):
                return -1
        return self.cost(comp, tokenizer)

    def _candidates(self, state: ScanState) -> tuple[torch.Tensor | None, set[int]]:
        table = self.table
        f = state.follow()
        cands: set[int] = set(table.tags)
        default = table.default_of(f.text)
        p = f.pending
        if f.text in ("body", "phrase", "name"):
            cands.update(table.angle)
            stops: tuple[str, ...] = GRAMMAR_TAGS
            if f.text == "name":
                cands.update(table.name_special)
                stops = (*stops, ENTRY_UNIT)
            if p:
                # Tokens that complete (or continue) the pending partial tag behave differently
                # from the class: probe them too.
                for s in stops:
                    if s.startswith(p) and len(s) > len(p):
                        rest = s[len(p) :]
                        cands.update(table.starting_with(rest))
                        for k in range(1, len(rest)):
                            cands.update(table.equal_to(rest[:k]))
                if VRT_PARTIAL.fullmatch(p):
                    for ch in "0123456789|>":
                        cands.update(table.starting_with(ch))
        elif f.text == "count":
            for ch in "0123456789\n":
                cands.update(table.starting_with(ch))
        for lit in f.literals:
            if not lit.startswith(p):
                continue
            rest = lit[len(p) :]
            m = _GRAMMAR_TAG.search(rest)
            head = rest if m is None else rest[: m.start()]
            for k in range(1, len(head) + 1):
                cands.update(table.equal_to(head[:k]))
            if m is None and rest:
                # A text literal may be followed by more text in one token (")." or "\nThe").
                cands.update(table.starting_with(rest))
        return default, cands

    def _compute(self, state: ScanState, tokenizer: Any) -> _StateEntry:
        table = self.table
        pieces = table.pieces
        tags = set(table.tags)
        default, cands = self._candidates(state)
        ids = sorted(cands)
        costs = [
            self.probe(state, pieces[i], ordinary=i not in tags, tokenizer=tokenizer) for i in ids
        ]
        default_cost = -1
        if default is not None:
            # Every token of the class leaves the same kind of state; one stands for all.
            rep = next((i for i in table.representatives(default) if i not in cands), None)
            if rep is None:
                rest = default.clone()
                rest[ids] = False
                nz = rest.nonzero()
                rep = int(nz[0, 0]) if len(nz) else None
            if rep is not None:
                default_cost = self.probe(state, pieces[rep], ordinary=True, tokenizer=tokenizer)
                if default_cost >= 0 and state.follow().text == "name":
                    # A class name is spelled once more in its triplet: a longer name may cost a
                    # token more there (the forced completion is the safety net beyond that).
                    default_cost += 1
        vrt_cost = -1
        f = state.follow()
        if f.vrt:
            fresh = max(f.run, default=-1) + 1
            vrt_cost = self.probe(state, f"<|VRT_{fresh}|>", ordinary=False, tokenizer=tokenizer)
        return _StateEntry(default, default_cost, ids, costs, vrt_cost, f.accepting)


# ------------------------------------------------------------------------------------ rows
class _Row(NamedTuple):
    """One generation row: its parser value (None once it ended) and tokens still forced."""

    state: ScanState | None
    forced: tuple[int, ...] = ()


_FINISHED = _Row(None)


class TRPLogitsProcessor(LogitsProcessor):
    """Mask logits so generated answers always parse in strict mode.

    Each batch row runs a strict parser over its generated tokens; a token is allowed when the
    answer stays a valid prefix. Free text is free except that it holds no VRTs and no stray or
    spelled-out tags (tags are their own tokens); ``<Unit>`` names are limited to ``units``; VRT
    ids (``vocab.vrt_base + k``) to the row's own patches (``vrt_mask``), without repeats within
    a run; the host tokenizer's own added tokens (image, video, vision, chat, ``[VPT]`` …) are
    never allowed; end-of-sequence only where the answer is complete.

    With ``max_new_tokens`` a token is allowed only if the shortest way to complete the answer
    after it still fits, so generation that stops on the length limit parses too.

    Works under every ``generate`` mode (greedy, sampling, beams, ``num_return_sequences``, left
    padding): rows are matched to their parser by their generated tokens, and rows map to
    samples as ``row // (rows // B)``. Create one processor per ``generate`` call; the
    per-tokenizer preparation (:func:`prepare_tokens`) and the per-state tables are cached across
    calls, so that is cheap after the first.

    Args:
        tokenizer: the Hugging Face tokenizer (with TRP tokens), used to price completions.
        eos_token_id: id(s) that end a sequence.
        vrt_mask: ``Tensor[B, num_vrt]`` bool, patches each sample may point at (``None``: no
            VRTs).
        vocab: token texts (default: built from ``tokenizer``, cached); fixes ``vrt_base``.
        units: allowed units (default: the registry).
        max_new_tokens: the ``generate`` budget (None: no length guarantee).
        allow_ref / allow_vrt: which target kinds may be generated.
        banned_ids: more token ids never to allow (the tokenizer's added tokens already are).
        inplace: mask ``scores`` in place instead of a copy (saves a copy of the scores per
            step, ~1 ms at batch 16 x 150k; do not use it with ``output_logits=True``, whose raw
            logits ``generate`` passes in as ``scores``).
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        eos_token_id: int | Sequence[int],
        vrt_mask: torch.Tensor | None = None,
        vocab: TokenVocab | None = None,
        units: Iterable[str] | None = None,
        max_new_tokens: int | None = None,
        allow_ref: bool = True,
        allow_vrt: bool = True,
        banned_ids: Iterable[int] = (),
        inplace: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.inplace = bool(inplace)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        vocab = vocab or vocab_of(tokenizer)
        if not eos or not all(isinstance(e, int) and 0 <= e < len(vocab.pieces) for e in eos):
            raise ValueError(f"eos_token_id must be text-vocabulary id(s), got {eos_token_id!r}")
        self.vocab = vocab
        self.eos = eos
        self._eos_set = frozenset(eos)
        self._pieces = vocab.pieces
        if vrt_mask is not None:
            if not isinstance(vrt_mask, torch.Tensor) or vrt_mask.dim() != 2:
                raise ValueError("vrt_mask must be a Tensor[B, num_vrt]")
            vrt_mask = vrt_mask.bool().cpu()
        self.vrt_mask = vrt_mask
        self.units = resolve_units(units)
        if max_new_tokens is not None and (
            not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        if not (allow_ref or allow_vrt):
            raise ValueError("at least one of allow_ref / allow_vrt must be True")
        if not allow_ref and (vrt_mask is None or not bool(vrt_mask.any(dim=1).all())):
            raise ValueError(
                "with allow_ref=False every sample needs at least one patch in vrt_mask"
            )
        self.allow_ref = allow_ref
        self.allow_vrt = allow_vrt
        self.table = prepare_tokens(tokenizer, eos_token_id=eos, vocab=vocab, banned_ids=banned_ids)
        grammar_key = (self.units, allow_ref)
        tables = self.table.grammars.get(grammar_key)
        if tables is None:
            tables = self.table.grammars[grammar_key] = _StateTables(self.table)
        self.tables = tables
        self._initial = {
            has_vrt: initial_state(
                strict=True,
                units=self.units,
                latin1=True,
                allow_ref=allow_ref,
                allow_vrt=has_vrt,
            )
            for has_vrt in (False, True)
        }
        self._sample_vrt = (
            [] if vrt_mask is None else [allow_vrt and bool(r.any()) for r in vrt_mask]
        )
        self._num_vrt = 0 if vrt_mask is None else vrt_mask.shape[1]
        self._vrt_np = None if vrt_mask is None else vrt_mask.numpy()
        self._prompt_len: int | None = None
        # The previous call: its input_ids, the rows' parser values and (once a step could not
        # follow the rows one to one, e.g. beams reordered them) their generated tokens.
        self._prev: torch.Tensor | None = None
        self._prev_rows: list[_Row] = []
        self._prev_keys: list[tuple[bool, tuple[int, ...]]] | None = None
        self._prev_np: Any = None  # a numpy view of ``_prev`` (CPU)
        # Plans of rows that may point at a VRT, per (mask, sample, open run, width).
        self._vrt_plans: dict[tuple[int, int, tuple[int, ...], int], tuple[_RowMask, _Plan]] = {}
        self._forced_plans: dict[int, _Plan] = {}
        self._checked: tuple[int, int] | None = None
        # (buffer, its numpy view, its storage's users while only ours)
        self._spare: list[tuple[torch.Tensor, Any, int]] = []

    # ------------------------------------------------------------------ warm-up
    def warm(self, answers: Iterable[str]) -> int:
        """Compute the tables of every state these answers pass through (one-time preparation,
        kept across calls); returns how many states are cached now."""
        for has_vrt, state in self._initial.items():
            for text in answers:
                ids = encode_text(self.tokenizer, text, vrt_base=self.vocab.vrt_base)
                s = state
                try:
                    for i in ids:
                        self.tables.entry(s, self.tokenizer)
                        s = s.feed(self.vocab.piece(i))
                    self.tables.entry(s, self.tokenizer)
                except TRPParseError:
                    if has_vrt or "<|VRT_" not in text:
                        raise
        return len(self.tables.entries)

    # ------------------------------------------------------------------ rows
    def _has_vrt(self, sample: int) -> bool:
        return bool(self._sample_vrt) and self._sample_vrt[sample]

    def _advance(self, row: _Row, token: int) -> _Row:
        state, forced = row
        if state is None:
            return row
        if token in self._eos_set:
            return _FINISHED
        if forced:
            forced = forced[1:] if forced[0] == token else ()
        pieces = self._pieces
        piece = pieces[token] if 0 <= token < len(pieces) else self.vocab.piece(token)
        try:
            state = state.feed(piece)
        except TRPParseError as err:
            raise RuntimeError(
                f"generated token {token} broke the grammar ({err}); is another processor "
                "overriding TRPLogitsProcessor?"
            ) from err
        return _Row(state, forced)

    def _resolve(self, input_ids: torch.Tensor, per_sample: int) -> list[_Row]:
        """Each row's parser value. The common step appends one token to every row of the
        previous call, in the same order: checked with one comparison of the history, then only
        the new column is read. Otherwise (beams reordered the rows, a first call) rows are
        matched to the previous ones by their generated tokens, or replayed."""
        rows, length = input_ids.shape
        prev = self._prev
        if (
            prev is not None
            and prev.shape[0] == rows
            and prev.shape[1] == length - 1
            and prev.device == input_ids.device
            # A buffer written in place (a view of one storage each step) may have changed
            # under ``prev``: compare only distinct tensors.
            and prev.untyped_storage().data_ptr() != input_ids.untyped_storage().data_ptr()
        ):
            last = None
            now_np = None
            if self._prev_np is not None:
                # numpy (CPU): a few µs less per call than the torch ops, and faster to compare.
                now_np = input_ids.numpy()
                if now_np[:, :-1].tobytes() == self._prev_np.tobytes():
                    last = now_np[:, -1].tolist()
            elif torch.equal(input_ids[:, :-1], prev):
                last = input_ids[:, -1].tolist()
            if last is not None:
                advance = self._advance
                now = [advance(row, t) for row, t in zip(self._prev_rows, last)]
                # The rows' tokens are not kept (that would copy the history each step): a
                # later step that cannot follow the rows one to one replays them once.
                self._prev, self._prev_keys, self._prev_np = input_ids, None, now_np
                return now
        generated = input_ids[:, self._prompt_len :].tolist()
        keys = [(self._has_vrt(r // per_sample), tuple(g)) for r, g in enumerate(generated)]
        parents: dict[tuple[bool, tuple[int, ...]], _Row] = {}
        if prev is not None and self._prev_keys is not None and prev.shape[1] == length - 1:
            parents = dict(zip(self._prev_keys, self._prev_rows))
        seen: dict[tuple[bool, tuple[int, ...]], _Row] = {}
        now = []
        for key in keys:
            row = seen.get(key)
            if row is None:
                has_vrt, gen = key
                parent = parents.get((has_vrt, gen[:-1])) if gen else None
                if parent is not None:
                    row = self._advance(parent, gen[-1])
                else:
                    row = _Row(self._initial[has_vrt])
                    for t in gen:
                        row = self._advance(row, t)
                seen[key] = row
            now.append(row)
        self._keep(input_ids, keys)
        return now

    def _keep(
        self, input_ids: torch.Tensor, keys: list[tuple[bool, tuple[int, ...]]] | None
    ) -> None:
        self._prev, self._prev_keys = input_ids, keys
        self._prev_np = input_ids.numpy() if input_ids.is_cpu else None

    def _check(self, rows: int, width: int) -> int:
        """Validate the shapes (once per layout); returns the rows per sample."""
        base = self.vocab.vrt_base
        if width < base + self._num_vrt:
            raise ValueError(f"scores have {width} columns, VRTs need {base + self._num_vrt}")
        per_sample = 1
        if self.vrt_mask is not None:
            if rows % self.vrt_mask.shape[0]:
                raise ValueError(f"{rows} rows do not divide into {self.vrt_mask.shape[0]} samples")
            per_sample = rows // self.vrt_mask.shape[0]
        self._checked = (rows, width)
        self._per_sample = per_sample
        return per_sample

    def _plan(self, rm: _RowMask, sample: int, state: ScanState, width: int) -> _Plan:
        """The full-width plan of a row: ``rm`` for the text, the row's own patches outside the
        open run for the VRTs (when ``rm`` allows one), nothing for the padded columns."""
        n, base, num_vrt = self.table.size, self.vocab.vrt_base, self._num_vrt
        if not (rm.vrt and num_vrt and self._has_vrt(sample)):
            layout = (width, base, num_vrt)
            plan = rm.plans.get(layout)
            if plan is None:
                plan = rm.plans[layout] = _plan_of(rm, n, base, num_vrt, width, None)
            return plan
        run = state.triplet.run
        key = (id(rm), sample, run, width)
        hit = self._vrt_plans.get(key)
        if hit is not None and hit[0] is rm:
            return hit[1]
        assert self._vrt_np is not None
        patches = self._vrt_np[sample].copy()
        inside = [k for k in run if k < num_vrt]
        if inside:
            patches[inside] = False  # no patch twice within a run
        plan = _plan_of(rm, n, base, num_vrt, width, patches)
        self._vrt_plans[key] = (rm, plan)
        return plan

    def _forced_plan(self, token: int) -> _Plan:
        plan = self._forced_plans.get(token)
        if plan is None:
            plan = self._forced_plans[token] = _Plan(False, torch.tensor([token]))
        return plan

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self._prompt_len is None:
            self._prompt_len = length
        if length < self._prompt_len:
            raise RuntimeError("TRPLogitsProcessor is bound to one generate call; create a new one")
        width = scores.shape[1]
        if self._checked == (rows, width):
            per_sample = self._per_sample
        else:
            per_sample = self._check(rows, width)
        budget = math.inf
        if self.max_new_tokens is not None:
            budget = self.max_new_tokens - (length - self._prompt_len)
        now = self._resolve(input_ids, per_sample)
        self._prev_rows = now
        entry, table, tok = self.tables.entry, self.table, self.tokenizer
        # One plan per row; consecutive rows with the same plan are masked as one block.
        plans: list[_Plan | None] = []
        copy = False  # does any row keep scores (finished or deny rows): then copy them first
        for r, row in enumerate(now):
            state = row.state
            if state is None:
                plans.append(None)  # finished rows are padded by generate; leave them alone
                copy = True
                continue
            if not row.forced:
                rm = entry(state, tok).mask(budget, table)
                plan = None if rm.empty else self._plan(rm, r // per_sample, state, width)
                if plan is None or plan.empty:
                    # Re-tokenising the completion cost more than planned: force it verbatim.
                    comp = state.completion(self._fill(r // per_sample))
                    row = now[r] = _Row(state, tuple(self._encode(comp)))
                else:
                    plans.append(plan)
                    copy = copy or plan.deny
                    continue
            plans.append(self._forced_plan(row.forced[0]))
        view = None
        if self.inplace:
            out = scores
            if out.is_cpu and out.dtype in _NUMPY_DTYPES:
                view = (out.detach() if out.requires_grad else out).numpy()
        else:
            # Rows that keep only a few ids need no copy of the scores: when none keeps the
            # rest, the output is written as -inf and those ids.
            out, view = self._output(scores, copy=copy)
        filled = not (copy or self.inplace)
        if view is not None:
            # On CPU numpy indexing costs a fraction of a torch call (a few µs each) and
            # writes the same values.
            _apply_numpy(view, scores, plans, filled)
            return out
        if filled:
            out.fill_(_NEG)
        device = out.device
        r = 0
        while r < rows:
            plan = plans[r]
            end = r + 1
            while end < rows and plans[end] is plan:
                end += 1
            if plan is not None:
                ids = plan.ids_on(device)
                block = out if end - r == rows else out[r:end]
                if plan.deny:
                    block.index_fill_(1, ids, _NEG)
                elif filled:
                    src = scores if end - r == rows else scores[r:end]
                    block.index_copy_(1, ids, src.index_select(1, ids))
                else:
                    keep = block.index_select(1, ids)
                    block.fill_(_NEG).index_copy_(1, ids, keep)
            r = end
        return out

    def _output(self, scores: torch.Tensor, *, copy: bool) -> tuple[torch.Tensor, Any]:
        """A tensor shaped like ``scores`` to write the output into (``copy``: holding a copy
        of them), and a numpy view of it (None: none kept). On CPU a fresh tensor costs more
        than the masking (a large allocation is fresh memory, page-faulted in: ~1-10 ms at
        16 x 150k), so the buffer of an earlier step is reused once nothing but this processor
        refers to it any more — the caller dropped it and no view of it lives (``generate``
        keeps only the latest output unless ``output_scores``, and then keeps them all, so none
        is reused)."""
        if scores.is_cpu and _storage_uses is not None:
            spare = self._spare
            for i in range(len(spare)):  # by index: a loop variable would be a reference
                if _only_ours(spare, i, scores):
                    out, view, _ = spare[i]
                    return (out.copy_(scores) if copy else out), view
            out = scores.clone() if copy else torch.empty_like(scores)
            view = None
            if out.dtype in _NUMPY_DTYPES and not out.requires_grad:
                view = out.numpy()
            # The storage's users while only this processor holds it (the view's base is one).
            uses = _storage_uses(out.untyped_storage()._cdata) - 1  # type: ignore[misc]
            # Two buffers alternate: the caller still holds the last step's output.
            self._spare = [*spare[-1:], (out, view, uses)]
            return out, view
        return (scores.clone() if copy else torch.empty_like(scores)), None

    def _fill(self, sample: int) -> int:
        if self.vrt_mask is None or not bool(self.vrt_mask[sample].any()):
            return 0
        return int(self.vrt_mask[sample].nonzero()[0, 0])

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text, vrt_base=self.vocab.vrt_base)


_storage_uses = getattr(torch._C, "_storage_Use_Count", None)

_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def _apply_numpy(o: Any, scores: torch.Tensor, plans: list[_Plan | None], filled: bool) -> None:
    """Apply the row plans to ``o``, a numpy view of the output (``filled``: it is to be -inf
    except the plans' ids, taken from ``scores``). One row at a time: a 1-d fancy assignment
    is the cheapest numpy call."""
    src = scores.detach().numpy() if filled else None
    if src is not None:
        o.fill(_NEG)
    for r, plan in enumerate(plans):
        if plan is None:
            continue
        ids = plan.ids_np
        row = o[r]
        if plan.deny:
            row[ids] = _NEG
        elif src is not None:
            row[ids] = src[r][ids]
        else:
            keep = row[ids]  # fancy indexing copies
            row.fill(_NEG)
            row[ids] = keep


def _only_ours(spare: list[tuple[torch.Tensor, Any, int]], i: int, like: torch.Tensor) -> bool:
    """Whether the buffer ``spare[i]`` is shaped like ``like`` and referenced by nothing but
    this processor: no other Python reference and no other tensor (a view) on its storage."""
    t, _, uses = spare[i]
    if t.shape != like.shape or t.dtype != like.dtype:
        return False
    # References: the tuple, the local ``t`` and getrefcount's argument.
    if sys.getrefcount(t) != 3:
        return False
    # Users of the storage: ours (the tensor, the numpy view's base) and the temporary asked.
    return _storage_uses(t.untyped_storage()._cdata) == uses + 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------ prefix
class ForcedPrefixLogitsProcessor(LogitsProcessor):
    """Emit a fixed token prefix per sample before the model decodes freely.

    The Kosmos-2 referring protocol forces ``<Phrase>expression</Phrase>(<Unit>box</Unit>`` so
    the model only localises the given expression. While sample ``b``'s prefix lasts, its rows
    may produce only the next prefix token (its score is set to 0, every other to -inf, so
    greedy, sampling and beams all take it); afterwards scores pass through unchanged.

    Put it *after* :class:`TRPLogitsProcessor` in the ``logits_processor`` list; the prefixes must
    be valid answer prefixes under the grammar (the grammar processor then reads them like any
    generated token, and raises if they are not).

    Args:
        prefixes: one token-id list per sample (may be empty). Generation rows map to samples as
            ``row // (rows // len(prefixes))`` (``num_beams`` / ``num_return_sequences`` rows of a
            sample are consecutive, as ``generate`` lays them out).
        prompt_len: the prompt length (``input_ids.shape[1]`` passed to ``generate``); default:
            the length at the first call.
    """

    def __init__(self, prefixes: Sequence[Sequence[int]], prompt_len: int | None = None) -> None:
        if isinstance(prefixes, torch.Tensor):
            prefixes = prefixes.tolist()
        self.prefixes = [[int(t) for t in p] for p in prefixes]
        if not self.prefixes:
            raise ValueError("prefixes needs one token list per sample")
        if any(t < 0 for p in self.prefixes for t in p):
            raise ValueError("prefix token ids must be >= 0")
        if prompt_len is not None and (not isinstance(prompt_len, int) or prompt_len < 0):
            raise ValueError(f"prompt_len must be an int >= 0, got {prompt_len!r}")
        self.prompt_len = prompt_len
        self.longest = max(map(len, self.prefixes))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self.prompt_len is None:
            self.prompt_len = length
        step = length - self.prompt_len
        if step < 0:
            raise RuntimeError("input_ids are shorter than the prompt; one processor per call")
        if step >= self.longest:
            return scores
        if rows % len(self.prefixes):
            raise ValueError(f"{rows} rows do not divide into {len(self.prefixes)} samples")
        per = rows // len(self.prefixes)
        out = scores.clone()
        for b, prefix in enumerate(self.prefixes):
            if step >= len(prefix):
                continue
            t = prefix[step]
            if t >= scores.shape[1]:
                raise ValueError(f"prefix token {t} is outside the scores' {scores.shape[1]} ids")
            block = out[b * per : (b + 1) * per]
            block.fill_(_NEG)
            block[:, t] = 0.0
        return out
