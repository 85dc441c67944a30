"""Shared benchmark harness: fused op vs eager reference, time and peak memory.

A benchmark module (``benchmarks/bench_<op>.py``) defines

* ``OP`` (str) and ``cases(quick: bool) -> list[dict]``: the sizes to run;
* ``make_inputs(case: dict, mode: str) -> dict``: seeded inputs (``mode`` is ``"forward"`` or
  ``"forward+backward"``; the latter makes leaf tensors that require grad);
* ``SIDES: dict[str, Callable[..., Tensor | tuple]]``: ``"eager"`` and ``"fused"`` callables taking
  the inputs as keyword arguments; a side returning several tensors is reduced by summing; any
  further side (e.g. another library's implementation) is timed too and reported as the
  ``vs <side>`` speed-up of the fused one;
* optionally ``MODES`` (default both) and ``check(case) -> float``: max abs error fused vs eager.

Timing (:func:`time_interleaved`) alternates the sides block by block with
``torch.utils.benchmark.Timer`` at 1 and 2 threads and reports each side's median and IQR over
its blocks, so a load spike from other processes hits every side alike. Peak memory is
the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over one call,
measured in a fresh subprocess with glibc's mmap threshold pinned so freed tensors leave the
process: what a user sees as the process growing.

Every result records the CPU model (``lscpu``) and the instruction sets the run used: trp's CPU
kernels (``trp.ops.cpu_capability()``), ATen's, and the ``ATEN_CPU_CAPABILITY`` /
``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS`` limits in force (to measure an AVX2 machine on
an AVX-512 one, set all three to AVX2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import benchmark

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "forward+backward")


def machine() -> dict:
    """The CPU and the instruction sets in use, recorded with every result
    (:func:`trp.machine.machine`)."""
    from trp.machine import machine as describe

    return describe()


def machine_line(meta: dict) -> str:
    limits = ", ".join(f"{k}={v}" for k, v in meta.get("isa_limits", {}).items()) or "none"
    return (
        f"CPU: {meta.get('cpu_model')}; CPU kernels: trp {meta.get('trp_cpu_capability')}, "
        f"ATen {meta.get('aten_cpu_capability')}; instruction-set limits: {limits}; "
        f"torch {meta.get('torch')}, {meta.get('cpu_count')} CPUs."
    )


def load_module(path: str | Path) -> ModuleType:
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _reduce(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(o.float().sum() for o in out if isinstance(o, torch.Tensor))


def make_call(fn: Callable, inputs: dict, mode: str) -> Callable[[], None]:
    """A zero-argument closure running one forward (or forward+backward) of ``fn``."""
    if mode == "forward":

        def call() -> None:
            with torch.no_grad():
                fn(**inputs)

        return call
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def call_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        _reduce(fn(**inputs)).backward()

    return call_backward


def time_interleaved(
    calls: dict[str, Callable[[], None]], threads: int, min_run_time: float, label: str = ""
) -> dict[str, benchmark.Measurement]:
    """Each side's per-call time over blocks run in turn (side A, side B, ..., A, B, ...).

    A block repeats a side's call enough times to last about ``min_run_time / 10`` (once for a
    slow call); each side takes part in the rounds until it has run ``min_run_time`` and at least
    3 blocks.
    """
    timers = {
        side: benchmark.Timer(
            stmt="call()",
            globals={"call": call},
            num_threads=threads,
            label=label,
            description=side,
        )
        for side, call in calls.items()
    }
    number = {}
    for side, timer in timers.items():
        once = timer.timeit(1).median  # also the warm-up
        number[side] = max(1, int(min_run_time / 10 / max(once, 1e-9)))
    blocks: dict[str, list[benchmark.Measurement]] = {side: [] for side in timers}
    spent = dict.fromkeys(timers, 0.0)

    def needs_more(side: str) -> bool:
        return spent[side] < min_run_time or len(blocks[side]) < 3

    while any(needs_more(side) for side in timers):
        for side, timer in timers.items():
            if not needs_more(side):
                continue  # a slow side stops once it has its time; the others go on in turn
            m = timer.timeit(number[side])
            blocks[side].append(m)
            spent[side] += m.median * number[side]
    return {side: benchmark.Measurement.merge(ms)[0] for side, ms in blocks.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _measure_memory_here(module_path: str, side: str, mode: str, case: dict) -> int:
    module = load_module(module_path)
    torch.set_num_threads(1)
    inputs = module.make_inputs(case, mode)
    call = make_call(module.SIDES[side], inputs, mode)
    call()  # warm-up: lazy initialisation is not the op's memory
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    call()
    return max(0, _status_kb("VmHWM") - before) * 1024


def peak_memory(module_path: str, side: str, mode: str, case: dict) -> int | None:
    """Peak process growth in bytes of one call, in a fresh subprocess (None if unsupported)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        __file__,
        "--memory",
        str(module_path),
        side,
        mode,
        json.dumps(case),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


_RSS_RESOLUTION = 2**20


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _fmt_mb(value: int | None) -> str:
    if value is None:
        return "n/a"
    return "<1" if value < _RSS_RESOLUTION else f"{value / 2**20:.1f}"


def case_label(case: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


def run(
    module_path: str | Path,
    quick: bool,
    threads: tuple[int, ...] = (1, 2),
    only: str | None = None,
) -> list[dict]:
    """Benchmark every case of a module (those whose label contains ``only``, if given); write
    results/<op>[.quick].json and .md; return rows."""
    module = load_module(module_path)
    # A module may ask for longer timing (MIN_RUN_TIME): small differences between sides.
    min_run_time = 0.2 if quick else getattr(module, "MIN_RUN_TIME", 1.0)
    modes = getattr(module, "MODES", MODES)
    rows = []
    for case in module.cases(quick):
        if only is not None and only not in case_label(case):
            continue
        error = module.check(case) if hasattr(module, "check") else None
        for mode in modes:
            memory = {
                side: peak_memory(str(module_path), side, mode, case) for side in module.SIDES
            }
            for n in threads:
                torch.set_num_threads(n)
                inputs = module.make_inputs(case, mode)
                calls = {side: make_call(fn, inputs, mode) for side, fn in module.SIDES.items()}
                timings = time_interleaved(calls, n, min_run_time, module.OP)
                eager, fused = timings["eager"], timings["fused"]
                row = {
                    "op": module.OP,
                    "case": case,
                    "mode": mode,
                    "threads": n,
                    "eager_median_s": eager.median,
                    "eager_iqr_s": eager.iqr,
                    "fused_median_s": fused.median,
                    "fused_iqr_s": fused.iqr,
                    "speedup": eager.median / fused.median,
                    "eager_peak_bytes": memory["eager"],
                    "fused_peak_bytes": memory["fused"],
                    "max_abs_error": error,
                }
                for side in _others(module.SIDES):
                    row[f"{side}_median_s"] = timings[side].median
                    row[f"{side}_iqr_s"] = timings[side].iqr
                    row[f"{side}_peak_bytes"] = memory[side]
                    row[f"speedup_vs_{side}"] = timings[side].median / fused.median
                rows.append(row)
                print(_row_markdown(rows[-1]), flush=True)
    write(module.OP, rows, quick)
    return rows


_HEADER = (
    "| case | mode | threads | eager ms (IQR) | fused ms (IQR) | speed-up | eager peak MB | "
    "fused peak MB | memory ratio | max abs err |"
)


def _others(sides) -> list[str]:
    return [s for s in sides if s not in ("eager", "fused")]


def _row_others(r: dict) -> list[str]:
    return [k[len("speedup_vs_") :] for k in r if k.startswith("speedup_vs_")]


def _row_markdown(r: dict) -> str:
    case = case_label(r["case"])
    eager_peak, fused_peak = r["eager_peak_bytes"], r["fused_peak_bytes"]
    if eager_peak is None or fused_peak is None:
        ratio = "n/a"
    elif fused_peak < _RSS_RESOLUTION:
        # RSS growth below ~1 MiB is lost in page-level noise: report a bound, not a ratio.
        ratio = f">{eager_peak / _RSS_RESOLUTION:.0f}x"
    else:
        ratio = f"{eager_peak / fused_peak:.1f}x"
    err = "" if r["max_abs_error"] is None else f"{r['max_abs_error']:.1e}"
    others = "".join(
        f" {_fmt_ms(r[f'{o}_median_s'])} | {r[f'speedup_vs_{o}']:.2f}x |" for o in _row_others(r)
    )
    return (
        f"| {case} | {r['mode']} | {r['threads']} | {_fmt_ms(r['eager_median_s'])} "
        f"({_fmt_ms(r['eager_iqr_s'])}) | {_fmt_ms(r['fused_median_s'])} "
        f"({_fmt_ms(r['fused_iqr_s'])}) | {r['speedup']:.2f}x | {_fmt_mb(r['eager_peak_bytes'])} "
        f"| {_fmt_mb(r['fused_peak_bytes'])} | {ratio} | {err} |{others}"
    )


def to_markdown(op: str, rows: list[dict], meta: dict | None = None) -> str:
    others = _row_others(rows[0]) if rows else []
    header = _HEADER + "".join(f" {o} ms | vs {o} |" for o in others)
    rule = "|" + "---|" * header.count(" |")
    lines = [f"### {op}", ""]
    if meta is not None:
        lines += [machine_line(meta), ""]
    lines += [header, rule, *(_row_markdown(r) for r in rows)]
    return "\n".join(lines) + "\n"


def write(op: str, rows: list[dict], quick: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{op}.quick" if quick else op
    meta = {
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        **machine(),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(to_markdown(op, rows, meta))
    print(f"\n{to_markdown(op, rows, meta)}\nwrote {RESULTS / stem}.json/.md")


def main(module_path: str) -> None:
    parser = argparse.ArgumentParser(description=f"benchmark {Path(module_path).stem}")
    parser.add_argument("--quick", action="store_true", help="CI mode: few sizes, short timing")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--only",
        default=None,
        help="run the cases whose label contains this, e.g. 'V=151936, D=512'",
    )
    args = parser.parse_args()
    run(module_path, args.quick, tuple(args.threads), args.only)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        _, _, path, side_name, mode_name, case_json = sys.argv
        print(_measure_memory_here(path, side_name, mode_name, json.loads(case_json)))
    else:
        raise SystemExit("usage: import benchmarks._harness, or --memory PATH SIDE MODE CASE")
