"""Throughput of the synthetic referring-scene generator (``trp.data.ShapesDataset``).

    python benchmarks/bench_shapes_data.py [--quick] [--image-size 128]

Generates samples of every task on one core (``torch.set_num_threads(1)``, main process, the
way one DataLoader worker runs), timing blocks of consecutive indices. It reports the best
block (as ``timeit`` does: other processes only ever slow a block down, so the fastest is the
best estimate of the code's own cost) and the median block, from wall-clock time. Writes
``benchmarks/results/shapes_data[.quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from trp.data import TASKS, ShapesDataset

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SAMPLES_PER_S = 1000.0


def measure(task: str, image_size: int, samples: int, repeats: int) -> dict:
    ds = ShapesDataset(num_samples=samples * repeats + 10, seed=0, image_size=image_size, task=task)
    for i in range(10):  # warm-up: imports, numpy dispatch caches
        ds[samples * repeats + i]
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(r * samples, (r + 1) * samples):
            ds[i]
        rates.append(samples / (time.perf_counter() - start))
    return {
        "task": task,
        "image_size": image_size,
        "samples_per_block": samples,
        "blocks": repeats,
        "best_samples_per_s": max(rates),
        "median_samples_per_s": statistics.median(rates),
        "best_us_per_sample": 1e6 / max(rates),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | image | samples/s (best) | samples/s (median) | µs/sample (best) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['image_size']}² | {r['best_samples_per_s']:.0f} | "
            f"{r['median_samples_per_s']:.0f} | {r['best_us_per_sample']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI mode: fewer samples")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples, repeats = (100, 5) if args.quick else (500, 10)
    rows = [measure(task, args.image_size, samples, repeats) for task in TASKS]
    table = markdown(rows)
    print(table)
    slowest = min(r["best_samples_per_s"] for r in rows)
    verdict = "meets" if slowest >= TARGET_SAMPLES_PER_S else "misses"
    print(f"\nslowest task: {slowest:.0f} samples/s (best block), {verdict} the "
          f"{TARGET_SAMPLES_PER_S:.0f}/s target")
    RESULTS.mkdir(exist_ok=True)
    stem = "shapes_data.quick" if args.quick else "shapes_data"
    meta = {"benchmark": "shapes_data", "quick": args.quick, "threads": 1,
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "target_samples_per_s": TARGET_SAMPLES_PER_S}
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(f"# ShapesDataset throughput (1 thread)\n\n{table}\n")


if __name__ == "__main__":
    main()
