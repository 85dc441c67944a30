"""Grammar-constrained generation with a tiny random causal LM, and routing of its targets."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import (
    TokenVocab,
    TRPLogitsProcessor,
    encode_text,
    parse_ids,
    route_targets,
    trp_token_ids,
)

NUM_VRT = 16


class _Bias(LogitsProcessor):
    """Push a random model towards structure so triplets actually get generated."""

    def __init__(self, ids: list[int], vrt_base: int) -> None:
        self.ids, self.vrt_base = ids, vrt_base

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += 5.0
        scores[:, self.vrt_base :] += 3.0
        return scores


def _generate(
    seed: int,
    *,
    max_new_tokens: int,
    units=None,
    allow_ref: bool = True,
    rows: int = 4,
    arch: str = "qwen2",
):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    common = {
        "vocab_size": vocab.vrt_base + NUM_VRT,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    torch.manual_seed(seed)
    model = (
        Qwen2ForCausalLM(Qwen2Config(**common))
        if arch == "qwen2"
        else LlamaForCausalLM(LlamaConfig(**common))
    ).eval()
    mask = torch.zeros(rows, NUM_VRT, dtype=torch.bool)
    for b in range(rows):
        mask[b, torch.randperm(NUM_VRT)[: 3 + b]] = True
    prompt = torch.tensor([encode_text(tok, "<|im_start|>user\nfind the dogs<|im_end|>\n")] * rows)
    proc = TRPLogitsProcessor(
        tokenizer=tok,
        eos_token_id=tok.eos_token_id,
        vrt_mask=mask,
        vocab=vocab,
        units=units,
        max_new_tokens=max_new_tokens,
        allow_ref=allow_ref,
    )
    bias = _Bias(list(trp_token_ids(tok).values()), vocab.vrt_base)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        logits_processor=LogitsProcessorList([bias, proc]),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok, vocab, mask, out[:, prompt.shape[1] :]


@pytest.mark.parametrize(
    ("seed", "arch", "budget"), [(0, "qwen2", 40), (1, "llama", 24), (2, "qwen2", 64)]
)
def test_every_generated_sample_parses_strictly(seed: int, arch: str, budget: int) -> None:
    tok, vocab, mask, gen = _generate(seed, max_new_tokens=budget, arch=arch)
    results = [parse_ids(row.tolist(), vocab=vocab) for row in gen]  # strict: raises if invalid
    n_triplets = sum(len(r.triplets) for r in results)
    assert n_triplets > 0
    for b, r in enumerate(results):
        allowed = set(mask[b].nonzero().flatten().tolist())
        for triplet in r.triplets:
            for target in triplet.targets:
                if target.kind == "vrt":
                    assert set(target.patches) <= allowed
                    assert len(set(target.patches)) == len(target.patches)
        # Routed queries point at the VRT / <REF> tokens of this very row.
        routed = route_targets([r])
        ref = trp_token_ids(tok)["<REF>"]
        for q in routed.values():
            for i in range(len(q)):
                toks = [int(gen[b, p]) for p in q.positions[i, : q.lengths[i]]]
                assert all(t >= vocab.vrt_base for t in toks) if q.is_vrt[i] else toks == [ref]


def test_units_and_target_kinds_are_limited() -> None:
    _, vocab, _, gen = _generate(3, max_new_tokens=48, units=["mask"], allow_ref=False)
    results = [parse_ids(row.tolist(), vocab=vocab, units=["mask"]) for row in gen]
    triplets = [t for r in results for t in r.triplets]
    assert triplets
    assert all(t.unit == "mask" for t in triplets)
    assert all(target.kind == "vrt" for t in triplets for target in t.targets)


def test_processor_rejects_bad_input() -> None:
    tok = offline_tokenizer("bpe")
    with pytest.raises(ValueError, match="eos"):
        TRPLogitsProcessor(tokenizer=tok, eos_token_id=10**6)
    with pytest.raises(ValueError, match="vrt_mask"):
        TRPLogitsProcessor(
            tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=torch.ones(4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="allow_ref=False"):
        TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, allow_ref=False)
    proc = TRPLogitsProcessor(
        tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=torch.ones(2, 8, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match="columns"):
        proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, len(tok)))
    with pytest.raises(ValueError, match="rows"):
        proc(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, len(tok) + 8))
