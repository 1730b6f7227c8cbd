#!/usr/bin/env bash
# One-shot GPU check of mmkernels on a CUDA machine (no internet needed), run from anywhere:
#
#   OUT=./gpu_out bash benchmarks/gpu_check.sh
#
# Time: the whole script stays inside RUN_BUDGET seconds (default 480: the prepared run's 8 minutes,
# well inside one 10-min device call).  Every step runs under `timeout` at its own
# limit or at what is left of the budget, whichever is smaller (the last 15 s are kept for G3 and the
# summary); a step with under 10 s left is skipped ("SKIPPED", no time left).  The limits, in run order
# (background steps in brackets):
#
#   2 [120] beside 2b 110                                   ->  120 s
#   G1 90, then `mmkernels info` 30                         ->  120 s
#   2d [240] beside H1 60, H2 30, 2c 60, 3 150              ->  300 s (the wait for 2d: none)
#   H3 100, H5 90, 4 150, H4 45                             ->  385 s
#   G3 10 and the summary                                   ->   15 s (kept)
#
# 940 s if every step ran to its limit: the budget cuts the last steps instead (the tile sweep H4 first,
# then the general benchmarks), so the run always ends within RUN_BUDGET plus a few seconds of kill
# grace.
#
# Steps:
#   1. nvidia-smi + versions                               -> $OUT/build.log (head)
#   2. build _C in place (setup.py build_ext --inplace)    -> $OUT/build.log  (failure is not fatal:
#      mmkernels works without _C), in the background while
#   2b. the PLoRA block-size sweep (benchmarks.tune_plora)  -> $OUT/tune.log, plora_configs.json,
#      plora_configs-sweep.json; later steps run with MMKERNELS_PLORA_CONFIGS pointing at the winners
#   G1. GEMM core: path and tile sweep per GEMM role (benchmarks.tune_gemm: the table entry, other
#      tiles, torch._grouped_mm)                           -> $OUT/gemm_tune.log, gemm_configs.json,
#      gemm_configs-sweep.json; later steps run with MMKERNELS_GEMM_CONFIGS pointing at the winners, and
#      $OUT/gemm_roles.txt (python -m mmkernels info) says which path and tile each role took and why
#   2d. the sm_90 codegen table of every operator, hyper attention's kernels included (python -m
#      benchmarks.codegen: CPU only, in the background during H1, H2, 2c and 3, finished before the
#      timed benchmarks start; its compiles share Triton's cache with the other steps, so a kernel the
#      GPU steps compiled with the same specialisation is read, not compiled again)
#                                                          -> $OUT/codegen.md, codegen.json, codegen.log
#   H. hyper attention, its own steps and limits (SKIP_HYPER=1 skips them); the general steps then
#      leave it out (its profile cases, benchmark and tests):
#      H1 GPU tests of the operator (pytest -m gpu)          -> $OUT/hyper_tests.log
#      H2 profile of one training step (joint + gated)      -> $OUT/hyper_profile.{log,txt,json}
#      H3 benchmarks (bench_hyper_attention, quick shapes)  -> $OUT/hyper_bench.log, hyper_attention-<dev>-latest.json
#      H4 tile sweep (benchmarks.tune_hyper)                -> $OUT/hyper_tune.log, hyper_tune.json
#      H5 packed samples vs padded (bench_hyper_attention --varlen: 16 samples of 256-4096 text tokens,
#         1-8 images; FlexAttention document-mask peer)    -> $OUT/hyper_varlen.log,
#                                                             hyper_attention_varlen-<dev>-latest.json
#   2c. profile: one fwd+bwd step per operator under torch.profiler (benchmarks.profile_step: MoE phi-2
#      16k tokens dropless, PLoRA wqkv 8k 50 % visual), kernels by self CUDA time
#                                                          -> $OUT/profile.log, profile.txt, profile.json
#   3. GPU tests: pytest -x tests -m gpu (xdist if there)  -> $OUT/tests.log  (among them the device side
#      of 2d: hyper attention's training-step kernels as this GPU compiles and loads them neither spill
#      nor replicate MMA work, tests/test_codegen.py)
#   4. benchmarks: python3 -m benchmarks.run --out $OUT    -> $OUT/bench.log, <op>-<dev>-latest.{json,png}
#      (each JSON: "commit" and "targets" [{id, value, goal, better, met, ...}], peer targets included)
#   G3. GEMM-family targets from the bench JSONs (benchmarks.targets: measured or "not measured")
#                                                          -> $OUT/gemm_targets.txt
#   5. summary table                                       -> stdout
# Run order: 1, 2 + 2b, G1, 2d (background), H1, H2, 2c, 3, (codegen wait), H3, H5, 4, H4, G3, 5.
# $OUT stays flat (about 30 small files, summary.txt among them).
#
# A machine that hands back only a few files of a run (a lent GPU, say) gets the whole output as one
# tarball with BUNDLE=<path>:
#
#   DEST="$OUT"; OUT=/tmp/gpu_out BUNDLE="$DEST/gpu_bundle.tar.gz" bash benchmarks/gpu_check.sh
#
# Knobs: PYTHON (python3), OUT, BUNDLE (a .tar.gz path for all of OUT), RUN_BUDGET (480),
#        QUICK=1 (bench --quick), SKIP_BUILD=1, SKIP_TUNE=1,
#        SKIP_PROFILE=1, SKIP_TESTS=1, SKIP_BENCH=1, SKIP_GEMM_TUNE=1, SKIP_CODEGEN=1, SKIP_HYPER=1,
#        GEMM_TUNE_TIMEOUT (90), GEMM_ROLES (all; comma-separated), CODEGEN_TIMEOUT (240),
#        BUILD_TIMEOUT (120), TUNE_TIMEOUT (110), PROFILE_TIMEOUT (60), TESTS_TIMEOUT (150),
#        BENCH_TIMEOUT (150), TORCH_CUDA_ARCH_LIST (9.0a), HYPER_TESTS_TIMEOUT (60),
#        HYPER_PROFILE_TIMEOUT (30), HYPER_BENCH_TIMEOUT (100), HYPER_TUNE_TIMEOUT (45), HYPER_VARLEN_TIMEOUT (90),
#        BENCH_OPS ("plora moe ..."; default all, or "plora moe" with the hyper block), PROFILE_CASES
#        ("moe plora hyper_joint hyper_gated"; default all, or "moe plora" with the hyper block),
#        TEST_PATHS (default tests).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_BUDGET="${RUN_BUDGET:-480}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-120}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-110}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-60}"
GEMM_TUNE_TIMEOUT="${GEMM_TUNE_TIMEOUT:-90}"
CODEGEN_TIMEOUT="${CODEGEN_TIMEOUT:-240}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
declare -a HYPER_IGNORE=()
record() {  # step rc seconds note
  local verdict
  case "$2" in
    0) verdict="OK" ;;
    124|137) verdict="TIMEOUT" ;;
    5) verdict="NO-TESTS" ;;
    skip) verdict="SKIPPED" ;;
    *) verdict="FAIL(rc=$2)" ;;
  esac
  SUMMARY+=("$(printf '%-9s %-12s %6ss  %s' "$1" "$verdict" "$3" "$4")")
}

T_ALL=$(date +%s)
SUMMARY_RESERVE=15
limit() {  # step limit: sets LIMIT to min(limit, what is left of RUN_BUDGET before the reserve); false if < 10 s
  local left=$(( T_ALL + RUN_BUDGET - SUMMARY_RESERVE - $(date +%s) ))
  LIMIT=$(( $2 < left ? $2 : left ))
  if [ "$LIMIT" -lt 10 ]; then
    record "$1" skip 0 "no time left (RUN_BUDGET=${RUN_BUDGET}s)"
    return 1
  fi
}

# hyper attention runs in its own steps (H1-H4): the general ones leave it out
HYPER_TESTS="tests/test_hyper_attention.py tests/test_hyper_attention_hardening.py tests/test_hyper_attention_static_cache.py tests/test_hyper_attention_decode.py tests/test_hyper_attention_varlen.py"
if [ "${SKIP_HYPER:-0}" != "1" ]; then
  PROFILE_CASES="${PROFILE_CASES:-moe plora}"
  BENCH_OPS="${BENCH_OPS:-plora moe}"
  for f in $HYPER_TESTS; do HYPER_IGNORE+=(--ignore "$f"); done
fi
hyper_step() {  # name limit log -- command...: a hyper step (HYPER_RC, HYPER_T; false if skipped)
  local name="$1" own="$2" log="$3"; shift 4
  [ "${SKIP_HYPER:-0}" = "1" ] && { record "$name" skip 0 "SKIP_HYPER=1"; return 1; }
  limit "$name" "$own" || return 1
  local t0; t0=$(date +%s)
  timeout -k 5 "$LIMIT" "$@" 2>&1 | tee "$OUT/$log"
  HYPER_RC=${PIPESTATUS[0]}
  HYPER_T=$(( $(date +%s) - t0 ))
}

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
elif limit build "$BUILD_TIMEOUT"; then
  t_build=$(date +%s)
  {
    cat "$OUT/env.txt"
    echo "=== MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} $PY setup.py build_ext --inplace"
    MAX_JOBS="${MAX_JOBS:-8}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
      timeout -k 10 "$LIMIT" "$PY" setup.py build_ext --inplace
    echo "build rc=$?"
  } > "$OUT/build.log" 2>&1 &
  BUILD_PID=$!
fi
rm -f "$OUT/env.txt"

# ---------------------------------------------------------------- 2b. PLoRA block-size sweep
if [ "${SKIP_TUNE:-0}" = "1" ]; then
  record tune skip 0 "SKIP_TUNE=1"
elif limit tune "$TUNE_TIMEOUT"; then
  t0=$(date +%s)
  timeout -k 10 "$LIMIT" "$PY" -m benchmarks.tune_plora --out "$OUT/plora_configs.json" 2>&1 | tee "$OUT/tune.log"
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
elif limit gemmtune "$GEMM_TUNE_TIMEOUT"; then
  t0=$(date +%s)
  gargs=(--out "$OUT/gemm_configs.json" --budget-s $(( LIMIT > 30 ? LIMIT - 20 : 10 )))
  [ -n "${GEMM_ROLES:-}" ] && gargs+=(--roles "$GEMM_ROLES")
  timeout -k 10 "$LIMIT" "$PY" -m benchmarks.tune_gemm "${gargs[@]}" 2>&1 | tee "$OUT/gemm_tune.log"
  rc=${PIPESTATUS[0]}
  record gemmtune "$rc" $(( $(date +%s) - t0 )) "$(grep -cE '^[a-z]+\.[a-z_]+: ' "$OUT/gemm_tune.log") roles swept"
  if [ "$rc" = "0" ] && [ -s "$OUT/gemm_configs.json" ]; then
    export MMKERNELS_GEMM_CONFIGS="$OUT/gemm_configs.json"
  fi
fi
# which path and tile each GEMM role takes now, and why (measured at <commit> on <card>, or the default)
if limit info 30; then
  timeout -k 5 "$LIMIT" "$PY" -m mmkernels info > "$OUT/gemm_roles.txt" 2>&1
fi

# ---------------------------------------------------------------- 2d. codegen table (background, CPU only)
if [ "${SKIP_CODEGEN:-0}" = "1" ]; then
  record codegen skip 0 "SKIP_CODEGEN=1"
elif limit codegen "$CODEGEN_TIMEOUT"; then
  t_codegen=$(date +%s)
  {
    timeout -k 10 "$LIMIT" "$PY" -m benchmarks.codegen --quiet --json "$OUT/codegen.json" \
      > "$OUT/codegen.md" 2> "$OUT/codegen.log"
    echo "codegen rc=$?" >> "$OUT/codegen.log"
  } &
  CODEGEN_PID=$!
fi
wait_codegen() {  # the codegen table is finished before the timed benchmarks start (no CPU load beside them)
  [ -n "${CODEGEN_PID:-}" ] || return 0
  wait "$CODEGEN_PID"
  CODEGEN_PID=
  local rc hyper
  rc=$(grep -o '^codegen rc=[0-9]*' "$OUT/codegen.log" | tail -n 1 | cut -d= -f2)
  hyper=$(grep -c '^| hyper_attention/' "$OUT/codegen.md")
  record codegen "${rc:-1}" $(( $(date +%s) - t_codegen )) \
    "$(grep -c '^| [a-z_]*/' "$OUT/codegen.md") kernels ($hyper hyper); $(grep -E '^Check (passed|failed)' "$OUT/codegen.md" | cut -c1-60)"
}

# ---------------------------------------------------------------- H1, H2. hyper attention: GPU tests, profile
if hyper_step h-tests "${HYPER_TESTS_TIMEOUT:-60}" hyper_tests.log -- \
    "$PY" -m pytest -q -x -p no:cacheprovider $HYPER_TESTS -m gpu; then
  record h-tests "$HYPER_RC" "$HYPER_T" "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/hyper_tests.log" | tail -n 1)"
fi
if hyper_step h-profile "${HYPER_PROFILE_TIMEOUT:-30}" hyper_profile.log -- \
    "$PY" -m benchmarks.profile_step --out "$OUT" --name hyper_profile --case hyper_joint --case hyper_gated; then
  record h-profile "$HYPER_RC" "$HYPER_T" "$(grep -c '^== .*total' "$OUT/hyper_profile.log") cases profiled"
fi

# ---------------------------------------------------------------- 2c. profile (kernel times of one step)
if [ "${SKIP_PROFILE:-0}" = "1" ]; then
  record profile skip 0 "SKIP_PROFILE=1"
elif limit profile "$PROFILE_TIMEOUT"; then
  t0=$(date +%s)
  pargs=(--out "$OUT")
  for c in ${PROFILE_CASES:-}; do pargs+=(--case "$c"); done
  timeout -k 10 "$LIMIT" "$PY" -m benchmarks.profile_step "${pargs[@]}" 2>&1 | tee "$OUT/profile.log"
  rc=${PIPESTATUS[0]}
  record profile "$rc" $(( $(date +%s) - t0 )) "$(grep -c '^== .*total' "$OUT/profile.log") cases profiled, $(grep -c 'not measured' "$OUT/profile.log") not measured"
fi

# ---------------------------------------------------------------- 3. GPU tests
if [ "${SKIP_TESTS:-0}" = "1" ]; then
  record tests skip 0 "SKIP_TESTS=1"
elif limit tests "$TESTS_TIMEOUT"; then
  t0=$(date +%s)
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  timeout -k 10 "$LIMIT" "$PY" -m pytest -q -x -p no:cacheprovider "${xdist[@]}" --durations=10 ${TEST_PATHS:-tests} "${HYPER_IGNORE[@]}" -m gpu 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  record tests "$rc" $(( $(date +%s) - t0 )) "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
fi

wait_codegen

# ---------------------------------------------------------------- H3. hyper attention benchmarks
if hyper_step h-bench "${HYPER_BENCH_TIMEOUT:-100}" hyper_bench.log -- \
    "$PY" -m benchmarks.run --op hyper_attention --quick --out "$OUT"; then
  find "$OUT" -maxdepth 1 -name 'hyper_attention-*-[0-9]*-[0-9]*.json' -delete 2>/dev/null
  record h-bench "$HYPER_RC" "$HYPER_T" "$(grep -cE 'NOT MET' "$OUT/hyper_bench.log") NOT MET, $(grep -cE '\[ *MET\]' "$OUT/hyper_bench.log") MET targets"
  HYPER_TARGETS="$(grep -E '^[[:space:]]*\[( *MET|NOT MET)\]' "$OUT/hyper_bench.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- H5. hyper attention: packed samples vs padded
if hyper_step h-varlen "${HYPER_VARLEN_TIMEOUT:-90}" hyper_varlen.log -- \
    "$PY" -m benchmarks.bench_hyper_attention --varlen --out "$OUT"; then
  record h-varlen "$HYPER_RC" "$HYPER_T" "$(grep -cE 'NOT MET' "$OUT/hyper_varlen.log") NOT MET, $(grep -cE '\[ *MET\]' "$OUT/hyper_varlen.log") MET targets"
  HYPER_TARGETS="${HYPER_TARGETS:-}${HYPER_TARGETS:+
}$(grep -E '^[[:space:]]*\[( *MET|NOT MET)\]' "$OUT/hyper_varlen.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- 4. benchmarks
if [ "${SKIP_BENCH:-0}" = "1" ]; then
  record bench skip 0 "SKIP_BENCH=1"
elif limit bench "$BENCH_TIMEOUT"; then
  t0=$(date +%s)
  args=(--out "$OUT")
  [ "${QUICK:-0}" = "1" ] && args+=(--quick)
  for op in ${BENCH_OPS:-}; do args+=(--op "$op"); done
  timeout -k 10 "$LIMIT" "$PY" -m benchmarks.run "${args[@]}" 2>&1 | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  # keep $OUT small: the timestamped JSON duplicates the -latest one
  find "$OUT" -maxdepth 1 -name '*-[0-9]*-[0-9]*.json' ! -name '*-latest.json' -delete 2>/dev/null
  note="$(grep -cE 'NOT MET' "$OUT/bench.log") NOT MET, $(grep -cE '\[ *MET\]' "$OUT/bench.log") MET targets"
  record bench "$rc" $(( $(date +%s) - t0 )) "$note"
  TARGETS="$(grep -E '^[[:space:]]*\[( *MET|NOT MET)\]' "$OUT/bench.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- H4. hyper attention tile sweep
if hyper_step h-tune "${HYPER_TUNE_TIMEOUT:-45}" hyper_tune.log -- \
    "$PY" -m benchmarks.tune_hyper --out "$OUT/hyper_tune.json"; then
  record h-tune "$HYPER_RC" "$HYPER_T" "$(grep -E '^(bwd|fwd): ' "$OUT/hyper_tune.log" | tr '\n' ';')"
fi

# ---------------------------------------------------------------- G3. GEMM-family targets (measured or not)
# (inside the 15 s kept for the end)
timeout -k 2 10 "$PY" -m benchmarks.targets "$OUT" --json "$OUT/gemm_targets.json" > "$OUT/gemm_targets.txt" 2>&1
record targets $? 0 "$(grep -c 'not measured' "$OUT/gemm_targets.txt") of $(grep -cE '^  [a-z]+\.' "$OUT/gemm_targets.txt") GEMM targets not measured"

# ---------------------------------------------------------------- 5. summary
{
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - T_ALL ))s total, budget ${RUN_BUDGET}s; outputs in $OUT) ==="
  printf '%-9s %-12s %7s  %s\n' step status time note
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ -n "${TARGETS:-}${HYPER_TARGETS:-}" ]; then
    echo "--- targets"
    [ -n "${HYPER_TARGETS:-}" ] && echo "$HYPER_TARGETS"
    [ -n "${TARGETS:-}" ] && echo "$TARGETS"
  fi
  echo "--- files"
  ls -1 "$OUT"
} 2>&1 | tee "$OUT/summary.txt"

# One file for machines that return only a few files of a run: the whole of $OUT as a tarball.
if [ -n "${BUNDLE:-}" ]; then
  tar -czf "$BUNDLE" -C "$OUT" . && echo "bundle: $BUNDLE ($(du -h "$BUNDLE" | cut -f1))"
fi

# exit status: failure of tests or bench (a failed build alone is not fatal)
status=0
for line in "${SUMMARY[@]}"; do
  case "$line" in
    tests*FAIL*|tests*TIMEOUT*|bench*FAIL*|bench*TIMEOUT*|h-tests*FAIL*|h-tests*TIMEOUT*|h-bench*FAIL*) status=1 ;;
  esac
done
exit $status
