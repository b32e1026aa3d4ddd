#!/usr/bin/env bash
# One-shot GPU check for a CUDA machine with no network; always ends in its report.
#   bash benchmarks/gpu_check.sh OUT_DIR          (PYTHON=... picks the interpreter)
#
# Steps: preflight (versions, GPU, what imports; carried wheels from .whl/ installed when missing),
# build (CUDA sources, else a CPU-only rebuild), then the steps no kept run has measured (so a
# short run measures something new), then those measured before (docs/gpu_runs/), then the steps
# that are not GPU work. Every step has its own time limit, clipped to what is left of the whole
# budget (GPU_CHECK_BUDGET_S, default 420 s), and a need: the seconds a kept run measured it
# taking (never-measured steps: their limit). A step whose need exceeds what is left is skipped
# with that reason instead of being started to time out; a failed or timed-out step is recorded
# and the next one runs. Without CUDA (a dry run) the GPU-only steps are skipped with the reason.
# Everything lands in OUT_DIR: one log per step, env.json, steps.tsv (with a row for the import
# probes between steps, so the report's total is the check's), the benchmark CSVs and report.md,
# printed last.
# GPU_CHECK_STEPS="gpu_tests bench_e2e" runs only the named steps (preflight and build always run).
# Exit status: 0 when no step failed or timed out, 1 otherwise (the report is written either way).
set -uo pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
SITE_DIR=${GPU_CHECK_SITE:-/tmp/anytime_gpu_site}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)
STEPS=$OUT_DIR/steps.tsv
printf 'step\tstatus\tseconds\tlimit_s\tnote\n' >"$STEPS"
failed=0

record() { # name status seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS"
  echo "-- $1: $2 (${3} s) $5"
}

selected() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS preflight build build_cpu_only " == *" $1 "* ]]; }

# step NAME LIMIT_S NEED_S COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the
# outcome. NEED_S: the seconds the step has been measured to take ("-": never measured, then its limit).
step() {
  local name=$1 limit=$2 need=$3
  shift 3
  if ! selected "$name"; then
    record "$name" skipped 0 "$limit" "not in GPU_CHECK_STEPS"
    return 0
  fi
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local wanted=$need
  [ "$need" = - ] && wanted=$limit
  if ((left < 10)); then
    record "$name" skipped 0 "$limit" "the check's budget of ${BUDGET_S} s is spent"
    return 0
  fi
  if ((left < wanted)); then
    local why="needs ${wanted} s (measured), ${left} s of the budget left"
    [ "$need" = - ] && why="never measured: needs its limit of ${limit} s, ${left} s of the budget left"
    record "$name" skipped 0 "$limit" "$why"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  tail -n "${GPU_CHECK_TAIL:-12}" "$OUT_DIR/$name.log"
  if ((rc == 0)); then
    record "$name" ok "$seconds" "$limit" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" timeout "$seconds" "$limit" "stopped at its limit; partial results kept"
    failed=1
  else
    record "$name" failed "$seconds" "$limit" "exit $rc, see $name.log"
    failed=1
  fi
  return 0
}

# probe COMMAND...: a short check between steps (an interpreter start, an import); its time adds
# to the import_probes row of steps.tsv.
PROBE_S=0
PROBES=0
probe() {
  local t0 rc
  t0=$(date +%s.%N)
  "$@"
  rc=$?
  PROBE_S=$(awk -v s="$PROBE_S" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", s + b - a }')
  PROBES=$((PROBES + 1))
  return $rc
}

skip() { record "$1" skipped 0 "-" "$2"; }

# 1. preflight: carried wheels for what the image lacks, then what imports.
step preflight 90 - "$PY" benchmarks/gpu_preflight.py "$OUT_DIR" --wheels .whl --target "$SITE_DIR"
probe "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' >"$OUT_DIR/.has_cuda" 2>/dev/null
HAS_CUDA=$(cat "$OUT_DIR/.has_cuda" 2>/dev/null)
rm -f "$OUT_DIR/.has_cuda"
[ "$HAS_CUDA" = 1 ] || HAS_CUDA=0
has_module() { probe "$PY" -c "import $1" >/dev/null 2>&1; }

# 2. build: the CUDA sources when the toolchain agrees with torch, else CPU-only ops.
if ((HAS_CUDA)); then
  step build 240 - env MAX_JOBS=16 "$PY" setup.py build_ext --inplace
  if ! has_module anytime_kernels; then
    step build_cpu_only 180 - env ANYTIME_KERNELS_NO_CUDA=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace --force
  fi
elif has_module anytime_kernels; then
  skip build "no CUDA device; the installed CPU extension imports"
else
  step build 300 - "$PY" setup.py build_ext --inplace
fi

bench() { # name limit need [args...]
  local name=$1 limit=$2 need=$3
  shift 3
  if [ ! -f "benchmarks/bench_$name.py" ]; then
    skip "bench_$name" "benchmarks/bench_$name.py does not exist in this checkout yet"
    return
  fi
  if ((!HAS_CUDA)); then
    skip "bench_$name" "no CUDA device"
    return
  fi
  step "bench_$name" "$limit" "$need" "$PY" "benchmarks/bench_$name.py" --device cuda --out "$OUT_DIR" "$@"
}

# 3. never measured in a kept run (docs/gpu_runs/): the README's rows for them come from a run whose
#    files were not kept, or from none.
bench rollout 150 - --quick
bench tree_attention 90 - --quick
bench tree_forward 75 - --quick
bench advantages 45 -
bench decode 120 - --quick
bench paged_attention 90 - --quick
bench tree_pack 30 - --quick

# 4. measured before; NEED is the longest kept time (docs/gpu_runs/2026-11-27-h100-run1 and run2).
#    The gpu-marked tests run from the files that hold them (so one missing package elsewhere
#    cannot break collection); tests of ops the build lacks skip themselves with the reason.
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout_flag=()
has_module pytest_timeout && timeout_flag=(--timeout 120)
step gpu_tests 180 121 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider "${timeout_flag[@]}" "${GPU_TEST_FILES[@]}"
# bench_logprobs took 64 and 71 s before issue 27 added its anchors, workloads and error rows.
bench logprobs 300 71
bench e2e 200 149 --quick

# 5. not GPU measurements.
if ! { has_module pebble && has_module math_verify; }; then
  skip bench_rewards "pebble or math_verify does not import (carry their wheels in .whl/)"
elif [ ! -d ../shared/data/math-eval ]; then
  skip bench_rewards "no ../shared/data/math-eval beside the checkout (grading is CPU work; run it where the data is)"
else
  bench rewards 45 - --quick
fi
skip bench_anytime_vs_grpo "a CPU comparison of training methods (make compare), not a GPU measurement"

record import_probes ok "$PROBE_S" - "${PROBES} interpreter starts between steps (CUDA, imports)"
"$PY" benchmarks/gpu_report.py "$OUT_DIR" 2>&1 || python3 benchmarks/gpu_report.py "$OUT_DIR"
exit $failed
