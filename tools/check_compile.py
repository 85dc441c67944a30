"""Compile one C++/CUDA source of trp._C on its own, with the flags setup.py uses.

    python tools/check_compile.py src/trp/csrc/<op>/<op>_cuda.cu [...]

A quick check while writing a kernel: it neither links nor touches build/, so it never
disturbs the incremental build of the whole extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "src" / "trp" / "csrc"


def command(source: Path, output: str) -> list[str]:
    includes = [f"-I{p}" for p in [str(CSRC), *include_paths(), sysconfig.get_paths()["include"]]]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DTRP_WITH_CUDA"]
    if source.suffix == ".cu":
        if CUDA_HOME is None:
            raise SystemExit("nvcc not found: set CUDA_HOME")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";").split(";")
        gencode = []
        for arch in filter(None, archs):
            num = arch.replace(".", "").replace("+PTX", "")
            gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        return [
            f"{CUDA_HOME}/bin/nvcc",
            "-c",
            str(source),
            "-o",
            output,
            "-std=c++20",
            "-O3",
            "--expt-relaxed-constexpr",
            "--compiler-options",
            "-fPIC",
            *gencode,
            *includes,
            *defines,
        ]
    return [
        "c++",
        "-c",
        str(source),
        "-o",
        output,
        "-std=c++20",
        "-O3",
        "-fPIC",
        "-Wall",
        *includes,
        *defines,
    ]


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            source = Path(path).resolve()
            result = subprocess.run(command(source, f"{tmp}/out.o"), check=False)
            print(f"{path}: {'ok' if result.returncode == 0 else 'FAILED'}")
            status |= result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
