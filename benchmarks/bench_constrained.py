"""Benchmark grammar-constrained decoding (``TRPLogitsProcessor``) at real vocabulary sizes.

Byte-level BPE tokenizers of 2k, 32k and 150k tokens are trained offline on generated text
(cached under ``~/.cache/trp/bench_tokenizers``), with Qwen2.5-VL's special tokens and the TRP
tokens added. Typical answers (a VRT run, two ``<REF>`` triplets, a grounded caption) are
teacher-forced through the processor, one ``generate``-like call per repetition with a fresh
processor, at several batch sizes (the input ids grow by one column per step as ``generate``
builds them, a new tensor each step). Reported: the median time of a decoding step (and per
generated token: step / batch), the first step of a call, and the one-time preparation per
tokenizer — cold (reading every token, then saved to the disk cache) and from the disk cache (a
later process). When ``xgrammar`` is installed (``pip install trp[bench]``) the same answers go
through its matcher on an equivalent EBNF (free text without ``<``; it cannot express own-image
VRTs, unrepeated patches, slot numbering or the length budget, so its task is easier); it masks
in place, so it compares with trp's in-place mode, and "xgrammar + copy" (the scores cloned
first, as when the raw logits are kept) with trp's copy mode.

Usage: ``python benchmarks/bench_constrained.py [--quick]``; writes
``benchmarks/results/constrained.json`` and ``.md`` (``constrained.quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trp.grammar import TokenVocab, TRPLogitsProcessor, add_trp_tokens, encode_text
from trp.grammar.constrained import prepare_tokens, vocab_of

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trp" / "bench_tokenizers"
NUM_VRT = 256
REPEATS = 15  # calls per side and row (sides alternate call by call)
QWEN_SPECIALS = (
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
ANSWERS = (
    "The <Phrase>black dog on the left</Phrase>(<Unit>box</Unit><|VRT_12|><|VRT_13|><|VRT_28|>)"
    " is sleeping next to the sofa.",
    "<Phrase>person</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>), "
    "<Phrase>dog</Phrase>(<Unit>mask</Unit>[0]<REF>).",
    "A <Phrase>man</Phrase>(<Unit>box</Unit>[0]<REF>) walks <Phrase>two dogs</Phrase>"
    "(<Unit>box</Unit>[0]<REF>[1]<REF>) along the river, under a cloudy sky.",
)

EBNF = r"""
root ::= (text | triplet)*
text ::= [^<]+
triplet ::= "<Phrase>" [^<]+ "</Phrase>" "(<Unit>" unit "</Unit>" target (", "? target)* ")"
unit ::= "box" | "mask" | "keypoint" | "depth"
target ::= "[" [0-9]+ "]<REF>" | vrt+
vrt ::= "<|VRT_" [0-9]+ "|>"
"""


# ------------------------------------------------------------------------------------ data
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "st"]


def _text_corpus(words: int, kinds: int, seed: int = 0) -> list[str]:
    """Generated prose: Zipf-distributed pseudo-words, numbers, punctuation, some code-like
    text with ``<`` (real vocabularies have such tokens, and they are the ones to probe)."""
    rng = random.Random(seed)
    lexicon = sorted(
        {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(kinds)}
    )
    # Cumulative weights once: ``choices(weights=…)`` would re-sum them on every call.
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(lexicon))))
    lines = []
    for _ in range(words // 12):
        ws = rng.choices(lexicon, cum_weights=cum, k=12)
        if rng.random() < 0.3:
            ws[rng.randrange(12)] = str(rng.randrange(10_000))
        line = " ".join(ws).capitalize() + rng.choice([".", ",", "?", "!", ";", ":"])
        if rng.random() < 0.05:
            line += rng.choice([" <div>", " </span>", " a<b", " x <= y", " <br/>", " <<", " ->"])
        lines.append(line)
    return lines


def bpe_tokenizer(size: int):
    """A byte-level BPE tokenizer with about ``size`` tokens (trained once, then cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = CACHE / f"bpe_{size}.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        kinds = max(2000, size * 3)
        tok.train_from_iterator(_text_corpus(words=max(200_000, size * 25), kinds=kinds), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    specials = [t for t in QWEN_SPECIALS if t not in fast.all_special_tokens]
    fast.add_special_tokens({"additional_special_tokens": specials})
    add_trp_tokens(fast)
    return fast


def _batch(tok, vocab: TokenVocab, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompt + teacher-forced answers ``[rows, P + T]`` (shorter ones end in eos then pad), the
    VRT mask ``[rows, NUM_VRT]`` and the prompt length."""
    prompt = encode_text(tok, "<|im_start|>user\nDescribe the image.<|im_end|>\n")
    answers = [
        encode_text(tok, ANSWERS[r % len(ANSWERS)], vrt_base=vocab.vrt_base) + [tok.eos_token_id]
        for r in range(rows)
    ]
    width = max(map(len, answers))
    ids = torch.full((rows, len(prompt) + width), tok.pad_token_id, dtype=torch.long)
    for r, a in enumerate(answers):
        ids[r, : len(prompt)] = torch.tensor(prompt)
        ids[r, len(prompt) : len(prompt) + len(a)] = torch.tensor(a)
    gen = torch.Generator().manual_seed(rows)
    mask = torch.rand(rows, NUM_VRT, generator=gen) < 0.5
    mask[:, [12, 13, 28]] = True
    return ids, mask, len(prompt)


# ------------------------------------------------------------------------------------ timing
def _trp_call(tok, vocab, ids, mask, prompt_len, scores, inplace: bool = False) -> list[float]:
    """One ``generate``-like call: a fresh processor fed step by step; seconds per step."""
    eos = tok.eos_token_id
    proc = TRPLogitsProcessor(
        tokenizer=tok,
        eos_token_id=eos,
        vrt_mask=mask,
        vocab=vocab,
        max_new_tokens=ids.shape[1] - prompt_len + 8,
        inplace=inplace,
    )
    times = []
    cur = ids[:, :prompt_len].clone()
    for t in range(prompt_len, ids.shape[1]):
        logits = scores.clone() if inplace else scores  # in place writes into it: not timed
        t0 = time.perf_counter()
        out = proc(cur, logits)
        times.append(time.perf_counter() - t0)
        nxt = ids[:, t]
        done = ids[:, prompt_len:t].eq(eos).any(1)
        # The teacher-forced token must be allowed (else the answers or the processor are wrong).
        assert bool(torch.isfinite(out.gather(1, nxt[:, None])).squeeze(1)[~done].all())
        cur = torch.cat([cur, nxt[:, None]], dim=1)  # as generate: a new tensor each step
    return times


def _prepare(size: int, cache_dir: str) -> float:
    """Seconds to read a fresh tokenizer object's token texts and classes (memory caches empty;
    the disk cache in ``cache_dir`` as it is)."""
    tok = bpe_tokenizer(size)
    t0 = time.perf_counter()
    vocab = vocab_of(tok, cache_dir=cache_dir)
    prepare_tokens(tok, eos_token_id=tok.eos_token_id, vocab=vocab, cache_dir=cache_dir)
    return time.perf_counter() - t0


def _xgrammar_setup(vocab: TokenVocab, eos: int):
    import xgrammar as xgr

    t0 = time.perf_counter()
    encoded = [p.encode("latin-1") for p in vocab.pieces]
    encoded += [f"<|VRT_{k}|>".encode() for k in range(NUM_VRT)]
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(EBNF)
    return compiled, time.perf_counter() - t0


def _xgrammar_call(compiled, ids, prompt_len, scores, eos: int, copy: bool = False) -> list[float]:
    import xgrammar as xgr

    rows = ids.shape[0]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, scores.shape[1])
    times = []
    logits = None
    for t in range(prompt_len, ids.shape[1]):
        if not copy:
            logits = scores.clone()  # in place writes into it: not timed
        t0 = time.perf_counter()
        if copy:
            # Keeping the raw scores, as trp's copy mode does (the last output is still held
            # while the next is made, as in generate and in _trp_call).
            logits = scores.clone()
        for r, m in enumerate(matchers):
            if t > prompt_len and not m.is_terminated():
                assert m.accept_token(int(ids[r, t - 1]))
            if not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, r)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        times.append(time.perf_counter() - t0)
        for r in range(rows):
            tok = int(ids[r, t])
            if not matchers[r].is_terminated() and tok != eos:
                assert torch.isfinite(logits[r, tok])
    return times


def _summary(calls: list[list[float]], rows: int) -> dict:
    steps = [s for c in calls for s in c[1:]]
    return {
        "step_ms": statistics.median(steps) * 1e3,
        "step_p90_ms": statistics.quantiles(steps, n=10)[-1] * 1e3,
        "token_ms": statistics.median(steps) * 1e3 / rows,
        "first_ms": statistics.median(c[0] for c in calls) * 1e3,
        "steps": len(steps),
    }


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    sizes = (2_000, 32_000) if quick else (2_000, 32_000, 150_000)
    batches = (1, 16) if quick else (1, 4, 16)
    repeats = 2 if quick else REPEATS
    try:
        import xgrammar  # noqa: F401

        have_xgr = True
    except ImportError:
        have_xgr = False
        print("xgrammar is not installed (pip install trp[bench]): no comparison")
    rows_out = []
    for size in sizes:
        t0 = time.perf_counter()
        bpe_tokenizer(size)  # train or load the cached one (not part of the preparation)
        train_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as cache_dir:
            tokens_s = _prepare(size, cache_dir)  # cold: built, then saved to the disk cache
            disk_s = statistics.median(_prepare(size, cache_dir) for _ in range(3))
        tok = bpe_tokenizer(size)  # a fresh object: nothing of it is cached yet
        vocab = vocab_of(tok, cache_dir=False)
        prepare_tokens(tok, eos_token_id=tok.eos_token_id, vocab=vocab, cache_dir=False)
        ids, mask, prompt_len = _batch(tok, vocab, max(batches))
        scores_all = torch.randn(ids.shape[0], vocab.vrt_base + NUM_VRT)
        # Cold: a call with empty per-state tables (each new state is probed on the way).
        cold = _trp_call(tok, vocab, ids[:1], mask[:1], prompt_len, scores_all[:1])
        t0 = time.perf_counter()
        warm = TRPLogitsProcessor(
            tokenizer=tok, eos_token_id=tok.eos_token_id, vrt_mask=mask, vocab=vocab
        )
        states = warm.warm(ANSWERS)
        warm_s = time.perf_counter() - t0
        xgr_compiled = None
        xgr_prep = None
        if have_xgr:
            xgr_compiled, xgr_prep = _xgrammar_setup(vocab, tok.eos_token_id)
        for rows in batches:
            sub = (ids[:rows], mask[:rows], prompt_len, scores_all[:rows])
            # The sides alternate call by call, so load from other processes hits them alike.
            calls, in_place, xcalls, xcopy = [], [], [], []
            for _ in range(repeats):
                calls.append(_trp_call(tok, vocab, *sub))
                in_place.append(_trp_call(tok, vocab, *sub, inplace=True))
                if xgr_compiled is not None:
                    x_args = (xgr_compiled, ids[:rows], prompt_len, sub[3], tok.eos_token_id)
                    xcalls.append(_xgrammar_call(*x_args))
                    xcopy.append(_xgrammar_call(*x_args, copy=True))
            row = {
                "vocab": len(tok),
                "batch": rows,
                "trp": _summary(calls, rows),
                "trp_inplace": _summary(in_place, rows),
                "prepare_s": {
                    "tokens": tokens_s,
                    "tokens_disk_cached": disk_s,
                    "warm_states": warm_s,
                    "states": states,
                    "tokenizer_training_or_load": train_s,
                },
                "cold_first_ms": cold[0] * 1e3,
                "cold_call_ms": sum(cold) * 1e3,
                "answer_tokens": ids.shape[1] - prompt_len,
                "load_average_1min": os.getloadavg()[0],
            }
            if xgr_compiled is not None:
                row["xgrammar"] = {**_summary(xcalls, rows), "prepare_s": xgr_prep}
                row["xgrammar_copy"] = _summary(xcopy, rows)
            rows_out.append(row)
            print(_line(row), flush=True)
    return {"quick": quick, "rows": rows_out}


_HEAD = (
    "| vocab | batch | trp step ms (p90) | trp ms/token | trp first ms | trp in-place ms/token | "
    "cold first ms | prep s: cold (tokens + states) | prep s: disk cache | "
    "xgrammar step ms | xgrammar ms/token | xgrammar + copy ms/token | xgrammar first ms | "
    "xgrammar prep s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _line(r: dict) -> str:
    t, ti, p = r["trp"], r["trp_inplace"], r["prepare_s"]
    x, xc = r.get("xgrammar"), r.get("xgrammar_copy")
    xs = (
        f"{x['step_ms']:.3f} | {x['token_ms']:.3f} | {xc['token_ms']:.3f} | "
        f"{x['first_ms']:.3f} | {x['prepare_s']:.2f}"
        if x and xc
        else "n/a | n/a | n/a | n/a | n/a"
    )
    return (
        f"| {r['vocab']} | {r['batch']} | {t['step_ms']:.3f} ({t['step_p90_ms']:.3f}) | "
        f"{t['token_ms']:.3f} | {t['first_ms']:.3f} | {ti['token_ms']:.3f} | "
        f"{r['cold_first_ms']:.1f} | "
        f"{p['tokens']:.2f} + {p['warm_states']:.2f} | {p['tokens_disk_cached']:.2f} | {xs} |"
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI: 2k and 32k vocabularies, 2 repeats")
    args = ap.parse_args()
    result = run(args.quick)
    result["meta"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "threads": 1,
        "date": time.strftime("%Y-%m-%d"),
        "num_vrt": NUM_VRT,
        # Other jobs share the machine at times: the 1-minute load average says how much.
        "load_average_1min": os.getloadavg()[0],
    }
    stem = "constrained.quick" if args.quick else "constrained"
    loads = [r["load_average_1min"] for r in result["rows"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = [
        "### constrained decoding (TRPLogitsProcessor)",
        "",
        f"CPU: {result['meta']['cpu']} ({os.cpu_count()} CPUs, 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} from other jobs during the rows), 1 thread, "
        f"{NUM_VRT} VRTs; medians over "
        f"{2 if args.quick else REPEATS} calls of the teacher-forced answers. 'step': one "
        "processor call for the whole batch; 'ms/token': step / batch; 'first': the first step "
        "of a call once the tokenizer is prepared; 'cold first': the same with empty per-state "
        "tables; 'in-place': scores masked in place (model.generate's default), else a copy "
        "(kept raw logits). 'prep cold': a fresh tokenizer's token texts and classes built and "
        "saved to the disk cache; 'disk cache': the same loaded in a later process (fresh "
        "tokenizer object). xgrammar: matcher accept + fill per row and "
        "apply_token_bitmask_inplace (in place, so it compares with trp in-place; '+ copy' "
        "clones the scores first, as trp's copy mode), on an easier EBNF (no own-image VRTs, "
        "repeats, slot numbers or length budget).",
        "",
        _HEAD,
        *(_line(r) for r in result["rows"]),
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {RESULTS / stem}.json/.md")


if __name__ == "__main__":
    main()
