#!/usr/bin/env bash
# One-shot GPU check of mmkernels on a CUDA machine (no internet needed), run from anywhere:
#
#   OUT=./gpu_out bash benchmarks/gpu_check.sh
#
# Steps (each under `timeout`; the whole script < 8 min on one H100/H200 -- the profile step adds
# <= 60 s, and its Triton compiles land in the on-disk cache the benchmarks then reuse; the worst case,
# every step at its timeout, is ~520 s, still inside one 10-min device call):
#   1. nvidia-smi + versions                               -> $OUT/build.log (head)
#   2. build _C in place (setup.py build_ext --inplace)    -> $OUT/build.log  (failure is not fatal:
#      mmkernels works without _C), in the background while
#   2b. the PLoRA block-size sweep (benchmarks.tune_plora)  -> $OUT/tune.log, plora_configs.json,
#      plora_configs-sweep.json; later steps run with MMKERNELS_PLORA_CONFIGS pointing at the winners
#   G1. GEMM core: path and tile sweep per GEMM role (benchmarks.tune_gemm: the table entry, other
#      tiles, torch._grouped_mm)                           -> $OUT/gemm_tune.log, gemm_configs.json,
#      gemm_configs-sweep.json; later steps run with MMKERNELS_GEMM_CONFIGS pointing at the winners, and
#      $OUT/gemm_roles.txt (python -m mmkernels info) says which path and tile each role took and why
#   2c. profile: one fwd+bwd step per operator under torch.profiler (benchmarks.profile_step: MoE phi-2
#      16k tokens dropless, PLoRA wqkv 8k 50 % visual, hyper attention 7B joint + gated), kernels by
#      self CUDA time                                      -> $OUT/profile.log, profile.txt, profile.json
#   2d. the sm_90 codegen table (python -m benchmarks.codegen: CPU only, in the background during 2c
#      and 3, finished before the timed benchmarks start; its compiles share Triton's cache with the
#      other steps)                                        -> $OUT/codegen.md, codegen.json, codegen.log
#   3. GPU tests: pytest -x tests -m gpu (xdist if there)  -> $OUT/tests.log
#   4. benchmarks: python3 -m benchmarks.run --out $OUT    -> $OUT/bench.log, <op>-<dev>-latest.{json,png}
#      (each JSON: "commit" and "targets" [{id, value, goal, better, met, ...}], peer targets included)
#   G3. GEMM-family targets from the bench JSONs (benchmarks.targets: measured or "not measured")
#                                                          -> $OUT/gemm_targets.txt
#   5. summary table                                       -> stdout
# $OUT stays flat (about 20 small files).
#
# The GEMM-core steps (G1, G3) add at most GEMM_TUNE_TIMEOUT + 30 s (120 s); the sweep stops starting
# roles 20 s before its timeout, and the compiles it does are cached for the benchmarks.  The codegen
# table (2d) starts after G1, so it reads the tiles the sweep chose.
#
# Knobs: PYTHON (python3), OUT, QUICK=1 (bench --quick), SKIP_BUILD=1, SKIP_TUNE=1, SKIP_PROFILE=1,
#        SKIP_TESTS=1, SKIP_BENCH=1, SKIP_GEMM_TUNE=1, SKIP_CODEGEN=1, GEMM_TUNE_TIMEOUT (90),
#        GEMM_ROLES (all; comma-separated), CODEGEN_TIMEOUT (240),
#        BUILD_TIMEOUT (120), TUNE_TIMEOUT (110), PROFILE_TIMEOUT (60),
#        TESTS_TIMEOUT (180), BENCH_TIMEOUT (150), TORCH_CUDA_ARCH_LIST (9.0a),
#        BENCH_OPS ("plora moe ..."; default all), PROFILE_CASES ("moe plora hyper_joint hyper_gated"; default
#        all), TEST_PATHS (default tests).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-120}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-180}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-110}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-60}"
GEMM_TUNE_TIMEOUT="${GEMM_TUNE_TIMEOUT:-90}"
CODEGEN_TIMEOUT="${CODEGEN_TIMEOUT:-240}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
record() {  # step rc seconds note
  local verdict
  case "$2" in
    0) verdict="OK" ;;
    124|137) verdict="TIMEOUT" ;;
    5) verdict="NO-TESTS" ;;
    skip) verdict="SKIPPED" ;;
    *) verdict="FAIL(rc=$2)" ;;
  esac
  SUMMARY+=("$(printf '%-8s %-12s %6ss  %s' "$1" "$verdict" "$3" "$4")")
}

T_ALL=$(date +%s)

# ---------------------------------------------------------------- 1. environment
{
  echo "=== date: $(date -Is)  host: $(hostname)  repo: $REPO"
  echo "=== git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "=== nvidia-smi"
  nvidia-smi 2>&1 || echo "(nvidia-smi failed)"
  echo "=== versions"
  "$PY" - <<'PY' 2>&1
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
PY
  for tool in nvcc cmake ninja; do
    printf '%-6s %s\n' "$tool" "$(command -v "$tool" >/dev/null && "$tool" --version 2>&1 | head -n 1 | tr -d '\n' || echo 'not on PATH')"
  done
} 2>&1 | tee "$OUT/env.txt"

# ---------------------------------------------------------------- 2. build _C in place (background)
if [ "${SKIP_BUILD:-0}" = "1" ]; then
  record build skip 0 "SKIP_BUILD=1"
  cat "$OUT/env.txt" > "$OUT/build.log"
else
  t_build=$(date +%s)
  {
    cat "$OUT/env.txt"
    echo "=== MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} $PY setup.py build_ext --inplace"
    MAX_JOBS="${MAX_JOBS:-8}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
      timeout -k 10 "$BUILD_TIMEOUT" "$PY" setup.py build_ext --inplace
    echo "build rc=$?"
  } > "$OUT/build.log" 2>&1 &
  BUILD_PID=$!
fi
rm -f "$OUT/env.txt"

# ---------------------------------------------------------------- 2b. PLoRA block-size sweep
if [ "${SKIP_TUNE:-0}" = "1" ]; then
  record tune skip 0 "SKIP_TUNE=1"
else
  t0=$(date +%s)
  timeout -k 10 "$TUNE_TIMEOUT" "$PY" -m benchmarks.tune_plora --out "$OUT/plora_configs.json" 2>&1 | tee "$OUT/tune.log"
  rc=${PIPESTATUS[0]}
  record tune "$rc" $(( $(date +%s) - t0 )) "$(grep -c ': best' "$OUT/tune.log") kernels tuned"
  if [ "$rc" = "0" ] && [ -s "$OUT/plora_configs.json" ]; then
    export MMKERNELS_PLORA_CONFIGS="$OUT/plora_configs.json"
  fi
fi

if [ -n "${BUILD_PID:-}" ]; then
  wait "$BUILD_PID"
  tail -n 5 "$OUT/build.log"
  rc=$(grep -o '^build rc=[0-9]*' "$OUT/build.log" | tail -n 1 | cut -d= -f2)
  info=$("$PY" -c "import json, mmkernels; i = mmkernels.build_info(); print('c_ext=%s cuda_kernels=%s archs=%s' % (i['c_extension_loaded'], i['cuda_kernels'], ','.join(i['cuda_archs'])))" 2>/dev/null | tail -n 1)
  echo "build_info: $info" | tee -a "$OUT/build.log"
  record build "${rc:-1}" $(( $(date +%s) - t_build )) "$info"
fi

# ---------------------------------------------------------------- G1. GEMM core: path/tile sweep per role
if [ "${SKIP_GEMM_TUNE:-0}" = "1" ]; then
  record gemmtune skip 0 "SKIP_GEMM_TUNE=1"
else
  t0=$(date +%s)
  gargs=(--out "$OUT/gemm_configs.json" --budget-s $(( GEMM_TUNE_TIMEOUT > 30 ? GEMM_TUNE_TIMEOUT - 20 : 10 )))
  [ -n "${GEMM_ROLES:-}" ] && gargs+=(--roles "$GEMM_ROLES")
  timeout -k 10 "$GEMM_TUNE_TIMEOUT" "$PY" -m benchmarks.tune_gemm "${gargs[@]}" 2>&1 | tee "$OUT/gemm_tune.log"
  rc=${PIPESTATUS[0]}
  record gemmtune "$rc" $(( $(date +%s) - t0 )) "$(grep -cE '^[a-z]+\.[a-z_]+: ' "$OUT/gemm_tune.log") roles swept"
  if [ "$rc" = "0" ] && [ -s "$OUT/gemm_configs.json" ]; then
    export MMKERNELS_GEMM_CONFIGS="$OUT/gemm_configs.json"
  fi
fi
# which path and tile each GEMM role takes now, and why (measured at <commit> on <card>, or the default)
timeout -k 5 30 "$PY" -m mmkernels info > "$OUT/gemm_roles.txt" 2>&1


# ---------------------------------------------------------------- 2d. codegen table (background, CPU only)
if [ "${SKIP_CODEGEN:-0}" = "1" ]; then
  record codegen skip 0 "SKIP_CODEGEN=1"
else
  t_codegen=$(date +%s)
  {
    timeout -k 10 "$CODEGEN_TIMEOUT" "$PY" -m benchmarks.codegen --quiet --json "$OUT/codegen.json" \
      > "$OUT/codegen.md" 2> "$OUT/codegen.log"
    echo "codegen rc=$?" >> "$OUT/codegen.log"
  } &
  CODEGEN_PID=$!
fi

# ---------------------------------------------------------------- 2c. profile (kernel times of one step)
if [ "${SKIP_PROFILE:-0}" = "1" ]; then
  record profile skip 0 "SKIP_PROFILE=1"
else
  t0=$(date +%s)
  pargs=(--out "$OUT")
  for c in ${PROFILE_CASES:-}; do pargs+=(--case "$c"); done
  timeout -k 10 "$PROFILE_TIMEOUT" "$PY" -m benchmarks.profile_step "${pargs[@]}" 2>&1 | tee "$OUT/profile.log"
  rc=${PIPESTATUS[0]}
  record profile "$rc" $(( $(date +%s) - t0 )) "$(grep -c '^== .*total' "$OUT/profile.log") cases profiled, $(grep -c 'not measured' "$OUT/profile.log") not measured"
fi

# ---------------------------------------------------------------- 3. GPU tests
if [ "${SKIP_TESTS:-0}" = "1" ]; then
  record tests skip 0 "SKIP_TESTS=1"
else
  t0=$(date +%s)
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  timeout -k 10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -x -p no:cacheprovider "${xdist[@]}" --durations=10 ${TEST_PATHS:-tests} -m gpu 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  record tests "$rc" $(( $(date +%s) - t0 )) "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
fi

# the codegen table is finished before the timed benchmarks start (no CPU load beside them)
if [ -n "${CODEGEN_PID:-}" ]; then
  wait "$CODEGEN_PID"
  rc=$(grep -o '^codegen rc=[0-9]*' "$OUT/codegen.log" | tail -n 1 | cut -d= -f2)
  record codegen "${rc:-1}" $(( $(date +%s) - t_codegen )) \
    "$(grep -c '^| [a-z_]*/' "$OUT/codegen.md") kernels; $(grep -E '^Check (passed|failed)' "$OUT/codegen.md" | cut -c1-60)"
fi

# ---------------------------------------------------------------- 4. benchmarks
if [ "${SKIP_BENCH:-0}" = "1" ]; then
  record bench skip 0 "SKIP_BENCH=1"
else
  t0=$(date +%s)
  args=(--out "$OUT")
  [ "${QUICK:-0}" = "1" ] && args+=(--quick)
  for op in ${BENCH_OPS:-}; do args+=(--op "$op"); done
  timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m benchmarks.run "${args[@]}" 2>&1 | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  # keep $OUT small: the timestamped JSON duplicates the -latest one
  find "$OUT" -maxdepth 1 -name '*-[0-9]*-[0-9]*.json' ! -name '*-latest.json' -delete 2>/dev/null
  note="$(grep -cE 'NOT MET' "$OUT/bench.log") NOT MET, $(grep -cE '\[ *MET\]' "$OUT/bench.log") MET targets"
  record bench "$rc" $(( $(date +%s) - t0 )) "$note"
  TARGETS="$(grep -E '^[[:space:]]*\[( *MET|NOT MET)\]' "$OUT/bench.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- G3. GEMM-family targets (measured or not)
timeout -k 5 30 "$PY" -m benchmarks.targets "$OUT" --json "$OUT/gemm_targets.json" > "$OUT/gemm_targets.txt" 2>&1
record targets $? 0 "$(grep -c 'not measured' "$OUT/gemm_targets.txt") of $(grep -cE '^  [a-z]+\.' "$OUT/gemm_targets.txt") GEMM targets not measured"

# ---------------------------------------------------------------- 5. summary
{
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - T_ALL ))s total; outputs in $OUT) ==="
  printf '%-8s %-12s %7s  %s\n' step status time note
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ -n "${TARGETS:-}" ]; then
    echo "--- targets"
    echo "$TARGETS"
  fi
  echo "--- files"
  ls -1 "$OUT"
} 2>&1

# exit status: failure of tests or bench (a failed build alone is not fatal)
status=0
for line in "${SUMMARY[@]}"; do
  case "$line" in
    tests*FAIL*|tests*TIMEOUT*|bench*FAIL*|bench*TIMEOUT*) status=1 ;;
  esac
done
exit $status
