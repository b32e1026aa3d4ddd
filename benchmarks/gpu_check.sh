#!/usr/bin/env bash
# One-shot GPU check for a CUDA machine with no network (budget: under 8 minutes in all).
#   bash benchmarks/gpu_check.sh OUT_DIR
# Builds the extension against the machine's torch (CUDA sources included when nvcc is found),
# runs the gpu-marked tests, then every benchmark in GPU mode; tables and logs go to OUT_DIR.
set -uo pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

echo "== build ($($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'))"
# Extra wheels carried in .whl (e.g. liger-kernel for the log-probs baseline) install offline.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1 || { echo "build failed, see build.log"; tail -30 "$OUT_DIR/build.log"; exit 1; }
export PYTHONPATH=$PWD:${PYTHONPATH:-}

echo "== gpu tests"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for script in benchmarks/bench_*.py; do
  echo "== $script"
  timeout 240 $PY "$script" --device cuda --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/$(basename "$script" .py).log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: $script"; status=1; }
done
exit $status
