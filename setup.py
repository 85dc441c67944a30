"""Builds the ``trp._C`` extension: C++ kernels always, CUDA kernels when asked or available.

``TRP_CUDA=auto|0|1`` (default auto: build CUDA when nvcc is found through ``CUDA_HOME``).
Every ``*.cpp`` under ``src/trp/csrc`` is compiled; every ``*.cu`` too when CUDA is built, so an
op is added by dropping its files in ``csrc/<op>/`` (see docs/adding_an_op.md).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("src", "trp", "csrc")


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("TRP_CUDA", "auto").strip().lower()
    if choice not in {"auto", "0", "1"}:
        raise SystemExit(f"TRP_CUDA must be auto, 0 or 1, got {choice!r}")
    found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if choice == "1" and not found:
        raise SystemExit("TRP_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA root")
    return choice == "1" or (choice == "auto" and found)


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cxx = ["-O3", "-fdiagnostics-color=always"]
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DTRP_WITH_CUDA"]
        return [
            CUDAExtension(
                "trp._C",
                sources,
                include_dirs=[os.path.join(ROOT, CSRC)],
                extra_compile_args={"cxx": [*cxx, "-DTRP_WITH_CUDA"], "nvcc": nvcc},
            )
        ]
    return [
        CppExtension(
            "trp._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx},
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The Makefile installs with TRP_SKIP_EXTENSION=1 and then builds trp._C in place with ninja
# under build/, so later rebuilds are incremental (pip's editable build uses a throw-away
# directory and would recompile every kernel each time).
_skip = os.environ.get("TRP_SKIP_EXTENSION", "0") == "1"
setup(ext_modules=[] if _skip else _extensions(), cmdclass=_cmdclass())
