"""Benchmark TRP parsing: 10k typical answers, as strings and as token ids.

Usage: ``python benchmarks/bench_grammar.py [--quick]``. Prints a markdown table and writes
``benchmarks/results/grammar.json`` (``grammar.quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from trp.grammar import (
    TokenVocab,
    format_detection,
    format_grounded_caption,
    format_rec,
    format_vqa,
    parse,
    parse_ids,
)

WORDS = ("person", "dog", "cat", "car", "red", "left", "cup", "tree", "the", "small")


def typical_answers(n: int, seed: int = 0) -> list[str]:
    """A mix of task families, both target kinds, a third with task blocks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        vrt = rng.random() < 0.5
        task = rng.random() < 0.33
        if kind == 0:
            k = rng.randint(1, 6)
            cats = [rng.choice(WORDS[:8]) for _ in range(k)]
            runs = [rng.sample(range(256), rng.randint(1, 5)) for _ in range(k)] if vrt else None
            out.append(
                format_detection(list(zip(cats, range(k))), patches=runs, task_block=task).text
            )
        elif kind == 1:
            expr = " ".join(rng.sample(WORDS, 3))
            runs = rng.sample(range(256), 5) if vrt else None
            out.append(format_rec(expr, patches=runs, task_block=task).text)
        elif kind == 2:
            out.append(
                format_grounded_caption(
                    "A small dog sits next to a red car on the left.", [(8, 11, [0]), (26, 33, [1])]
                ).text
            )
        else:
            out.append(format_vqa("There are three cups on the table.", task_block=task).text)
    return out


def byte_vocab() -> TokenVocab:
    """A stand-in vocabulary: one token per byte plus the TRP tags (what matters for parsing
    cost is tokens per answer; a real BPE has fewer, so this is pessimistic)."""
    from trp.grammar import TRP_SPECIAL_TOKENS

    pieces = [chr(b) for b in range(256)] + list(TRP_SPECIAL_TOKENS)
    return TokenVocab(pieces=pieces, vrt_base=len(pieces))


def encode(text: str, vocab: TokenVocab) -> list[int]:
    import re

    special = {p: i for i, p in enumerate(vocab.pieces) if len(p) > 1}
    ids: list[int] = []
    rx = re.compile("|".join(re.escape(s) for s in special) + r"|<\|VRT_(\d+)\|>")
    pos = 0
    for m in rx.finditer(text):
        ids.extend(text[pos : m.start()].encode())
        ids.append(vocab.vrt_base + int(m.group(1)) if m.group(1) else special[m.group(0)])
        pos = m.end()
    ids.extend(text[pos:].encode())
    return ids


def timeit(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1k answers, 2 repeats (CI)")
    args = ap.parse_args()
    n, repeats = (1000, 2) if args.quick else (10_000, 5)
    torch.set_num_threads(1)
    texts = typical_answers(n)
    vocab = byte_vocab()
    ids = [encode(t, vocab) for t in texts]
    # Correctness before timing: the id path must read exactly what the string path reads.
    for t, i in zip(texts[:200], ids[:200]):
        assert parse_ids(i, vocab=vocab).triplets == parse(t).triplets
    rows = []
    cases = [
        ("strings, strict", lambda: [parse(t) for t in texts]),
        ("strings, lenient", lambda: [parse(t, strict=False) for t in texts]),
        ("token ids, strict", lambda: [parse_ids(i, vocab=vocab) for i in ids]),
    ]
    for name, fn in cases:
        fn()  # warm-up
        times = timeit(fn, repeats)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        rows.append(
            {
                "case": name,
                "answers": n,
                "median_s": statistics.median(times),
                "iqr_s": q[2] - q[0],
                "us_per_answer": statistics.median(times) / n * 1e6,
            }
        )
    mean_chars = sum(map(len, texts)) / n
    mean_ids = sum(map(len, ids)) / n
    print(f"\n{n} answers, {mean_chars:.0f} chars / {mean_ids:.0f} ids on average, 1 thread\n")
    print("| case | answers | median (s) | IQR (s) | µs / answer |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['answers']} | {r['median_s']:.3f} | {r['iqr_s']:.3f} "
            f"| {r['us_per_answer']:.1f} |"
        )
    out = (
        Path(__file__).parent / "results" / ("grammar.quick.json" if args.quick else "grammar.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "grammar",
                "python": platform.python_version(),
                "machine": platform.machine(),
                # Other jobs share the machine at times: the 1-minute load average says how much.
                "load_average_1min": os.getloadavg()[0],
                "cpu_count": os.cpu_count(),
                "mean_chars": mean_chars,
                "mean_ids": mean_ids,
                "results": rows,
            },
            indent=2,
        )
    )
    lines = [
        "### grammar (parse)",
        "",
        f"{n} answers, {mean_chars:.0f} chars / {mean_ids:.0f} ids on average, 1 thread, "
        f"median of {repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
        "| case | answers | median (s) | IQR (s) | µs / answer |",
        "|---|---|---|---|---|",
        *(
            f"| {r['case']} | {r['answers']} | {r['median_s']:.3f} | {r['iqr_s']:.3f} "
            f"| {r['us_per_answer']:.1f} |"
            for r in rows
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
