"""Training-step memory of the VRT token loss at Qwen2.5-VL-3B's text sizes: trp vs PaDT-style.

    python benchmarks/bench_vrt_loss_memory.py [--quick] [--threads 2]

One training step of the token loss = forward + backward of the loss with respect to the LM's
last hidden states, the LM head weight (tied embeddings, ``[V, D]``) and the VRT rows:

* ``trp`` — :func:`trp.vrt.vrt_token_loss` → :func:`trp.ops.vrt_linear_cross_entropy`, which
  streams vocabulary blocks and never holds the ``[N, V + P]`` logits;
* ``padt`` — PaDT's way: per sample, concatenate the text table with that image's VRT rows
  (``cat(W, P_s)``, a copy of the table), materialise the ``[N_s, V + P_s]`` logits of the answer
  tokens, then ``F.cross_entropy``. (HF models compute logits at every position, prompt
  included; restricting them to the answer tokens makes this a lower bound of PaDT's memory.)

Memory is counted exactly, two ways, both in bytes of tensor storage (what ``at::empty`` asks
the CPU allocator for; the allocator's own rounding and the process's other memory excluded):

* ``allocator`` — a real step under ``torch.profiler`` with ``profile_memory=True``: c10's CPU
  allocator reports every allocation and free with its running total; the peak of that total
  during the step minus the total before it. Exact for everything, including the fused kernel's
  internal buffers, but it needs the memory for real.
* ``fake`` — the same step under ``FakeTensorMode`` with a dispatch mode that adds each op
  output's storage bytes when it appears and subtracts them when its storage dies: exact for
  paths made of ATen ops (every byte they hold is some op's output), nothing allocated, so it
  measures the PaDT path at full size (it would need > 6 GB here). It cannot see inside a
  fused kernel, so the trp path is measured with ``allocator`` only. Where both run (the
  smaller cases) the benchmark asserts the two methods agree on the PaDT path.

Peaks are of one step with the inputs (hidden states, W, VRT rows) already allocated: they
include the gradients of W, the hidden states and the VRT rows (``W.grad`` alone is 1.24 GB at
V = 151,936, D = 2048), which every path needs. Time: ``torch.utils.benchmark`` where both sides
fit in memory; at full size one timed trp step (the PaDT side does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # the benchmarks' shared conventions (RESULTS)
from trp.vrt import ImageBinding, vrt_token_loss

OP = "vrt_loss_memory"
RESULTS = _harness.RESULTS
MODES = ("forward+backward",)
# Qwen2.5-VL-3B's text sizes: hidden 2048, vocabulary 151,936. A 784 x 1008 image (14-pixel
# patches, 2 x 2 merged) gives a 28 x 36 grid = 1008 VRT rows; the prompt = those image tokens
# + 32 text tokens.
QWEN25_VL_3B = {"V": 151936, "D": 2048}
GRID = (28, 36)
PROMPT_TEXT = 32
# Real allocations are refused above this (the benchmark machine is shared; 24 GB).
REAL_LIMIT_BYTES = 6 * 2**30


def cases(quick: bool) -> list[dict[str, Any]]:
    """``B`` samples of ``N`` answer tokens each, vocabulary ``V``, width ``D``, ``P`` VRT rows
    per sample (a ``P``-patch image in the prompt)."""
    if quick:
        return [{"B": 2, "N": 128, "V": 8192, "D": 256, "P": 64}]
    full = GRID[0] * GRID[1]
    return [
        # Both sides fit: the methods are cross-checked and both sides timed.
        {"B": 1, "N": 256, "V": 151936, "D": 1024, "P": full},
        # Qwen2.5-VL-3B's text sizes, 1,024 answer tokens per sample, batch 1 and 2.
        {"B": 1, "N": 1024, **QWEN25_VL_3B, "P": full},
        {"B": 2, "N": 1024, **QWEN25_VL_3B, "P": full},
    ]


def _conversation(case: dict[str, Any]) -> dict[str, Any]:
    """The small, real part of a case's inputs: labels ``[B, L]`` = prompt (image tokens +
    text, label -100) + ``N`` answer tokens, ~10% of them VRT ids (``V + k``, k a patch of the
    sample), and the batch's :class:`ImageBinding`."""
    b, n, v, p = case["B"], case["N"], case["V"], case["P"]
    prompt = p + PROMPT_TEXT
    gen = torch.Generator().manual_seed(0)
    labels = torch.full((b, prompt + n), -100, dtype=torch.int64)
    answer = torch.randint(0, v, (b, n), generator=gen)
    vrt = torch.rand(b, n, generator=gen) < 0.1
    answer[vrt] = v + torch.randint(0, p, (int(vrt.sum()),), generator=gen)
    labels[:, prompt:] = answer
    grids = [list(GRID) if p == GRID[0] * GRID[1] else [1, p]] * b
    binding = ImageBinding.from_grids(grids, [1] * b, vrt_base=v)
    return {"labels": labels, "binding": binding, "prompt": prompt}


def make_inputs(case: dict[str, Any], *, real: bool = True) -> dict[str, Any]:
    """Seeded inputs of one case; ``real=False`` (under ``FakeTensorMode``, with
    :func:`_conversation` made outside it) gives the large tensors as shapes only."""
    b, n, v, d, p = case["B"], case["N"], case["V"], case["D"], case["P"]
    length = p + PROMPT_TEXT + n
    gen = torch.Generator().manual_seed(1)
    if real:
        hidden = torch.randn(b, length, d, generator=gen) * 0.5
        weight = torch.randn(v, d, generator=gen) * 0.02
        rows = torch.randn(b * p, d, generator=gen) * 0.02
    else:
        hidden, weight, rows = torch.empty(b, length, d), torch.empty(v, d), torch.empty(b * p, d)
    return {
        "hidden": hidden.requires_grad_(),
        "text_weight": weight.requires_grad_(),
        "vrt_rows": rows.requires_grad_(),
    }


def trp_loss(hidden, labels, text_weight, vrt_rows, binding, prompt) -> torch.Tensor:
    """trp's path: the fused linear cross-entropy over text ⊕ each sample's own VRT rows."""
    del prompt  # the answer tokens are found from the labels
    return vrt_token_loss(
        hidden, labels, text_weight=text_weight, vrt_rows=vrt_rows, binding=binding
    )


def padt_loss(hidden, labels, text_weight, vrt_rows, binding, prompt) -> torch.Tensor:
    """PaDT-style: per sample ``logits = h @ cat(W, P_s).T`` (materialised), then CE."""
    base = binding.vrt_base
    offsets = binding.sample_offsets.tolist()
    total, count = hidden.new_zeros(()), 0
    for s in range(hidden.shape[0]):
        # Position t predicts token t + 1: the answer tokens prompt.. are predicted from prompt-1..
        h = hidden[s, prompt - 1 : -1]
        y = labels[s, prompt:]
        table = torch.cat([text_weight[:base], vrt_rows[offsets[s] : offsets[s + 1]]])
        logits = h @ table.T  # [N_s, V + P_s]
        total = total + F.cross_entropy(logits.float(), y, reduction="sum")
        count += y.shape[0]
    return total / count


SIDES: dict[str, Callable[..., torch.Tensor]] = {"padt": padt_loss, "trp": trp_loss}


def _step(fn: Callable[..., torch.Tensor], inputs: dict[str, Any]) -> Callable[[], torch.Tensor]:
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def step() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = fn(**inputs)
        loss.backward()
        return loss.detach()

    return step


# --------------------------------------------------------------------------- exact memory
def allocator_peak(step: Callable[[], Any]) -> int:
    """Peak bytes the c10 CPU allocator holds during ``step`` beyond what it held before, from
    the profiler's memory events (one per allocation and free, with its size)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]"),
        key=lambda e: float(e["ts"]),  # the trace is not in time order
    )
    sizes = [int(e["args"]["Bytes"]) for e in memory if int(e["args"].get("Device Type", 0)) == 0]
    if not sizes:
        raise RuntimeError("the profiler reported no CPU memory events")
    # Bytes: + on allocation, - on free; the peak of the running sum is the step's peak.
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return peak


class LiveStorageBytes(TorchDispatchMode):
    """Live bytes of the storages op outputs hold, and their peak: each storage is counted when
    an op first returns it and released when it dies (views share their base's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def ignore(self, tensors: list[torch.Tensor]) -> None:
        """Storages that existed before counting began: views of them cost nothing."""
        for t in tensors:
            self._sizes.setdefault(t.untyped_storage()._cdata, 0)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def fake_peak(fn: Callable[..., torch.Tensor], case: dict[str, Any]) -> int:
    """Peak bytes of one step of ``fn`` beyond its inputs, counted under ``FakeTensorMode``
    (nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    conversation = _conversation(case)  # real: its values decide shapes (answer positions)
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = {**make_inputs(case, real=False), **conversation}
        step = _step(fn, inputs)
        with LiveStorageBytes() as tracker:
            tracker.ignore([t for t in inputs.values() if isinstance(t, torch.Tensor)])
            start = tracker.live
            step()
            del step
        return tracker.peak - start


def real_bytes_needed(case: dict[str, Any], side: str) -> int:
    """A generous bound of what a real step allocates (inputs + the fake-counted step, or for
    trp inputs + gradients + blocks): refuses real runs that would not fit the shared machine."""
    b, n, v, d, p = case["B"], case["N"], case["V"], case["D"], case["P"]
    length = p + PROMPT_TEXT + n
    inputs = 4 * (b * length * d + v * d + b * p * d)
    if side == "padt":
        return inputs + fake_peak(padt_loss, case)
    return 2 * inputs + 4 * (b * n * 4096 * 4 + b * n * d)


# --------------------------------------------------------------------------- the run
def _cpu() -> dict[str, Any]:
    info: dict[str, Any] = {"processor": platform.processor(), "cpu_count": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    info["model_name"] = fields.get("Model name", "").strip()
    flags = fields.get("Flags", "").split()
    info["isa"] = sorted(
        f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni")
    )
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def run_case(case: dict[str, Any], threads: int, quick: bool) -> dict[str, Any]:
    """Memory (both methods where they apply) and time of both sides of one case."""
    torch.set_num_threads(threads)
    row: dict[str, Any] = {"case": case, "threads": threads}
    row["padt_fake_peak_bytes"] = fake_peak(padt_loss, case)
    fits = {side: real_bytes_needed(case, side) <= REAL_LIMIT_BYTES for side in SIDES}
    losses: dict[str, float] = {}
    for side, fn in SIDES.items():
        if not fits[side]:
            row[f"{side}_allocator_peak_bytes"] = None
            row[f"{side}_median_s"] = None
            continue
        inputs = {**make_inputs(case), **_conversation(case)}
        step = _step(fn, inputs)
        start = time.perf_counter()
        losses[side] = float(step())  # warm-up (and the wall time of a first step)
        first = time.perf_counter() - start
        row[f"{side}_allocator_peak_bytes"] = allocator_peak(step)
        if fits["padt"] and fits["trp"]:
            m = benchmark.Timer(
                stmt="step()", globals={"step": step}, num_threads=threads
            ).blocked_autorange(min_run_time=0.2 if quick else 1.0)
            row[f"{side}_median_s"], row[f"{side}_iqr_s"] = m.median, m.iqr
        else:  # one step is what the machine affords at full size (the other side cannot run)
            row[f"{side}_median_s"], row[f"{side}_iqr_s"] = first, None
        del step, inputs
    if len(losses) == 2:
        row["max_abs_error"] = abs(losses["padt"] - losses["trp"])
        if row["max_abs_error"] > 1e-3:
            raise AssertionError(f"trp and PaDT-style losses differ: {losses}")
    if row["padt_allocator_peak_bytes"] is not None:
        # The two exact methods must agree on the ATen-only path.
        a, f = row["padt_allocator_peak_bytes"], row["padt_fake_peak_bytes"]
        if abs(a - f) > max(4096, 1e-4 * a):
            raise AssertionError(f"allocator ({a} B) and fake-tensor ({f} B) peaks disagree")
    padt = row["padt_allocator_peak_bytes"] or row["padt_fake_peak_bytes"]
    row["padt_peak_bytes"] = padt
    row["trp_peak_bytes"] = row["trp_allocator_peak_bytes"]
    row["memory_ratio"] = padt / row["trp_peak_bytes"] if row["trp_peak_bytes"] else None
    # The gradients of W, the hidden states and the VRT rows: the same on both sides (and what
    # an optimizer needs anyway); the rest is the loss's own working memory.
    b, n, v, d, p = case["B"], case["N"], case["V"], case["D"], case["P"]
    row["gradient_bytes"] = 4 * (v * d + b * (p + PROMPT_TEXT + n) * d + b * p * d)
    for side in SIDES:
        peak = row[f"{side}_peak_bytes"]
        row[f"{side}_working_bytes"] = None if peak is None else peak - row["gradient_bytes"]
    return row


def _gb(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**30:.3f}"


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["cpu"]
    lines = [
        f"### {OP}",
        "",
        f"CPU: {cpu.get('model_name', '?')} ({meta['threads']} threads; ISA: "
        f"{', '.join(cpu.get('isa', []))}; torch CPU capability "
        f"{cpu.get('torch_cpu_capability', '?')}), torch {meta['torch']}, {meta['date']}.",
        "Peak = bytes of tensor storage allocated during one forward+backward step beyond the "
        "inputs (gradients of W, hidden states and VRT rows included). trp: the c10 CPU "
        "allocator's count (torch.profiler memory events); PaDT-style: the allocator's count "
        "where it fits in memory (asserted equal to the fake-tensor count), else the exact "
        "FakeTensorMode count.",
        "",
        "| B | N per sample | V | D | VRT rows per sample | PaDT-style peak GiB | trp peak GiB "
        "| PaDT / trp | of which gradients GiB | PaDT-style working GiB | trp working GiB "
        "| PaDT-style s/step | trp s/step | PaDT method | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["case"]
        method = "allocator = fake" if r["padt_allocator_peak_bytes"] is not None else "fake"
        ratio = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        err = r.get("max_abs_error")
        lines.append(
            f"| {c['B']} | {c['N']} | {c['V']} | {c['D']} | {c['P']} | {_gb(r['padt_peak_bytes'])} "
            f"| {_gb(r['trp_peak_bytes'])} | {ratio} | {_gb(r['gradient_bytes'])} "
            f"| {_gb(r['padt_working_bytes'])} | {_gb(r['trp_working_bytes'])} "
            f"| {_s(r['padt_median_s'])} "
            f"| {_s(r['trp_median_s'])} | {method} | {'—' if err is None else f'{err:.1e}'} |"
        )
    lines.append("")
    lines.append(
        "s/step: median of torch.utils.benchmark (steps over a second run once) where both sides "
        "fit the 6 GiB allowed here, else one timed step; '—': the side was not run for real "
        "(its peak is the fake-tensor count)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: one small case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the saved .json"
    )
    args = parser.parse_args()
    stem = f"{OP}.quick" if args.quick else OP
    if args.markdown_only:
        saved = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(to_markdown(saved["rows"], saved["meta"]))
        print(to_markdown(saved["rows"], saved["meta"]))
        return
    rows = []
    for case in cases(args.quick):
        rows.append(run_case(case, args.threads, args.quick))
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "quick": args.quick,
        "cpu": _cpu(),
        "method": "allocator: torch.profiler profile_memory (c10 CPU allocator running total); "
        "fake: FakeTensorMode + live storage bytes of op outputs",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    print(f"wrote {RESULTS / stem}.json/.md")


if __name__ == "__main__":
    main()
