"""Speed-ups in ``benchmarks/results/<op>.json`` now vs the same file at a git revision.

    python benchmarks/compare.py REV [op ...]

Prints one markdown row per (op, case, mode): the fused op's speed-up over its eager reference
(and over any other side) at 1 and 2 threads, before (at REV, with the instruction set that run
recorded) and now.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPS = (
    "match_cost",
    "ms_deform_attn",
    "oks_cost",
    "point_mask_loss",
    "soft_argmax",
    "vrt_head",
    "vrt_linear_cross_entropy",
)


def _load_rev(rev: str, op: str) -> dict | None:
    path = f"benchmarks/results/{op}.json"
    out = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=HERE.parent, capture_output=True, text=True
    )
    return json.loads(out.stdout) if out.returncode == 0 else None


def _isa(meta: dict) -> str:
    trp, aten = meta.get("trp_cpu_capability"), meta.get("aten_cpu_capability")
    if trp is None and aten is None:
        return "baseline kernels"
    return f"trp {trp}, ATen {aten}"


def _ratios(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for r in rows:
        key = (", ".join(f"{k}={v}" for k, v in r["case"].items()), r.get("mode", ""))
        ratios = {"eager": r["speedup"]}
        ratios.update(
            {k[len("speedup_vs_") :]: v for k, v in r.items() if k.startswith("speedup_vs_")}
        )
        table.setdefault(key, {})[int(r["threads"])] = ratios
    return table


def _fmt(per_thread: dict[int, dict[str, float]] | None, side: str) -> str:
    if not per_thread:
        return "—"
    return " / ".join(
        f"{per_thread[t][side]:.2f}×" if side in per_thread[t] else "—" for t in sorted(per_thread)
    )


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    rev, ops = argv[0], argv[1:] or list(OPS)
    print("| op | case | mode | vs | before (1 / 2 threads) | before ISA | now (1 / 2 threads) |")
    print("|---|---|---|---|---|---|---|")
    for op in ops:
        now_path = HERE / "results" / f"{op}.json"
        if not now_path.exists():
            continue
        now = json.loads(now_path.read_text())
        old = _load_rev(rev, op)
        now_t = _ratios(now["rows"])
        old_t = _ratios(old["rows"]) if old else {}
        isa = _isa(old["meta"]) if old else "—"
        for key, per_thread in now_t.items():
            for side in per_thread[min(per_thread)]:
                print(
                    f"| {op} | {key[0]} | {key[1]} | {side} | {_fmt(old_t.get(key), side)} | "
                    f"{isa} | {_fmt(per_thread, side)} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
