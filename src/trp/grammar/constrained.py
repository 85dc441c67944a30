"""Grammar-constrained decoding: a ``transformers.LogitsProcessor`` for ``model.generate``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from trp.grammar.errors import TRPParseError
from trp.grammar.incremental import IncrementalParser
from trp.grammar.scanner import TARGETS, Scanner
from trp.grammar.tokenizer import TokenVocab, encode_text
from trp.grammar.tokens import GRAMMAR_TAGS, VPT
from trp.grammar.units import resolve_units

__all__ = ["TRPLogitsProcessor"]

_GRAMMAR_TAG = re.compile(r"<(?:/?(?:Task|Phrase|Unit)>|REF>)")


class _Allowed:
    """What a scanner state allows next (cached per ``Scanner.state_key``)."""

    __slots__ = ("accepting", "text_next", "text_ok", "vrt_next", "vrt_ok")

    def __init__(
        self,
        text_ok: torch.Tensor,
        text_next: torch.Tensor,
        vrt_ok: bool,
        vrt_next: int,
        accepting: bool,
    ) -> None:
        self.text_ok = text_ok  # Tensor[V_text] bool: feeding the token keeps a valid prefix
        self.text_next = text_next  # Tensor[V_text] long: tokens needed to finish afterwards
        self.vrt_ok = vrt_ok
        self.vrt_next = vrt_next
        self.accepting = accepting


class TRPLogitsProcessor(LogitsProcessor):
    """Mask logits so generated answers always parse in strict mode.

    A token-level state machine: each batch row runs an :class:`IncrementalParser` over its
    generated tokens; the allowed next tokens of a parser state are those whose text keeps the
    answer a valid prefix (computed once per state and cached). Free text is unconstrained except
    that it cannot hold VRTs or stray tags; ``<Unit>`` names are limited to ``units``; VRT ids
    (``vocab.vrt_base + k``) are limited to the row's own patches (``vrt_mask``) and cannot repeat
    within a run; end-of-sequence is allowed only where the answer is complete.

    With ``max_new_tokens`` the processor also keeps room to finish: a token is allowed only if
    the shortest way to complete the answer after it still fits, so generation that stops on the
    length limit parses too. Create one processor per ``generate`` call.

    Args:
        tokenizer: the Hugging Face tokenizer (with TRP tokens), used to encode completions.
        eos_token_id: id(s) that end a sequence.
        vrt_mask: ``Tensor[B, num_vrt]`` bool, patches each sample may point at (``None``: no
            VRTs). Rows of the generation batch map to samples as ``row // (rows // B)``
            (``num_return_sequences`` / beams are consecutive).
        vocab: token texts (default: built from ``tokenizer``); fixes ``vrt_base``.
        units: allowed units (default: the registry).
        max_new_tokens: the ``generate`` budget (None: no length guarantee).
        allow_ref / allow_vrt: which target kinds may be generated.
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
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab or TokenVocab.from_tokenizer(tokenizer)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not eos or not all(isinstance(e, int) and 0 <= e < len(self.vocab.pieces) for e in eos):
            raise ValueError(f"eos_token_id must be text-vocabulary id(s), got {eos_token_id!r}")
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
        n = len(self.vocab.pieces)
        vpt = [i for i in range(n) if self.vocab.pieces[i] == VPT]
        ignore = set(self.eos) | set(vpt) | {i for i in range(n) if not self.vocab.pieces[i]}
        # Empty pieces make no progress (they would let a row idle forever) and [VPT] is an
        # input-side placeholder: never allowed.
        self._scan_ids = [i for i in range(n) if i not in ignore]
        self._scan_index = torch.tensor(self._scan_ids, dtype=torch.long)
        self._tag_ids = {i for i in range(n) if self.vocab.pieces[i] in GRAMMAR_TAGS}
        self._cache: dict[tuple[object, ...], _Allowed] = {}
        self._comp: dict[tuple[object, ...], str] = {}
        self._encoded: dict[str, list[int]] = {}
        self._prompt_len: int | None = None
        self._rows: dict[tuple[int, ...], tuple[IncrementalParser, list[int]]] = {}

    # ------------------------------------------------------------------ per-state tables
    def _encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = encode_text(self.tokenizer, text, vrt_base=self.vocab.vrt_base)
            self._encoded[text] = ids
        return ids

    def _completion(self, scanner: Scanner) -> str:
        key = (scanner.allow_vrt, *scanner.state_key())
        comp = self._comp.get(key)
        if comp is None:
            comp = self._comp[key] = scanner.completion(0)
        return comp

    def _probe(self, scanner: Scanner, piece: str, *, ordinary: bool) -> int:
        """Tokens needed to finish after ``piece`` (-1 when ``piece`` is not allowed)."""
        if ordinary and _GRAMMAR_TAG.search(scanner.text[scanner.pos :] + piece):
            # Tags are emitted as their own tokens, never spelled out of text pieces, so every
            # target has exactly one token to read a query from.
            return -1
        cp = scanner.checkpoint()
        try:
            scanner.feed(piece)
            pend = scanner.text[scanner.pos :]
            # Spelling a VRT out of ordinary tokens inside a target list is refused too, so a
            # pending target is always a prefix of a literal the completion can finish.
            if (
                scanner.mode == TARGETS
                and "<" in pend
                and not any(c.startswith(pend) for c in scanner.target_choices()[0])
            ):
                return -1
            comp = self._completion(scanner)
            if ordinary and "<" in pend:
                # Nor may a text piece start a tag that only text pieces could finish.
                m = _GRAMMAR_TAG.search(pend + comp)
                if m is not None and m.start() < len(pend):
                    return -1
            return len(self._encode(comp))
        except TRPParseError:
            return -1
        finally:
            scanner.rollback(cp)

    def _allowed(self, scanner: Scanner) -> _Allowed:
        key = (scanner.allow_vrt, *scanner.state_key())
        entry = self._cache.get(key)
        if entry is None:
            pieces = self.vocab.pieces
            tags = self._tag_ids
            nxt = torch.tensor(
                [self._probe(scanner, pieces[i], ordinary=i not in tags) for i in self._scan_ids],
                dtype=torch.long,
            )
            vrt_next = -1
            if scanner.allow_vrt:
                fresh = max(scanner.run_ids, default=-1) + 1
                vrt_next = self._probe(scanner, f"<|VRT_{fresh}|>", ordinary=False)
            entry = _Allowed(nxt >= 0, nxt, vrt_next >= 0, vrt_next, scanner.accepting)
            self._cache[key] = entry
        return entry

    # ------------------------------------------------------------------ rows
    def _new_parser(self, sample: int) -> IncrementalParser:
        has_vrt = self.allow_vrt and self.vrt_mask is not None and bool(self.vrt_mask[sample].any())
        return IncrementalParser(
            strict=True,
            units=self.units,
            vocab=self.vocab,
            allow_ref=self.allow_ref,
            allow_vrt=has_vrt,
        )

    def _fill(self, sample: int) -> int:
        if self.vrt_mask is None or not bool(self.vrt_mask[sample].any()):
            return 0
        return int(self.vrt_mask[sample].nonzero()[0, 0])

    def _row_state(self, gen: tuple[int, ...], sample: int) -> tuple[IncrementalParser, list[int]]:
        prev = self._rows.get(gen[:-1]) if gen else None
        if prev is not None:
            parser, forced = prev[0].copy(), list(prev[1])
            todo = gen[-1:]
        else:
            parser, forced, todo = self._new_parser(sample), [], gen
        for t in todo:
            if forced and forced[0] == t:
                forced.pop(0)
            else:
                forced = []
            try:
                parser.feed_token(t)
            except TRPParseError as err:
                raise RuntimeError(
                    f"generated token {t} broke the grammar ({err}); is another processor "
                    "overriding TRPLogitsProcessor?"
                ) from err
        return parser, forced

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self._prompt_len is None:
            self._prompt_len = length
        if length < self._prompt_len:
            raise RuntimeError("TRPLogitsProcessor is bound to one generate call; create a new one")
        vocab_size = scores.shape[1]
        base = self.vocab.vrt_base
        num_vrt = 0 if self.vrt_mask is None else self.vrt_mask.shape[1]
        if vocab_size < base + num_vrt:
            raise ValueError(f"scores have {vocab_size} columns, VRTs need {base + num_vrt}")
        per_sample = 1
        if self.vrt_mask is not None:
            if rows % self.vrt_mask.shape[0]:
                raise ValueError(f"{rows} rows do not divide into {self.vrt_mask.shape[0]} samples")
            per_sample = rows // self.vrt_mask.shape[0]
        budget = None
        if self.max_new_tokens is not None:
            budget = self.max_new_tokens - (length - self._prompt_len)
        eos = set(self.eos)
        generated = input_ids[:, self._prompt_len :].tolist()
        rows_now: dict[tuple[int, ...], tuple[IncrementalParser, list[int]]] = {}
        allowed = torch.zeros(rows, vocab_size, dtype=torch.bool)
        for r, gen in enumerate(generated):
            if eos.intersection(gen):
                allowed[r] = True  # finished rows are padded by generate; leave them alone
                continue
            sample = r // per_sample
            key = tuple(gen)
            state = rows_now.get(key) or self._row_state(key, sample)
            rows_now[key] = state
            parser, forced = state
            if not forced:
                self._allow_row(allowed[r], parser, sample, budget)
                if not allowed[r].any():
                    # Re-tokenising the completion cost more than planned: force it verbatim.
                    forced[:] = self._encode(parser.scanner.completion(self._fill(sample)))
            if forced:
                allowed[r, forced[0]] = True
        self._rows = rows_now
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def _allow_row(
        self, row: torch.Tensor, parser: IncrementalParser, sample: int, budget: int | None
    ) -> None:
        scanner = parser.scanner
        entry = self._allowed(scanner)
        ok = entry.text_ok
        if budget is not None:
            ok = ok & (entry.text_next <= budget - 1)
        row[self._scan_index[ok]] = True
        if entry.vrt_ok and (budget is None or entry.vrt_next <= budget - 1):
            base = self.vocab.vrt_base
            assert self.vrt_mask is not None
            patches = self.vrt_mask[sample].clone()
            patches[[k for k in scanner.run_ids if k < patches.numel()]] = False
            row[base : base + patches.numel()] = patches
        if entry.accepting:
            row[self.eos] = True
