"""Grammar-constrained generation with a tiny random causal LM, and routing of its targets."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import (
    ForcedPrefixLogitsProcessor,
    TokenVocab,
    TRPLogitsProcessor,
    TRPParseError,
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


# ---------------------------------------------------------------------------- fast tables
def _allowed(proc: TRPLogitsProcessor, state, budget: float = float("inf")) -> tuple[set, bool]:
    """Text ids a state allows at a budget (from the processor's cached tables) and VRTs."""
    rm = proc.tables.entry(state, proc.tokenizer).mask(budget, proc.table)
    ids = set(rm.ids.tolist())
    return (set(range(proc.table.size)) - ids if rm.deny else ids), rm.vrt


def _brute_force(proc: TRPLogitsProcessor, state) -> dict[int, int]:
    """Reference: every token of the vocabulary probed with the scanner (cost, -1 refused)."""
    table = proc.table
    tags = set(table.tags)
    out = {}
    for i, piece in enumerate(table.pieces):
        if i in tags or bool(table.ordinary[i]):
            out[i] = proc.tables.probe(
                state, piece, ordinary=i not in tags, tokenizer=proc.tokenizer
            )
    return out


def _walk_states(proc: TRPLogitsProcessor, tok, seed: int, steps: int = 40) -> list:
    """States met teacher-forcing corpus answers and on random walks over allowed tokens (biased
    towards tags and '<' pieces, so partial tags and literals get visited)."""
    from tests.test_grammar_fixtures import corpus

    rng = random.Random(seed)
    vocab = proc.vocab
    states = []
    start = proc._initial[True]
    for text in rng.sample(corpus(40, seed), 12):
        s = start
        for i in encode_text(tok, text, vrt_base=vocab.vrt_base):
            states.append(s)
            try:
                s = s.feed(vocab.piece(i))
            except TRPParseError:  # the corpus has questions too: keep their valid prefix
                break
        states.append(s)
    weird = [i for i in range(proc.table.size) if "<" in vocab.pieces[i] or i in proc.table.tags]
    for _ in range(6):
        s = start
        for _ in range(steps):
            states.append(s)
            allowed, vrt = _allowed(proc, s)
            allowed -= set(proc.eos)
            pick = sorted(allowed & set(weird)) if rng.random() < 0.5 else []
            pool = pick or sorted(allowed)
            if vrt and rng.random() < 0.3:
                s = s.feed(vocab.piece(vocab.vrt_base + rng.randrange(NUM_VRT)))
                continue
            if not pool:
                break
            s = s.feed(vocab.piece(rng.choice(pool)))
    unique = {}
    for s in states:
        unique.setdefault(s.key, s)
    return list(unique.values())


@pytest.mark.parametrize("kind", ["bpe", "wordlevel", "qwen2_5_vl"])
def test_cached_masks_equal_a_full_vocabulary_scan(kind: str) -> None:
    from tests.test_grammar_fixtures import host_tokenizer

    tok = host_tokenizer(kind) if kind == "qwen2_5_vl" else offline_tokenizer(kind)
    mask = torch.ones(1, NUM_VRT, dtype=torch.bool)
    proc = TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=mask)
    states = _walk_states(proc, tok, seed=len(kind))
    assert len(states) > 40
    modes = set()
    for s in states:
        ref = _brute_force(proc, s)
        f = s.follow()
        modes.add((f.text, bool(f.pending)))
        for budget in (float("inf"), 1, 2, 3, 5, 8, 13):
            if f.text == "name" and budget != float("inf"):
                continue  # class names price their completion with a margin of one token
            allowed, _ = _allowed(proc, s, budget)
            want = {i for i, c in ref.items() if 0 <= c <= budget - 1}
            if f.accepting:
                want |= set(proc.eos)
            assert allowed == want, (s.text, budget, sorted(allowed ^ want)[:10])
    # The walk met free text, phrases, literals, pending partial tags and target lists.
    assert {
        ("body", False),
        ("body", True),
        ("phrase", False),
        (None, False),
        (None, True),
    } <= modes


def test_follow_says_what_may_come_next() -> None:
    from trp.grammar.scanner import initial_state

    s = initial_state(strict=True, units=("box", "mask"))
    f = s.follow()
    assert (f.text, f.tags, f.accepting) == ("body", ("<Phrase>", "<Task>"), True)
    s = s.feed("A <Phrase>dog")
    assert s.follow().tags == ("</Phrase>",)
    s = s.feed("</Phrase>(<Unit>")
    assert s.follow().literals == ("box</Unit>", "mask</Unit>")
    s2 = s.feed("box</Unit><|VRT_3|><|VRT_5|>")
    f = s2.follow()
    assert (f.literals, f.vrt, f.run, f.accepting) == ((")", "[1]<REF>", ", "), True, (3, 5), False)
    assert s2.feed(", [").follow().pending == "["
    # Values: feeding never changes the state it started from.
    assert s.follow().literals == ("box</Unit>", "mask</Unit>")
    assert s2.completion() == ")"
    with pytest.raises(ValueError, match="strict"):
        initial_state(strict=False, units=("box",)).follow()


# ---------------------------------------------------------------------------- host tokens
class _Towards(LogitsProcessor):
    """A large bonus for some ids: an untrained model then wants exactly those tokens."""

    def __init__(self, ids: list[int], bonus: float = 50.0) -> None:
        self.ids, self.bonus = ids, bonus

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += self.bonus
        return scores


@pytest.mark.parametrize("host", ["qwen2_5_vl", "llava"])
def test_host_special_tokens_are_never_allowed(host: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.test_grammar_fixtures import LLAVA_SPECIALS, QWEN2_5_VL_SPECIALS, host_tokenizer

    tok = host_tokenizer(host)
    names = QWEN2_5_VL_SPECIALS if host == "qwen2_5_vl" else LLAVA_SPECIALS
    vocab_ids = tok.get_vocab()
    host_ids = {vocab_ids[t] for t in names} | {vocab_ids["[VPT]"]}
    host_ids |= {int(i) for i in tok.added_tokens_decoder} - set(trp_token_ids(tok).values())
    eos = tok.eos_token_id
    mask = torch.ones(2, NUM_VRT, dtype=torch.bool)
    proc = TRPLogitsProcessor(tokenizer=tok, eos_token_id=eos, vrt_mask=mask)
    for s in _walk_states(proc, tok, seed=7):
        allowed, _ = _allowed(proc, s, 30)
        assert not (allowed & (host_ids - {eos})), s.text
        assert (eos in allowed) == s.accepting
    # An untrained model pushed hard towards the host tokens still never emits one.
    vocab = proc.vocab
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab.vrt_base + NUM_VRT,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    prompt = torch.tensor([encode_text(tok, "find the dog")] * 2)
    proc = TRPLogitsProcessor(
        tokenizer=tok, eos_token_id=eos, vrt_mask=mask, vocab=vocab, max_new_tokens=24
    )
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        do_sample=True,
        logits_processor=LogitsProcessorList([_Towards(sorted(host_ids - {eos})), proc]),
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
    )
    gen = out[:, prompt.shape[1] :]
    for row in gen.tolist():
        body = row[: row.index(eos)] if eos in row else row
        assert not set(body) & host_ids
        parse_ids(body, vocab=vocab)


# ---------------------------------------------------------------------------- generate modes
def _tiny_model(vocab: TokenVocab, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab.vrt_base + NUM_VRT,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()


def _left_padded(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [encode_text(tok, t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, width - len(row) :] = torch.tensor(row)
        attention[r, width - len(row) :] = 1
    return input_ids, attention


def _check_rows(gen: torch.Tensor, vocab: TokenVocab, mask: torch.Tensor, eos: int) -> int:
    """Every row parses strictly; VRTs are the sample's own, unrepeated; returns #triplets."""
    per = gen.shape[0] // mask.shape[0]
    n = 0
    for r, row in enumerate(gen.tolist()):
        body = row[: row.index(eos)] if eos in row else row
        result = parse_ids(body, vocab=vocab)
        n += len(result.triplets)
        own = set(mask[r // per].nonzero().flatten().tolist())
        for t in result.triplets:
            for target in t.targets:
                if target.kind == "vrt":
                    assert set(target.patches) <= own
                    assert len(set(target.patches)) == len(target.patches)
    return n


@pytest.mark.parametrize(
    "mode",
    ["greedy", "sampling", "beams", "return_sequences", "beams_return_sequences"],
)
def test_every_generate_mode_parses(mode: str) -> None:
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    model = _tiny_model(vocab, seed=4)
    prompts = ["find the dogs", "<|im_start|>user\nwhere is the red car on the left?<|im_end|>\n"]
    input_ids, attention = _left_padded(tok, prompts)  # left padding: prompts of two lengths
    mask = torch.zeros(2, NUM_VRT, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 8:] = True
    budget = 30
    kwargs = {
        "greedy": {},
        "sampling": {"do_sample": True},
        "beams": {"num_beams": 3},
        "return_sequences": {"do_sample": True, "num_return_sequences": 3},
        "beams_return_sequences": {"num_beams": 3, "num_return_sequences": 2},
    }[mode]
    torch.manual_seed(1)
    proc = TRPLogitsProcessor(
        tokenizer=tok,
        eos_token_id=tok.eos_token_id,
        vrt_mask=mask,
        vocab=vocab,
        max_new_tokens=budget,
    )
    bias = _Bias(list(trp_token_ids(tok).values()), vocab.vrt_base)
    out = model.generate(
        input_ids,
        attention_mask=attention,
        max_new_tokens=budget,
        logits_processor=LogitsProcessorList([bias, proc]),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **kwargs,
    )
    rows = 2 * kwargs.get("num_return_sequences", 1)
    assert out.shape[0] == rows
    assert _check_rows(out[:, input_ids.shape[1] :], vocab, mask, tok.eos_token_id) > 0


def test_rows_must_divide_into_samples_and_tables_are_reused() -> None:
    tok = offline_tokenizer("bpe")
    mask = torch.ones(2, NUM_VRT, dtype=torch.bool)
    first = TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=mask)
    answer = "<Phrase>the dog</Phrase>(<Unit>box</Unit>[0]<REF>)."
    cached = first.warm([answer])
    assert cached > 5
    second = TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=mask)
    # Same token table and state tables: a second call starts warm.
    assert second.table is first.table
    assert second.tables is first.tables
    assert second.warm([answer]) == cached
    ids = torch.tensor([encode_text(tok, answer)] * 2)
    scores = torch.zeros(2, len(tok) + NUM_VRT)
    out = second(ids[:, :1], scores)
    assert torch.isfinite(out).any(dim=1).all()
    with pytest.raises(ValueError, match="rows"):
        second(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, len(tok) + NUM_VRT))


# ---------------------------------------------------------------------------- forced prefix
@pytest.mark.parametrize(
    "kwargs", [{}, {"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2}]
)
def test_forced_prefix_is_emitted_verbatim(kwargs: dict) -> None:
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    model = _tiny_model(vocab, seed=5)
    input_ids, attention = _left_padded(tok, ["find it", "where is the red car?"])
    prefixes = [
        encode_text(tok, "<Phrase>the dog</Phrase>(<Unit>box</Unit>"),
        encode_text(tok, "A <Phrase>red car</Phrase>(<Unit>mask</Unit>"),
    ]
    mask = torch.ones(2, NUM_VRT, dtype=torch.bool)
    budget = 24
    proc = TRPLogitsProcessor(
        tokenizer=tok,
        eos_token_id=tok.eos_token_id,
        vrt_mask=mask,
        vocab=vocab,
        max_new_tokens=budget,
    )
    forced = ForcedPrefixLogitsProcessor(prefixes, prompt_len=input_ids.shape[1])
    torch.manual_seed(0)
    out = model.generate(
        input_ids,
        attention_mask=attention,
        max_new_tokens=budget,
        logits_processor=LogitsProcessorList([proc, forced]),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **kwargs,
    )
    gen = out[:, input_ids.shape[1] :]
    per = gen.shape[0] // 2
    for r, row in enumerate(gen.tolist()):
        prefix = prefixes[r // per]
        assert row[: len(prefix)] == prefix
    # Every answer parses and completes the forced triplet (a cut one still parses).
    assert _check_rows(gen, vocab, mask, tok.eos_token_id) >= gen.shape[0]


def test_forced_prefix_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one token list"):
        ForcedPrefixLogitsProcessor([])
    proc = ForcedPrefixLogitsProcessor([[5, 6], [7]], prompt_len=2)
    scores = torch.zeros(4, 10)
    out = proc(torch.zeros(4, 2, dtype=torch.long), scores)
    assert out.argmax(1).tolist() == [5, 5, 7, 7]
    assert torch.isinf(out).sum() == 4 * 9
    out = proc(torch.zeros(4, 3, dtype=torch.long), scores)
    assert out[2:].eq(0).all() and torch.isinf(out[:2]).sum() == 2 * 9  # sample 1 is done
    assert proc(torch.zeros(4, 4, dtype=torch.long), scores) is scores
    with pytest.raises(ValueError, match="rows"):
        proc(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 10))


def test_padded_columns_finished_rows_and_in_place_agree() -> None:
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    mask = torch.zeros(2, NUM_VRT, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True
    eos = tok.eos_token_id
    prefix = encode_text(tok, "<Phrase>dog</Phrase>(<Unit>box</Unit>", vrt_base=vocab.vrt_base)
    prompt = encode_text(tok, "find the dog")
    # Rows 0, 1 are sample 0 (patch 3), rows 2, 3 sample 1 (patch 5): consecutive, as generate.
    rows = torch.tensor([prompt + prefix + [vocab.vrt_base + k] for k in (3, 3, 5, 5)])
    rows[3, -1] = eos  # a finished row: generate pads it, the processor leaves it alone
    rows[3, -2] = eos
    width = vocab.vrt_base + NUM_VRT + 7  # embeddings padded beyond the VRTs
    scores = torch.randn(4, width)
    outs = []
    for inplace in (False, True):
        proc = TRPLogitsProcessor(
            tokenizer=tok, eos_token_id=eos, vrt_mask=mask, vocab=vocab, inplace=inplace
        )
        for t in range(len(prompt), rows.shape[1]):  # as generate calls it, step by step
            proc(rows[:, :t], scores.clone())
        s = scores.clone()
        outs.append(proc(rows, s))
        assert (outs[-1] is s) == inplace
    assert torch.equal(outs[0], outs[1])
    out = outs[0]
    assert torch.isinf(out[:3, vocab.vrt_base + NUM_VRT :]).all()
    assert torch.equal(out[3], scores[3])
    vrt = out[:3, vocab.vrt_base : vocab.vrt_base + NUM_VRT]
    # In the open run only the other own patch could follow, and there is none: no VRT.
    assert torch.isinf(vrt).all()
    close = encode_text(tok, ")")[0]
    assert torch.isfinite(out[:3, close]).all()


def test_output_buffers_are_reused_only_when_nobody_holds_them() -> None:
    tok = offline_tokenizer("bpe")
    ids = torch.tensor([encode_text(tok, "hello world, the dog on the left is red")])
    scores = torch.randn(1, len(tok))

    def proc() -> TRPLogitsProcessor:
        return TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id)

    p = proc()
    ptrs = []
    for t in range(1, 8):  # as generate: only the latest output is held
        out = p(ids[:, :t], scores)
        ptrs.append(out.data_ptr())
    assert len(set(ptrs)) == 2  # two buffers alternate (the caller holds the last one)
    p = proc()
    kept = [p(ids[:, :t], scores) for t in range(1, 6)]  # as output_scores=True keeps them
    assert len({o.data_ptr() for o in kept}) == 5
    q = proc()
    want = [q(ids[:, :t], scores).clone() for t in range(1, 6)]  # copied at once: q reuses
    assert all(torch.equal(a, b) for a, b in zip(kept, want))  # nothing kept was overwritten
    assert not all(torch.equal(want[0], w) for w in want[1:])
    p = proc()
    view = None
    for t in range(1, 6):
        out = p(ids[:, :t], scores)
        if t == 1:
            view, first = out[:, :5], out.clone()  # a view keeps its storage from reuse
    assert torch.equal(view, first[:, :5])


# ---------------------------------------------------------------------------- fast path
def _reference(
    proc: TRPLogitsProcessor, ids: torch.Tensor, prompt_len: int, scores: torch.Tensor
) -> torch.Tensor:
    """The processor's output from first principles: every row replayed from its generated
    tokens (with the forced completion where a state allows nothing at its budget), the state's
    text mask, its own patches outside the open run, nothing else."""
    vocab, table = proc.vocab, proc.table
    base, num_vrt = vocab.vrt_base, proc.vrt_mask.shape[1]
    per = ids.shape[0] // proc.vrt_mask.shape[0]
    out = scores.clone()

    def allowed(s, budget: int, sample: int) -> torch.Tensor:
        rm = proc.tables.entry(s, proc.tokenizer).mask(budget, table)
        keep = torch.zeros(scores.shape[1], dtype=torch.bool)
        text = torch.zeros(table.size, dtype=torch.bool)
        text[rm.ids] = True
        keep[: table.size] = ~text if rm.deny else text
        if rm.vrt and proc._has_vrt(sample):
            own = proc.vrt_mask[sample].clone()
            own[list(s.triplet.run)] = False
            keep[base : base + num_vrt] = own
        return keep

    for r, row in enumerate(ids[:, prompt_len:].tolist()):
        sample = r // per
        s, forced, done = proc._initial[proc._has_vrt(sample)], (), False
        for j in range(len(row) + 1):
            budget = proc.max_new_tokens - j
            if not forced:
                keep = allowed(s, budget, sample)
                if not keep.any():
                    forced = tuple(proc._encode(s.completion(proc._fill(sample))))
            if j == len(row):
                break
            t = row[j]
            if t in proc.eos:
                done = True
                break
            forced = forced[1:] if forced and forced[0] == t else ()
            s = s.feed(vocab.piece(t))
        if done:
            continue  # finished: left alone
        if forced:
            keep = torch.zeros(scores.shape[1], dtype=torch.bool)
            keep[forced[0]] = True
        out[r, ~keep] = float("-inf")
    return out


@pytest.mark.parametrize(
    ("seed", "device", "dtype"),
    [
        (0, "cpu", torch.float32),
        (1, "cpu", torch.float32),
        (2, "cpu", torch.float16),
        (3, "cpu", torch.bfloat16),  # no numpy dtype: the torch indexing path
        pytest.param(
            4,
            "cuda",
            torch.float32,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_fast_path_masks_equal_the_reference(seed: int, device: str, dtype) -> None:
    """Random walks over allowed tokens, rows sometimes reordered (as beams do), input ids
    built as generate does (a new tensor per step: the fast path) or as views of one buffer
    (the general path); copy and in-place; every output equals the reference."""
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    samples = rng.choice([1, 2, 3])
    per = rng.choice([1, 2])
    rows = samples * per
    mask = torch.rand(samples, NUM_VRT, generator=gen) < 0.4
    mask[0] = False  # sample 0 has no patch: no VRT at all
    budget = 40
    prompt = torch.tensor([encode_text(tok, "find the dogs")] * rows)
    width = vocab.vrt_base + NUM_VRT + 3  # padded embedding columns too
    structure = [vocab.vrt_base + k for k in range(NUM_VRT)] + list(trp_token_ids(tok).values())
    for views in (False, True):
        procs = [
            TRPLogitsProcessor(
                tokenizer=tok,
                eos_token_id=tok.eos_token_id,
                vrt_mask=mask,
                vocab=vocab,
                max_new_tokens=budget,
                inplace=inplace,
            )
            for inplace in (False, True)
        ]
        buffer = torch.zeros(rows, prompt.shape[1] + budget, dtype=torch.long, device=device)
        buffer[:, : prompt.shape[1]] = prompt.to(device)
        ids = prompt.clone()
        fast_steps = 0
        for _step in range(budget):
            scores = torch.randn(rows, width, generator=gen)
            scores[:, structure] += 4.0  # towards tags and VRTs, so triplets get generated
            scores = scores.to(dtype)
            want = _reference(procs[0], ids, prompt.shape[1], scores)
            for proc in procs:
                given = scores.to(device, copy=True)
                got = proc(buffer[:, : ids.shape[1]] if views else ids.to(device), given)
                assert got.device == given.device
                bad = (got.cpu() != want).nonzero().tolist()
                assert not bad, (views, proc.inplace, _step, bad[:5])
                assert (got is given) == proc.inplace
                fast_steps += proc._prev_keys is None
            if torch.isinf(want).all(dim=1).any():
                break
            nxt = torch.distributions.Categorical(logits=want.float()).sample()
            if rng.random() < 0.3 and ids.shape[1] > prompt.shape[1]:
                # Beams reorder rows within a sample (the sample of a row never changes).
                order = [s * per + rng.randrange(per) for s in range(samples) for _ in range(per)]
                ids, nxt = ids[order], nxt[order]
                buffer[:, : ids.shape[1]] = ids.to(device)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            buffer[:, : ids.shape[1]] = ids.to(device)
            if all(tok.eos_token_id in r for r in ids[:, prompt.shape[1] :].tolist()):
                break
        if views:
            assert fast_steps == 0  # one buffer written in place: always the general path
        else:
            assert fast_steps > 0


def test_fast_path_refuses_rows_that_do_not_continue() -> None:
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    proc = TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, vocab=vocab)
    a = encode_text(tok, "the dog <Phrase>")
    b = encode_text(tok, "a cat sat on it")
    scores = torch.zeros(1, len(tok))
    proc(torch.tensor([a[:1]]), scores)
    for t in range(2, len(a) + 1):
        proc(torch.tensor([a[:t]]), scores)
    # Same length + 1 but another history: the rows are replayed, not continued.
    other = torch.tensor([b[:1] + a[1:] + b[:1]])
    out = proc(other, scores)
    fresh = TRPLogitsProcessor(tokenizer=tok, eos_token_id=tok.eos_token_id, vocab=vocab)
    fresh(other[:, :1], scores)
    assert torch.equal(out, fresh(other, scores))


# ---------------------------------------------------------------------------- disk cache
def _fresh_tokenizer():
    import copy

    return copy.deepcopy(offline_tokenizer("bpe"))


def _same_table(a, b) -> None:
    assert a.pieces == b.pieces and a.vrt_base == b.vrt_base and a.eos == b.eos
    assert a.tag_ids == b.tag_ids and a.angle == b.angle and a.name_special == b.name_special
    assert a.banned == b.banned and a._sorted_ids == b._sorted_ids and a._sorted == b._sorted
    assert torch.equal(a.ordinary, b.ordinary) and torch.equal(a.free, b.free)
    assert torch.equal(a.name_free, b.name_free)


def test_disk_cache_hit_loads_without_reading_the_tokens(tmp_path, monkeypatch) -> None:
    from trp.grammar import constrained

    tok = _fresh_tokenizer()
    cold = constrained.prepare_tokens(tok, eos_token_id=tok.eos_token_id, cache_dir=tmp_path)
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "tokens").iterdir())
    assert files == ["table", "vocab"]

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt instead of loaded")

    monkeypatch.setattr(constrained.TokenVocab, "from_tokenizer", fail)
    monkeypatch.setattr(constrained.TokenTable, "__init__", fail)
    again = _fresh_tokenizer()  # a new object: nothing of it is cached in memory
    warm = constrained.prepare_tokens(again, eos_token_id=again.eos_token_id, cache_dir=tmp_path)
    assert warm is not cold
    _same_table(warm, cold)
    assert constrained.vocab_of(again).pieces == cold.pieces  # the memory cache holds it now


def test_disk_cache_misses_on_another_tokenizer_or_ids(tmp_path) -> None:
    from trp.grammar import constrained

    tok = _fresh_tokenizer()
    base = constrained.prepare_tokens(tok, eos_token_id=tok.eos_token_id, cache_dir=tmp_path)
    other = _fresh_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|extra_pad|>"]})
    table = constrained.prepare_tokens(other, eos_token_id=other.eos_token_id, cache_dir=tmp_path)
    new_id = other.convert_tokens_to_ids("<|extra_pad|>")
    assert table.size == base.size + 1 and not bool(table.ordinary[new_id])
    banned = constrained.prepare_tokens(
        _fresh_tokenizer(), eos_token_id=tok.eos_token_id, banned_ids=[5], cache_dir=tmp_path
    )
    assert bool(base.ordinary[5]) != bool(banned.ordinary[5])
    names = [p.name for p in (tmp_path / "tokens").iterdir()]
    assert sum(n.startswith("vocab-") for n in names) == 2  # two tokenizers
    assert sum(n.startswith("table-") for n in names) == 3  # and three id sets
    # A file under the right name whose stored key differs is rebuilt (never trusted).
    from trp.grammar import token_cache

    path = next((tmp_path / "tokens").glob("table-*"))
    tensors, fields = token_cache.load_entry(tmp_path / "tokens", "x", "x") or ({}, {})
    assert not tensors and not fields
    from safetensors.torch import load_file, save_file

    saved = load_file(str(path))
    save_file(saved, str(path), metadata={"format": token_cache.FORMAT, "key": "0", "fields": "{}"})
    rebuilt = constrained.prepare_tokens(
        _fresh_tokenizer(), eos_token_id=tok.eos_token_id, cache_dir=tmp_path
    )
    _same_table(rebuilt, base)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_fields"])
def test_disk_cache_corrupt_file_warns_and_rebuilds(tmp_path, damage: str) -> None:
    from trp.grammar import constrained

    tok = _fresh_tokenizer()
    ref = constrained.prepare_tokens(tok, eos_token_id=tok.eos_token_id, cache_dir=tmp_path)
    for path in (tmp_path / "tokens").iterdir():
        data = path.read_bytes()
        if damage == "garbage":
            path.write_bytes(b"\x00not a safetensors file" * 3)
        elif damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            # A readable file whose tensors do not fit: cut every tensor in half.
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k)[: len(f.get_tensor(k)) // 2] for k in f.keys()}  # noqa: SIM118
            save_file(tensors, str(path), metadata=meta)
    with pytest.warns(RuntimeWarning, match="token cache"):
        table = constrained.prepare_tokens(
            _fresh_tokenizer(), eos_token_id=tok.eos_token_id, cache_dir=tmp_path
        )
    _same_table(table, ref)
    # The rebuilt files were written back (atomically: no temporary file is left).
    names = sorted(p.name for p in (tmp_path / "tokens").iterdir())
    assert len(names) == 2 and not any(n.endswith(".tmp") for n in names)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = constrained.prepare_tokens(
            _fresh_tokenizer(), eos_token_id=tok.eos_token_id, cache_dir=tmp_path
        )
    _same_table(again, ref)


def test_disk_cache_can_be_turned_off(tmp_path, monkeypatch) -> None:
    from trp.grammar import constrained

    tok = _fresh_tokenizer()
    constrained.prepare_tokens(tok, eos_token_id=tok.eos_token_id, cache_dir=False)
    monkeypatch.setenv("TRP_CACHE_DIR", "")
    constrained.prepare_tokens(_fresh_tokenizer(), eos_token_id=tok.eos_token_id)
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path / "env"))
    constrained.prepare_tokens(_fresh_tokenizer(), eos_token_id=tok.eos_token_id)
    assert len(list((tmp_path / "env" / "tokens").iterdir())) == 2
    assert not (tmp_path / "tokens").exists()


def test_disk_cache_misses_when_the_code_that_computes_it_changes(tmp_path, monkeypatch) -> None:
    from trp.grammar import constrained

    tok = _fresh_tokenizer()
    ref = constrained.prepare_tokens(tok, eos_token_id=tok.eos_token_id, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 2
    monkeypatch.setattr(constrained, "_CODE", {"vocab": "another", "table": "version"})
    again = constrained.prepare_tokens(
        _fresh_tokenizer(), eos_token_id=tok.eos_token_id, cache_dir=tmp_path
    )
    _same_table(again, ref)
    assert len(list((tmp_path / "tokens").iterdir())) == 4  # both entries rebuilt, none reused
