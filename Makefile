# Every target does its own set-up (venv, torch, the editable install that builds trp._C),
# idempotently: a second run only rebuilds what changed. --no-compile: pip would byte-compile
# the ~10k modules of torch and its dependencies up front; Python compiles what it imports.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export MAX_JOBS ?= 2
# auto: the CUDA kernels only where nvcc is found and a GPU is present; 1: always (CI); 0: never.
export TRP_CUDA ?= auto
# 1: benchmarks in CI mode (few sizes, short timing)
QUICK ?=

CSRC := $(shell find src/trp/csrc -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu')
INSTALLED := $(VENV)/.trp-installed
EXTENSION := build/.trp-extension
# Changing TRP_CUDA rebuilds trp._C (the stamp of the other value goes).
CONFIG := build/.trp-config-cuda-$(TRP_CUDA)

.PHONY: setup build demo test lint bench clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	touch $@

$(INSTALLED): $(VENV)/.torch setup.py setup.cfg pyproject.toml
	TRP_SKIP_EXTENSION=1 $(BIN)/pip install -q --no-compile --no-build-isolation -e '.[dev]'
	touch $@

# Incremental (ninja) rebuild of trp._C after a change under src/trp/csrc; serialised with
# flock so parallel shells never race on build/.
$(CONFIG):
	mkdir -p build
	rm -f build/.trp-config-cuda-*
	touch $@

$(EXTENSION): $(INSTALLED) $(CSRC) $(CONFIG)
	flock build/.lock $(BIN)/python setup.py -q build_ext --inplace
	touch $@

# pycocoevalcap's PTB tokenizer and METEOR (caption metrics) run Java: a headless JRE is
# installed with apt-get only where `java` is missing; the stamp keeps later runs from asking.
JAVA := $(VENV)/.java
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(JAVA): | $(BIN)/python
	command -v java >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends default-jre-headless; }
	touch $@

setup: $(EXTENSION) $(JAVA)

build: setup

demo: setup
	$(BIN)/python examples/train.py

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py $(if $(QUICK),--quick,)

clean:
	rm -rf build src/trp/*.so

# On a GPU machine, with its own interpreter (no .venv, no network): builds trp._C in place with
# the CUDA kernels for that GPU, runs tests/test_cuda.py, the benchmarks on the GPU and
# compute-sanitizer; writes gpu_check_report.{md,json} to $OUT or outputs/. Without a GPU it
# says so and fails. GPU_CHECK_ARGS: e.g. --skip-build, --arch 9.0.
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)
