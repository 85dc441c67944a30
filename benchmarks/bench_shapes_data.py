"""Throughput of the synthetic referring-scene generator (``trp.data.ShapesDataset``).

    python benchmarks/bench_shapes_data.py [--quick] [--image-size 128]

Generates samples of every task on one core (``torch.set_num_threads(1)``, main process, the
way one DataLoader worker runs), timing blocks of consecutive indices, and reports the best
block (as ``timeit`` does: other processes only ever slow a block down, so the fastest is the
best estimate of the code's own cost) and the median block. Rates are given from the process's
CPU time, which is what one core delivers even when other processes share the machine, and
from wall-clock time, which equals it on an idle machine. Writes
``benchmarks/results/shapes_data[.quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    cpu, wall = [], []
    for r in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for i in range(r * samples, (r + 1) * samples):
            ds[i]
        cpu.append(samples / max(time.process_time() - start_cpu, 1e-9))
        wall.append(samples / (time.perf_counter() - start_wall))
    return {
        "task": task,
        "image_size": image_size,
        "samples_per_block": samples,
        "blocks": repeats,
        "cpu_best_samples_per_s": max(cpu),
        "cpu_median_samples_per_s": statistics.median(cpu),
        "wall_best_samples_per_s": max(wall),
        "wall_median_samples_per_s": statistics.median(wall),
        "best_us_per_sample": 1e6 / max(cpu),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | image | CPU samples/s best | CPU median | wall best | wall median "
        "| µs/sample (CPU best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['image_size']}² | {r['cpu_best_samples_per_s']:.0f} | "
            f"{r['cpu_median_samples_per_s']:.0f} | {r['wall_best_samples_per_s']:.0f} | "
            f"{r['wall_median_samples_per_s']:.0f} | {r['best_us_per_sample']:.0f} |"
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
    slowest = min(r["cpu_best_samples_per_s"] for r in rows)
    verdict = "meets" if slowest >= TARGET_SAMPLES_PER_S else "misses"
    print(f"\nslowest task: {slowest:.0f} samples/s (CPU time, best block), {verdict} the "
          f"{TARGET_SAMPLES_PER_S:.0f}/s target")
    RESULTS.mkdir(exist_ok=True)
    stem = "shapes_data.quick" if args.quick else "shapes_data"
    meta = {"benchmark": "shapes_data", "quick": args.quick, "threads": 1,
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "target_samples_per_s": TARGET_SAMPLES_PER_S,
            # Other processes slow wall-clock rates down; the load says how busy the machine was.
            "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(
        f"# ShapesDataset throughput (1 thread, load average {meta['load_average_1min']:.1f} "
        f"on {meta['cpus']} CPUs)\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
