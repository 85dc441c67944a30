"""``make gpu-check``: everything a GPU machine should run, in one command (< 10 minutes).

    python tools/gpu_check.py [--report-dir DIR] [--arch 9.0] [--jobs N] [--skip-build]

For a GPU machine with its own interpreter and no network (no .venv, no pip install, maybe no
pytest or Hydra): with the running interpreter it

1. refuses clearly, exit status 2, when no CUDA device is visible;
2. builds ``trp._C`` in place with its CUDA kernels (``TRP_CUDA=1``, ``TORCH_CUDA_ARCH_LIST`` =
   this device's architecture, ``python setup.py build_ext --inplace``) and checks that every
   ``trp::`` op has a CUDA kernel;
3. runs ``tests/test_cuda.py`` (raw ``torch.ops.trp.*`` against the CPU) with a built-in runner,
   one test after another in a child process, so a crash still reports the tests before it;
4. times each benchmark of ``benchmarks/`` (their ``cases``/``make_inputs``/``SIDES``) on the
   GPU: eager reference vs fused, forward and forward+backward, CUDA-synchronised
   ``torch.utils.benchmark`` timings and peak ``torch.cuda`` memory of each side;
5. runs ``compute-sanitizer`` memcheck and racecheck over one call (forward + backward) of every
   op, when the tool is installed;

and writes ``gpu_check_report.md`` and ``gpu_check_report.json`` to ``--report-dir`` (default
``$OUT`` when set, else ``outputs/``). Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

SCRIPT = str(Path(__file__).resolve())
ROOT = Path(SCRIPT).parent.parent
BUDGET_S = 570.0  # under the 10 minutes a GPU loan lasts, with room to write the report
NO_DEVICE_EXIT = 2


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Report:
    """Collects the results and rewrites both report files after every step, so a check that
    is killed part-way still leaves what it found."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return BUDGET_S - self.elapsed()

    def step(self, name: str, result: dict) -> None:
        result.setdefault("status", "ok")
        self.data["steps"][name] = result
        self.write()

    def ok(self) -> bool:
        return bool(self.data["steps"]) and all(
            s["status"] in ("ok", "skipped") for s in self.data["steps"].values()
        )

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["passed"] = self.ok()
        (self.directory / "gpu_check_report.json").write_text(json.dumps(self.data, indent=2))
        (self.directory / "gpu_check_report.md").write_text(to_markdown(self.data))


def to_markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = [
        "# trp gpu-check",
        "",
        f"started {data['started']}, {data.get('elapsed_s', 0)} s, "
        f"**{'PASSED' if data.get('passed') else 'FAILED'}**",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    for name, step in data["steps"].items():
        lines += ["", f"## {name}: {step['status']}", ""]
        if step.get("message"):
            lines += [step["message"], ""]
        if name == "tests" and step.get("tests"):
            lines += ["| test | status | s | error |", "|---|---|---|---|"]
            for t in step["tests"]:
                err = (t.get("error") or "").strip().splitlines()
                first = err[-1].replace("|", "/")[:160] if err else ""
                lines.append(f"| {t['name']} | {t['status']} | {t['seconds']:.2f} | {first} |")
        if name == "benchmarks" and step.get("rows"):
            lines += [
                "| op | case | mode | eager ms | fused ms | speed-up | eager MB | fused MB | "
                "max abs err |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in step["rows"]:
                if "error" in r:
                    lines.append(
                        f"| {r['op']} | {r['case']} | {r['mode']} | error: "
                        f"{r['error'][:120]} | | | | | |"
                    )
                    continue
                lines.append(
                    f"| {r['op']} | {r['case']} | {r['mode']} | {r['eager_ms']:.3f} | "
                    f"{r['fused_ms']:.3f} | {r['eager_ms'] / r['fused_ms']:.2f}x | "
                    f"{r['eager_mb']:.1f} | {r['fused_mb']:.1f} | {r.get('max_abs_err', '')} |"
                )
        for key in ("log_tail", "summary"):
            if step.get(key):
                lines += ["```", step[key], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ steps


def detect_device(report: Report) -> bool:
    try:
        import torch
    except ImportError as exc:
        report.step("device", {"status": "failed", "message": f"cannot import torch: {exc}"})
        return False
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
    }
    report.data["environment"] = env
    if not torch.cuda.is_available():
        message = (
            "gpu-check: no CUDA device is present (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Nothing was checked: run "
            "`make gpu-check` on a machine with an NVIDIA GPU."
        )
        report.step("device", {"status": "failed", "message": message})
        print(message, file=sys.stderr)
        return False
    major, minor = torch.cuda.get_device_capability(0)
    env["device"] = torch.cuda.get_device_name(0)
    env["capability"] = f"{major}.{minor}"
    env["devices"] = torch.cuda.device_count()
    report.step("device", {"message": f"{env['device']} (sm_{major}{minor})"})
    return True


def cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def build(report: Report, arch: str, jobs: int) -> bool:
    home = cuda_home()
    if home is None:
        report.step("build", {"status": "failed", "message": "nvcc not found: set CUDA_HOME"})
        return False
    env = dict(
        os.environ, TRP_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs), CUDA_HOME=home
    )
    ninja = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(60.0, report.left() - 180.0),
        )
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = -1, f"build timed out after {exc.timeout:.0f} s\n{exc.stdout or ''}"
    (report.directory / "gpu_check_build.log").write_text(log if isinstance(log, str) else "")
    result = {
        "seconds": round(time.monotonic() - t0, 1),
        "message": f"TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={jobs} CUDA_HOME={home} "
        f"ninja={'yes' if ninja else 'no (serial build)'}",
    }
    if rc != 0:
        report.step("build", {**result, "status": "failed", "log_tail": _tail(log)})
        return False
    report.step("build", result)
    return True


def check_kernels(report: Report) -> bool:
    code = (
        "import torch, trp, trp._native as n\n"
        "ops = [o for o in torch._C._dispatch_get_all_op_names() if o.startswith('trp::')]\n"
        "missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(o, "
        "'CUDA')]\n"
        "print(len(ops), missing)\n"
        "raise SystemExit(0 if ops and not missing and n.cuda_kernels_available() else 1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    status = "ok" if proc.returncode == 0 else "failed"
    report.step("kernels", {"status": status, "summary": _tail(proc.stdout + proc.stderr, 10)})
    return proc.returncode == 0


def _test_names() -> list[str]:
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module("tests.test_cuda")
    return [n for n, f in vars(module).items() if n.startswith("test_") and callable(f)]


def run_tests_child(results_path: str) -> None:
    """Child process: every test of tests/test_cuda.py in order, one JSON line per test."""
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module("tests.test_cuda")
    if module.SKIP_REASON is not None:
        raise SystemExit(f"tests/test_cuda.py cannot run: {module.SKIP_REASON}")
    with open(results_path, "a") as out:
        for name in _test_names():
            out.write(json.dumps({"name": name, "status": "started"}) + "\n")
            out.flush()
            t0 = time.monotonic()
            try:
                getattr(module, name)()
                status, error = "passed", None
            except Exception:  # every failure is reported, the run goes on
                status, error = "failed", traceback.format_exc(limit=6)
            row = {"name": name, "status": status, "seconds": time.monotonic() - t0}
            out.write(json.dumps({**row, "error": error}) + "\n")
            out.flush()


def run_tests(report: Report) -> bool:
    results = report.directory / "gpu_check_tests.jsonl"
    results.unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--tests-child", str(results)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(60.0, report.left() - 150.0),
        )
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, log = -1, "the test runner timed out"
    done: dict[str, dict] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    tests = []
    for name in _test_names():
        row = done.get(name, {"name": name, "status": "not run"})
        if row["status"] == "started":  # the child died inside this test
            row = {**row, "status": "crashed", "error": _tail(log, 20)}
        tests.append({"seconds": 0.0, **row})
    passed = rc == 0 and all(t["status"] == "passed" for t in tests)
    counts = {s: sum(t["status"] == s for t in tests) for s in {t["status"] for t in tests}}
    report.step(
        "tests",
        {
            "status": "ok" if passed else "failed",
            "message": f"tests/test_cuda.py: {counts}",
            "tests": tests,
            "log_tail": "" if passed else _tail(log, 30),
        },
    )
    return passed


def _to_cuda(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cuda").requires_grad_(obj.requires_grad)
    if isinstance(obj, dict):
        return {k: _to_cuda(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cuda(v) for v in obj)
    return obj


def _max_abs_err(a, b) -> float | None:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        errs = [_max_abs_err(x, y) for x, y in zip(a, b)]
        errs = [e for e in errs if e is not None]
        return max(errs) if errs else None
    return None


def run_bench_child(out_path: str, min_run_time: float) -> None:
    """Child process: every benchmark module's cases on the GPU, eager vs fused."""
    import torch
    from torch.utils.benchmark import Timer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    harness = importlib.import_module("_harness")
    rows = []
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        try:
            module = harness.load_module(path)
        except Exception as exc:  # a benchmark that needs what this machine lacks
            rows.append({"op": path.stem, "case": "-", "mode": "-", "error": repr(exc)})
            continue
        if not all(hasattr(module, a) for a in ("OP", "cases", "make_inputs", "SIDES")):
            continue
        for case in module.cases(True):
            for mode in getattr(module, "MODES", harness.MODES):
                row = {"op": module.OP, "case": json.dumps(case), "mode": mode}
                try:
                    inputs = _to_cuda(module.make_inputs(case, mode))
                    if mode == "forward":
                        with torch.no_grad():
                            outs = [module.SIDES[s](**inputs) for s in ("eager", "fused")]
                        err = _max_abs_err(*outs)
                        row["max_abs_err"] = None if err is None else f"{err:.2e}"
                    for side in ("eager", "fused"):
                        call = harness.make_call(module.SIDES[side], inputs, mode)
                        call()  # warm-up (and lazy init) before memory and timing
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        call()
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() - base
                        timer = Timer("call()", globals={"call": call})
                        measured = timer.blocked_autorange(min_run_time=min_run_time)
                        row[f"{side}_ms"] = measured.median * 1e3
                        row[f"{side}_mb"] = peak / 2**20
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                rows.append(row)
                Path(out_path).write_text(json.dumps(rows))


def run_benchmarks(report: Report) -> bool:
    out = report.directory / "gpu_check_bench.json"
    out.unlink(missing_ok=True)
    budget = report.left() - 110.0
    if budget < 30:
        report.step("benchmarks", {"status": "skipped", "message": "no time left"})
        return True
    try:
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--bench-child", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=budget,
        )
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, log = -1, f"benchmarks stopped after {budget:.0f} s (time budget)"
    rows = json.loads(out.read_text()) if out.exists() else []
    failed = rc != 0 or not rows or any("error" in r for r in rows)
    report.step(
        "benchmarks",
        {
            "status": "failed" if failed else "ok",
            "message": "quick cases; CUDA-synchronised medians; peak = torch.cuda.max_memory_"
            "allocated above the inputs",
            "rows": rows,
            "log_tail": _tail(log, 20) if failed else "",
        },
    )
    return not failed


def one_call_per_op() -> None:
    """Child process (under compute-sanitizer): each op forward + backward once, float32."""
    import torch

    sys.path.insert(0, str(ROOT))
    t = importlib.import_module("tests.test_cuda")

    def go(op, args, grad=()):
        args = list(t._to(args, "cuda", torch.float32))
        for i in grad:
            args[i] = args[i].requires_grad_()
        out = op(*args)
        floats = [o for o in t._outputs(out) if o.is_floating_point() and o.requires_grad]
        if floats:
            sum(o.sum() for o in floats).backward()

    go(t.OPS.box_iou, t.box_iou_args(300, 40), (0, 1))
    go(t.OPS.generalized_box_iou, t.box_iou_args(300, 40), (0, 1))
    go(t.OPS.match_cost, t.match_cost_args(2, 50, 6, (5, 3)))
    go(t.OPS.oks, t.oks_args(2, 50, 17, (5, 3)))
    go(t.OPS.ms_deform_attn, t.ms_deform_attn_args([(16, 20), (8, 10)], lq=50), (0, 3, 4))
    embed, features, index, points, targets = t.point_mask_args(20, 16, (16, 12), 300)
    go(t.OPS.point_mask_logits, (embed, features, index, points), (0, 1))
    go(t.OPS.point_mask_loss, (embed, features, index, targets, points), (0, 1))
    go(t._layers(True, 80), (torch.stack([embed, -embed]), features, index, targets))
    go(t._soft_argmax(2.0), (torch.randn(2, 5, 40, 30),), (0,))
    go(t._vrt_ce(256), t.vrt_ce_args(60, 700, 16, (5, 300)), (0, 1, 2))
    torch.cuda.synchronize()
    print("one call per op: done")


def sanitizer(report: Report) -> bool:
    home = cuda_home()
    tool = shutil.which("compute-sanitizer") or (
        str(Path(home) / "bin" / "compute-sanitizer") if home else None
    )
    if tool is None or not Path(tool).exists():
        report.step("sanitizer", {"status": "skipped", "message": "compute-sanitizer not found"})
        return True
    results, ok = [], True
    for check in ("memcheck", "racecheck"):
        budget = report.left() - 15.0
        if budget < 30:
            results.append(f"{check}: skipped (time budget)")
            continue
        cmd = [
            tool,
            "--tool",
            check,
            "--error-exitcode",
            "99",
            # torch probes the runtime with calls that may fail by design: count kernel errors
            "--report-api-errors",
            "no",
            sys.executable,
            SCRIPT,
            "--one-call-per-op",
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(budget, 200.0)
            )
            log = proc.stdout + proc.stderr
            summary = [ln for ln in log.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK" in ln]
            passed = proc.returncode == 0
            results.append(f"{check}: rc {proc.returncode}; " + "; ".join(summary[-3:]))
            if not passed:
                results.append(_tail(log, 25))
        except subprocess.TimeoutExpired:
            passed = False
            results.append(f"{check}: timed out")
        ok = ok and passed
    report.step("sanitizer", {"status": "ok" if ok else "failed", "summary": "\n".join(results)})
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = os.environ.get("OUT") or str(ROOT / "outputs")
    parser.add_argument("--report-dir", default=default_dir)
    parser.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST (default: device 0's capability)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--skip-build", action="store_true", help="use the trp._C in place")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-sanitizer", action="store_true")
    parser.add_argument("--bench-min-run-time", type=float, default=0.2)
    parser.add_argument("--tests-child", help=argparse.SUPPRESS)
    parser.add_argument("--bench-child", help=argparse.SUPPRESS)
    parser.add_argument("--one-call-per-op", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tests_child:
        run_tests_child(args.tests_child)
        return 0
    if args.bench_child:
        run_bench_child(args.bench_child, args.bench_min_run_time)
        return 0
    if args.one_call_per_op:
        one_call_per_op()
        return 0

    report = Report(Path(args.report_dir))
    if not detect_device(report):
        return NO_DEVICE_EXIT
    arch = args.arch or report.data["environment"]["capability"]
    if not args.skip_build and not build(report, arch, args.jobs):
        return 1
    if not check_kernels(report):
        return 1
    run_tests(report)
    if not args.skip_bench:
        run_benchmarks(report)
    if not args.skip_sanitizer:
        sanitizer(report)
    report.write()
    print(f"gpu-check: {'passed' if report.ok() else 'FAILED'}; report in {report.directory}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
