"""Grammar-constrained decoding: ``transformers`` logits processors for ``model.generate``.

:class:`TRPLogitsProcessor` masks the scores so every generated answer parses strictly;
:class:`ForcedPrefixLogitsProcessor` emits a fixed answer prefix per sample first (Kosmos-2's
referring protocol: ``<Phrase>expression</Phrase>(<Unit>box</Unit>`` is forced, the model only
localises).

Speed comes from the grammar's structure. A handful of scanner states matter (free text, a
phrase, the literals of a triplet, a target list); in free text every token without ``<`` is
allowed and leaves the state unchanged. So per tokenizer we prepare once (:func:`prepare_tokens`,
cached in memory for as long as the tokenizer lives) the token classes — which tokens are
ordinary text, which hold ``<``, which are the grammar's tags, which the host's special tokens —
and a sorted index for "tokens starting with s". Per parser state (:attr:`ScanState.key`) we then
probe only the few tokens the state can tell apart (those with ``<`` in free text, the prefixes
of the expected literal elsewhere) with the real scanner, and combine them with the class mask;
the result is cached per (state, remaining budget) as a short list of allowed or of denied ids.
A decoding step only feeds each row's new token to its parser value and applies a cached list.
"""

from __future__ import annotations

import bisect
import math
import re
import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

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
        n = len(pieces)
        # The pieces, not the vocabulary object: the cache is keyed weakly by that object.
        self.pieces = pieces
        self.vrt_base = vocab.vrt_base
        self.size = n
        self.eos = tuple(sorted(set(eos)))
        tag_ids: dict[str, list[int]] = {t: [] for t in GRAMMAR_TAGS}
        never = set(added) | set(banned) | set(self.eos)
        for i, p in enumerate(pieces):
            if p in tag_ids:
                tag_ids[p].append(i)
        self.tag_ids = {t: tuple(ids) for t, ids in tag_ids.items()}
        self.tags = tuple(i for ids in self.tag_ids.values() for i in ids)
        never -= set(self.tags)
        ordinary = []
        angle, name_special = [], []
        unit_heads = tuple(ENTRY_UNIT[:k] for k in range(1, len(ENTRY_UNIT)))
        tags = set(self.tags)
        for i, p in enumerate(pieces):
            ok = bool(p) and i not in never and i not in tags and p not in (VPT, IMAGE)
            ordinary.append(ok)
            if not ok:
                continue
            if "<" in p:
                angle.append(i)
            elif "\n" in p or ENTRY_UNIT in p or p.endswith(unit_heads):
                name_special.append(i)
        self.ordinary = torch.tensor(ordinary, dtype=torch.bool)
        self.angle = tuple(angle)
        self.name_special = tuple(name_special)
        self.free = self.ordinary.clone()
        self.free[list(angle)] = False
        self.name_free = self.free.clone()
        self.name_free[list(name_special)] = False
        self.banned = tuple(i for i in range(n) if not ordinary[i] and i not in tags)
        # Prefix index over ordinary pieces: "tokens starting with s" is one bisect.
        order = sorted((p, i) for i, p in enumerate(pieces) if ordinary[i])
        self._sorted = [p for p, _ in order]
        self._sorted_ids = [i for _, i in order]
        self._by_piece: dict[str, list[int]] = {}
        for p, i in order:
            self._by_piece.setdefault(p, []).append(i)
        # Tables of each grammar configuration (units, target kinds), filled lazily.
        self.grammars: dict[tuple[object, ...], _StateTables] = {}
        self._reps: dict[int, list[int]] = {}
        self.costs: dict[str, int] = {}

    def starting_with(self, s: str) -> list[int]:
        """Ordinary token ids whose piece starts with ``s`` (non-empty)."""
        lo = bisect.bisect_left(self._sorted, s)
        hi = bisect.bisect_left(self._sorted, s[:-1] + chr(ord(s[-1]) + 1))
        return self._sorted_ids[lo:hi]

    def equal_to(self, s: str) -> list[int]:
        """Ordinary token ids whose piece is exactly ``s``."""
        return self._by_piece.get(s, [])

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


def vocab_of(tokenizer: Any) -> TokenVocab:
    """``TokenVocab.from_tokenizer(tokenizer)``, cached with the tokenizer object."""
    # Building the piece table reads every token (~0.5 s at 150k): once per tokenizer, redone
    # only when tokens were added since.
    cached = _VOCABS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    vocab = TokenVocab.from_tokenizer(tokenizer)
    _VOCABS[tokenizer] = (len(tokenizer), vocab)
    return vocab


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
) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer`` (built once, then cached in memory).

    Every added token of the tokenizer except the TRP grammar tags is never allowed (nor are
    ``banned_ids``); ``eos_token_id`` only where the answer is complete. The cache is keyed by
    the tokenizer object (or ``vocab`` when given) and dies with it; the per-state tables the
    processor computes live in the returned object, so later ``generate`` calls reuse them.
    """
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    banned = tuple(sorted({int(i) for i in banned_ids}))
    owner = vocab if vocab is not None else tokenizer
    vocab = vocab if vocab is not None else vocab_of(tokenizer)
    added = tuple(i for i in _added_ids(tokenizer) if i < len(vocab.pieces))
    key = (len(vocab.pieces), vocab.vrt_base, eos, added, banned)
    per_owner = _TABLES.setdefault(owner, {})
    table = per_owner.get(key)
    if table is None:
        table = per_owner[key] = TokenTable(vocab, eos=eos, added=added, banned=banned)
    return table


# ------------------------------------------------------------------------------------ states
@dataclass
class _RowMask:
    """What one state allows at one budget: a short list of allowed or of denied text ids."""

    deny: bool
    ids: torch.Tensor  # LongTensor[k]: denied (deny) or allowed (not deny) text-vocabulary ids
    vrt: bool  # may a VRT come (the row's own patches outside the open run)
    on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.ids
        t = self.on_device.get(device)
        if t is None:
            t = self.on_device[device] = self.ids.to(device)
        return t

    @property
    def empty(self) -> bool:
        return not self.deny and not self.vrt and self.ids.numel() == 0


class _StateEntry:
    """Per-state table: the class mask that applies (with the cost of finishing after one of
    its tokens), the probed exceptions with their costs (-1: refused), the VRT cost."""

    __slots__ = ("accepting", "default", "default_cost", "exc_cost", "exc_ids", "masks", "vrt_cost")

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

    @property
    def max_cost(self) -> int:
        exc = int(self.exc_cost.max()) if len(self.exc_cost) else -1
        return max(self.default_cost, self.vrt_cost, exc)

    def mask(self, budget: float, table: TokenTable) -> _RowMask:
        """The row mask when ``budget`` tokens remain (this one included)."""
        b = int(min(budget, self.max_cost + 1))
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
@dataclass(frozen=True, slots=True)
class _Row:
    """One generation row: its parser value (None once it ended) and tokens still forced."""

    state: ScanState | None
    forced: tuple[int, ...] = ()


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
        self._prompt_len: int | None = None
        self._rows: dict[tuple[int, ...], _Row] = {}
        self._vrt_on: dict[torch.device, torch.Tensor] = {}
        self._spare: list[torch.Tensor] = []

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
        if row.state is None:
            return row
        if token in self.eos:
            return _Row(None)
        forced = row.forced[1:] if row.forced and row.forced[0] == token else ()
        try:
            state = row.state.feed(self.vocab.piece(token))
        except TRPParseError as err:
            raise RuntimeError(
                f"generated token {token} broke the grammar ({err}); is another processor "
                "overriding TRPLogitsProcessor?"
            ) from err
        return _Row(state, forced)

    def _row(self, gen: tuple[int, ...], sample: int) -> _Row:
        parent = self._rows.get(gen[:-1]) if gen else None
        if parent is not None:
            return self._advance(parent, gen[-1])
        row = _Row(self._initial[self._has_vrt(sample)])
        for t in gen:
            row = self._advance(row, t)
        return row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self._prompt_len is None:
            self._prompt_len = length
        if length < self._prompt_len:
            raise RuntimeError("TRPLogitsProcessor is bound to one generate call; create a new one")
        vocab_size = scores.shape[1]
        base = self.vocab.vrt_base
        n = self.table.size
        num_vrt = 0 if self.vrt_mask is None else self.vrt_mask.shape[1]
        if vocab_size < base + num_vrt:
            raise ValueError(f"scores have {vocab_size} columns, VRTs need {base + num_vrt}")
        per_sample = 1
        if self.vrt_mask is not None:
            if rows % self.vrt_mask.shape[0]:
                raise ValueError(f"{rows} rows do not divide into {self.vrt_mask.shape[0]} samples")
            per_sample = rows // self.vrt_mask.shape[0]
        budget = math.inf
        if self.max_new_tokens is not None:
            budget = self.max_new_tokens - (length - self._prompt_len)
        generated = input_ids[:, self._prompt_len :].tolist()
        out = scores if self.inplace else self._output(scores)
        device = scores.device
        now: dict[tuple[int, ...], _Row] = {}
        # Rows sharing a state (and budget) share one row mask: apply each mask once to all its
        # rows, so the tensor work per step grows with the number of distinct states, not rows.
        groups: dict[int, tuple[_RowMask, list[int]]] = {}
        vrt_rows: list[tuple[int, int, ScanState]] = []
        no_vrt: list[int] = []
        active: list[int] = []
        for r, g in enumerate(generated):
            key = tuple(g)
            sample = r // per_sample
            row = now.get(key) or self._row(key, sample)
            now[key] = row
            if row.state is None:
                continue  # finished rows are padded by generate; leave them alone
            if not row.forced:
                rm = self.tables.entry(row.state, self.tokenizer).mask(budget, self.table)
                if rm.empty:
                    # Re-tokenising the completion cost more than planned: force it verbatim.
                    comp = row.state.completion(self._fill(sample))
                    row = now[key] = _Row(row.state, tuple(self._encode(comp)))
            if row.forced:
                line = out[r]
                t = row.forced[0]
                keep = line[t].clone()
                line.fill_(_NEG)
                line[t] = keep
                continue
            active.append(r)
            groups.setdefault(id(rm), (rm, []))[1].append(r)
            if num_vrt:
                if rm.vrt and self._has_vrt(sample):
                    vrt_rows.append((r, sample, row.state))
                else:
                    no_vrt.append(r)
        self._rows = now
        for rm, rs in groups.values():
            ids = rm.ids_on(device)
            if len(rs) == 1:
                line = out[rs[0]]
                if rm.deny:
                    line[:n].index_fill_(0, ids, _NEG)
                else:
                    keep = line[ids]  # advanced indexing copies: safe to overwrite the row next
                    line[:n].fill_(_NEG)
                    line[ids] = keep
                continue
            at = torch.tensor(rs, device=device)
            if rm.deny:
                out[at[:, None], ids[None, :]] = _NEG
            else:
                keep = out[at[:, None], ids[None, :]]
                out[at, :n] = _NEG
                out[at[:, None], ids[None, :]] = keep
        if not active:
            return out
        every = len(active) == rows
        at = None if every else torch.tensor(active, device=device)
        for lo, hi in ((n, base), (base + num_vrt, vocab_size)):
            if hi > lo:  # ids that are neither text nor this call's VRTs (padded embeddings)
                if every:
                    out[:, lo:hi] = _NEG
                else:
                    out[at, lo:hi] = _NEG
        if no_vrt:
            out[torch.tensor(no_vrt, device=device), base : base + num_vrt] = _NEG
        for r, sample, state in vrt_rows:
            out[r, base : base + num_vrt].masked_fill_(
                self._not_patches(sample, state, device), _NEG
            )
        return out

    def _output(self, scores: torch.Tensor) -> torch.Tensor:
        """A copy of ``scores`` to mask. On CPU a fresh copy costs more than the masking (a large
        allocation is fresh memory, page-faulted in: ~1-10 ms at 16 x 150k), so the buffer of an
        earlier step is reused once nothing but this processor refers to it any more — the
        caller dropped it and no view of it lives (``generate`` keeps only the latest output
        unless ``output_scores``, and then keeps them all, so none is reused)."""
        if scores.device.type == "cpu" and _storage_uses is not None:
            for i in range(len(self._spare)):  # by index: a loop variable would be a reference
                if _only_ours(self._spare, i, scores):
                    return self._spare[i].copy_(scores)
            out = scores.clone()
            # Two buffers alternate: the caller still holds the last step's output.
            self._spare = [*self._spare[-1:], out]
            return out
        return scores.clone()

    def _not_patches(self, sample: int, state: ScanState, device: torch.device) -> torch.Tensor:
        """``Tensor[num_vrt] bool``: what the row may not point at — patches of other images and
        those already in the open run."""
        other = self._vrt_on.get(device)
        if other is None:
            assert self.vrt_mask is not None
            other = self._vrt_on[device] = ~self.vrt_mask.to(device)
        run = [k for k in state.triplet.run if k < other.shape[1]]
        if not run:
            return other[sample]
        banned = other[sample].clone()
        banned[run] = True
        return banned

    def _fill(self, sample: int) -> int:
        if self.vrt_mask is None or not bool(self.vrt_mask[sample].any()):
            return 0
        return int(self.vrt_mask[sample].nonzero()[0, 0])

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text, vrt_base=self.vocab.vrt_base)


_storage_uses = getattr(torch._C, "_storage_Use_Count", None)


def _only_ours(spare: list[torch.Tensor], i: int, like: torch.Tensor) -> bool:
    """Whether ``spare[i]`` is shaped like ``like`` and referenced by nothing but the list: no
    other Python reference and no other tensor (a view) on its storage."""
    t = spare[i]
    if t.shape != like.shape or t.dtype != like.dtype:
        return False
    # References: the list, the local ``t`` and getrefcount's argument.
    if sys.getrefcount(t) != 3:
        return False
    # Users of the storage: the tensor and the temporary storage object asked.
    return _storage_uses(t.untyped_storage()._cdata) == 2  # type: ignore[misc]


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
