#!/usr/bin/env bash
# GPU evidence (issue 17 Part B) in resumable runs of at most BUDGET_S seconds each, for a machine
# with a GPU, nvcc, compute-sanitizer and a CUDA torch already installed (e.g. the H100/H200
# machines: no network). Everything goes to one folder, $OUT:
#
#   gpu.txt                 device, driver, torch, nvcc, the build's architectures, backend_info
#   build.log               the build (setup.py builds for the visible GPU unless
#                           TORCH_CUDA_ARCH_LIST is set)
#   test_cuda.log           the CUDA variants of the test suite (pytest -n $XDIST -k cuda)
#   test_rest.log           the rest of the suite on this machine (-k "not cuda")
#   <tool>_<piece>.log      compute-sanitizer memcheck / initcheck / synccheck over the CUDA tests
#                           of one piece (below); a finished one ends in its "ERROR SUMMARY" line
#   bench_gpu/, bench_taylor/   benchmark records (python -m torchhessdiag.bench --resume)
#   <step>.done             a finished step (its exit status); <step>.cut: stopped by its timeout
#   summary.txt             one line per step: done / failed / cut / left for the next run
#
# Resuming: a step with <step>.done in $OUT is skipped; a step that does not fit in what is left
# of BUDGET_S is left for the next run (summary.txt says which). The device runner gives each run
# an empty $OUT: copy the previous run's files back into the checkout and pass RESUME_FROM=<that
# folder> (its files are copied into $OUT first). The benchmarks resume inside their folders.
#
#   bash scripts/gpu_check.sh --dry-run     print the plan (steps, commands, skip/budget), run nothing
#
# Environment:
#   OUT (./gpu_out)  BUDGET_S (480)  RESUME_FROM  PY (python3)  XDIST (8: pytest -n; 0 = off)
#   STEPS        which steps, in order (default: all of them, see ALL_STEPS below)
#   SANITIZE_TOOLS (memcheck initcheck synccheck)   SAN_TIMEOUT (150 s per tool and piece)
#   TEST_TIMEOUT (300 per test step)  TEST_ARGS (extra pytest arguments for the suite)
#   BENCH_MINUTES (3 per benchmark run)
#   PARALLEL (4)  test and sanitizer steps run this many at a time (separate processes, one GPU)
#   FORCE=1      rerun steps that are already done
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${DRY_RUN:-0}" = "1" ] && DRY=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-480}"
XDIST="${XDIST:-8}"
SAN_TIMEOUT="${SAN_TIMEOUT:-150}"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
BENCH_MINUTES="${BENCH_MINUTES:-3}"
SANITIZE_TOOLS="${SANITIZE_TOOLS:-memcheck initcheck synccheck}"
PARALLEL="${PARALLEL:-4}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
if [ -n "${RESUME_FROM:-}" ] && [ -d "$RESUME_FROM" ] && [ "$DRY" = 0 ]; then
  cp -rn "$RESUME_FROM"/. "$OUT"/
fi

# The CUDA tests each sanitizer sees, in pieces that fit one timeout each: the fused MLP op, the
# ops (engine layer op, taylor_act, the activation-table ops), the engine, the jets. -k cuda selects the CUDA
# variants; in test_table only the tests that launch the table kernels on many points (its other
# tests spend their time in mpmath on the CPU).
declare -A PIECE_FILES=(
  [layer]="tests/ops/test_layer_ops.py"
  [taylor]="tests/ops/test_taylor_op.py"
  [table]="tests/ops/test_table.py"
  [engine]="tests/engine/test_engine.py"
  [jets]="tests/general/test_jets.py"
  [fused]="tests/engine/test_fused.py"
)
declare -A PIECE_K=(
  [layer]="cuda" [taylor]="cuda" [engine]="cuda" [jets]="cuda" [fused]="cuda"
  [table]="cuda and (compiled_matches_reference or wide or finite_at_large_z)"
)
PIECES="fused layer taylor table engine jets"

ALL_STEPS="info build test_cuda test_rest"
for tool in $SANITIZE_TOOLS; do
  for piece in $PIECES; do ALL_STEPS+=" ${tool}_${piece}"; done
done
ALL_STEPS+=" bench_gpu bench_taylor"
STEPS="${STEPS:-$ALL_STEPS}"

t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
say() { echo "== [$(elapsed)s] $*"; }
xdist_args() { [ "$XDIST" != "0" ] && echo "-n $XDIST"; }

# The command and the time budget (its timeout, seconds) of one step.
step_cmd() {
  local s="$1"
  case "$s" in
    info)
      echo "nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; nvcc --version | tail -2; $PY -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'" ;;
    build)
      echo "$PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'import torchhessdiag as t; i = t.backend_info(); print(i); assert i[\"cuda_kernels\"], i'" ;;
    test_cuda)
      echo "$PY -m pytest -q -p no:cacheprovider $(xdist_args) -k cuda ${TEST_ARGS:-} tests" ;;
    test_rest)
      echo "$PY -m pytest -q -p no:cacheprovider $(xdist_args) -k 'not cuda' ${TEST_ARGS:-} tests" ;;
    bench_gpu)
      echo "$PY -m torchhessdiag.bench --preset gpu --out $OUT/bench_gpu --resume --max-minutes $BENCH_MINUTES --no-progress" ;;
    bench_taylor)
      echo "$PY -m torchhessdiag.bench --preset taylor --device cuda --out $OUT/bench_taylor --resume --max-minutes $BENCH_MINUTES --no-progress" ;;
    memcheck_*|initcheck_*|synccheck_*|racecheck_*)
      local tool="${s%%_*}" piece="${s#*_}"
      [ -n "${PIECE_FILES[$piece]:-}" ] || { echo "unknown step $s" >&2; return 1; }
      echo "compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 $PY -m pytest -q -p no:cacheprovider -k '${PIECE_K[$piece]}' ${PIECE_FILES[$piece]}" ;;
    *) echo "unknown step $s" >&2; return 1 ;;
  esac
}
step_cost() {
  case "$1" in
    info) echo 30 ;;
    build) echo 240 ;;
    test_*) echo "$TEST_TIMEOUT" ;;
    bench_*) echo $(( BENCH_MINUTES * 60 + 60 )) ;;
    *) echo "$SAN_TIMEOUT" ;;
  esac
}

# Hash of what the build depends on: a build.done from other sources is not reused.
src_hash() { find csrc setup.py torchhessdiag/_archs.py -type f | sort | xargs cat | sha1sum | cut -c1-16; }

# A step is done when $OUT (or, in a dry run, RESUME_FROM, which a real run copies into $OUT)
# holds its .done file.
done_file() {
  if [ -f "$OUT/$1.done" ]; then echo "$OUT/$1.done"
  elif [ "$DRY" = "1" ] && [ -n "${RESUME_FROM:-}" ] && [ -f "$RESUME_FROM/$1.done" ]; then echo "$RESUME_FROM/$1.done"
  fi
}
is_done() {
  local s="$1" f
  [ "${FORCE:-0}" = "1" ] && return 1
  f="$(done_file "$s")"
  [ -n "$f" ] || return 1
  if [ "$s" = build ]; then  # the machine may be a fresh one: the extension must be here too
    grep -q "$(src_hash)" "$f" || return 1
    $PY -c 'import torchhessdiag as t, sys; sys.exit(0 if t.backend_info()["cuda_kernels"] else 1)' >/dev/null 2>&1 || return 1
  fi
  return 0
}

# Record how a step ended (rc: its exit status, from timeout(1) when it was cut).
finish_step() {
  local s="$1" rc="$2" cost
  cost="$(step_cost "$s")"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== cut by the step's ${cost}s timeout: no ERROR SUMMARY / incomplete (raise the timeout or narrow the piece)" >> "$OUT/$s.log"
    echo "cut after ${cost}s" > "$OUT/$s.cut"
    say "$s: CUT after ${cost}s"; return 0
  fi
  if [[ "$s" == bench_* ]] && [ "$rc" -eq 3 ]; then  # blocks left: the next run resumes
    say "$s: blocks left for the next run"; echo "$s" >> "$OUT/.left"; return 0
  fi
  if [ "$s" = build ] && [ "$rc" -eq 0 ]; then
    echo "rc=0 src=$(src_hash)" > "$OUT/$s.done"
  else
    echo "rc=$rc" > "$OUT/$s.done"
  fi
  say "$s: rc=$rc"
  case "$s" in
    info|build) tail -5 "$OUT/$s.log" ;;
    test_*|bench_*) tail -3 "$OUT/$s.log" ;;
    *) grep -E "ERROR SUMMARY" "$OUT/$s.log" | tail -1; grep -E "passed|failed" "$OUT/$s.log" | tail -1 ;;
  esac
}

# Run the steps of one wave side by side (each in its own process, with its own timeout); the
# wave needs the largest of their budgets. Steps done in an earlier run are skipped; a wave that
# does not fit in what is left of BUDGET_S is left for the next run.
run_wave() {
  local todo=() s c cost=0 left
  for s in "$@"; do
    if is_done "$s"; then say "$s: done in an earlier run ($(head -1 "$(done_file "$s")"))"; else todo+=("$s"); fi
  done
  [ "${#todo[@]}" -eq 0 ] && return 0
  for s in "${todo[@]}"; do
    step_cmd "$s" > /dev/null || return 1
    c="$(step_cost "$s")"; [ "$c" -gt "$cost" ] && cost="$c"
  done
  left=$(( BUDGET_S - $(elapsed) ))
  if [ "$cost" -gt "$left" ]; then
    say "${todo[*]}: need up to ${cost}s, ${left}s left: left for the next run"
    [ "$DRY" = "1" ] || printf '%s\n' "${todo[@]}" >> "$OUT/.left"
    return 0
  fi
  if [ "$DRY" = "1" ]; then
    for s in "${todo[@]}"; do say "$s (up to $(step_cost "$s")s): $(step_cmd "$s")"; done
    t0=$(( t0 - cost ))  # plan as if the wave used its whole budget
    return 0
  fi
  for s in "${todo[@]}"; do
    say "$s (up to $(step_cost "$s")s) -> $OUT/$s.log"
    rm -f "$OUT/$s.cut" "$OUT/$s.rc"
    ( timeout --kill-after=20 "$(step_cost "$s")" bash -c "$(step_cmd "$s")" > "$OUT/$s.log" 2>&1
      echo $? > "$OUT/$s.rc" ) &
  done
  wait
  for s in "${todo[@]}"; do finish_step "$s" "$(cat "$OUT/$s.rc" 2>/dev/null || echo 1)"; rm -f "$OUT/$s.rc"; done
}

summary() {
  {
    echo "gpu_check summary ($(date -u +%FT%TZ), budget ${BUDGET_S}s, this run ${1}s)"
    for s in $STEPS; do
      if [ -f "$OUT/$s.done" ]; then
        line="$(head -1 "$OUT/$s.done")"
        case "$s" in
          test_*) extra="$(grep -E "passed|failed|error" "$OUT/$s.log" 2>/dev/null | tail -1)" ;;
          info|build|bench_*) extra="" ;;
          *) extra="$(grep -E "ERROR SUMMARY" "$OUT/$s.log" 2>/dev/null | tail -1 | sed 's/^=* *//'); $(grep -E "passed|failed" "$OUT/$s.log" 2>/dev/null | tail -1)" ;;
        esac
        printf '%-22s done  %s  %s\n' "$s" "$line" "$extra"
      elif [ -f "$OUT/$s.cut" ]; then
        printf '%-22s CUT   %s (see %s.log)\n' "$s" "$(cat "$OUT/$s.cut")" "$s"
      elif grep -qx "$s" "$OUT/.left" 2>/dev/null; then
        printf '%-22s left for the next run\n' "$s"
      else
        printf '%-22s not run\n' "$s"
      fi
    done
  } > "$OUT/summary.txt"
}

rm -f "$OUT/.left"
if [ "$DRY" = "1" ]; then
  say "dry run: plan for OUT=$OUT, budget ${BUDGET_S}s (each wave charged its full timeout)"
fi
# Waves: info and build alone; then the tests and sanitizer runs PARALLEL at a time; each
# benchmark alone (its timings must not share the machine).
wave=()
flush() { [ "${#wave[@]}" -gt 0 ] && run_wave "${wave[@]}"; wave=(); }
for s in $STEPS; do
  case "$s" in
    info|build|bench_*)
      flush; run_wave "$s"
      if [ "$s" = build ] && [ "$DRY" = "0" ] && [ -f "$OUT/build.done" ] && ! grep -q "^rc=0" "$OUT/build.done"; then
        say "the build failed: nothing else can run (see $OUT/build.log)"; STOPPED=1; break
      fi ;;
    *) wave+=("$s"); [ "${#wave[@]}" -ge "$PARALLEL" ] && flush ;;
  esac
done
[ -z "${STOPPED:-}" ] && flush
if [ "$DRY" = "0" ]; then
  summary "$(elapsed)"
  {
    cat "$OUT/info.log" 2>/dev/null
    $PY -c 'import torchhessdiag as t; i = t.backend_info(); print("cuda_archs:", i["cuda_archs"], "fallback:", i["cuda_fallback"])' 2>&1
    # libstdc++ number formatting must come from libstdc++.so, not a private copy in _C (a private
    # copy crashed error-message formatting on such a machine; see csrc/messages.h)
    echo "private ostream code in _C: $(nm -C --defined-only torchhessdiag/_C*.so 2>/dev/null | grep -c '_M_insert<') symbols"
  } > "$OUT/gpu.txt" 2>&1
  say "summary: $OUT/summary.txt"
  cat "$OUT/summary.txt"
else
  say "dry run done: nothing was run"
fi
