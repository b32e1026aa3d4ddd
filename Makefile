# Two entry points for a fresh machine with python3 and a C++ compiler:
#   make test    build .venv (CPU torch), the package and its extension, run the tests
#   make train   the tiny CPU training demo (arrives with the trainer issue)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: install test lint bench bench-quick wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): $(PY) setup.py pyproject.toml $(EXT_SOURCES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-quick: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script --quick --out bench_out || exit 1; done

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script --out bench_out || exit 1; done

wheel: $(STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w wheelhouse .

clean:
	rm -rf build dist wheelhouse *.egg-info anytime_kernels/_C*.so bench_out
