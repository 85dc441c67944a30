"""Runs every ``benchmarks/bench_*.py`` and writes ``benchmarks/results/`` (JSON + markdown).

    python benchmarks/run_all.py [--quick] [--only match_cost ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI mode: few sizes, short timing")
    parser.add_argument("--only", nargs="*", default=None, help="bench names without bench_")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{name}.py" for name in args.only}
        missing = wanted - {s.name for s in scripts}
        if missing:
            parser.error(f"no such benchmark: {sorted(missing)}")
        scripts = [s for s in scripts if s.name in wanted]
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
