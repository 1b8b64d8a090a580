#!/usr/bin/env bash
# The one command a GPU session runs (device tool: at most 10 minutes a command; the whole script keeps to
# BUDGET_S, default 560 s, by giving each stage at most what is left of it):
#   1. import check: the engine imports with only the GPU image's packages (+ the wheels brought along);
#   2. GPU tests: NVRTC compile checks, every kernel vs its torch reference (RWKV-4's and RWKV-7's), the graph
#      stepper and Model on CUDA vs the CPU reference and vs HF transformers, RWKV-7's Model.step on the arena
#      in place vs the CPU model (fp32, fp16); on the GPU a skipped test counts as a failure;
#   3. compute-sanitizer memcheck and racecheck over the kernel tests of both families (PyTorch's caching
#      allocator off, so an out-of-bounds access is not hidden inside a cached block);
#   4. bench/gpu_bench.py for RWKV-7 (0.1B shape: one-token steps at batches 1/16/64/256, prefill tokens/s,
#      the torch path beside it, GPU vs CPU logits parity in fp32 and fp16), stage time <= 120 s;
#   5. bench/gpu_bench.py for RWKV-4 (169M and 1.5B shapes, batches 1/16/64/256, positions 1e3/1e6,
#      transformers and the `rwkv` package as peers) with what is left (<= 240 s); rows written as measured.
# Worst case of the stage limits: 120 + 100 + 80 + 120 + 240 s; BUDGET_S cuts the last stage short instead
# of the device tool killing the script (what a cut stage measured is kept).
# Every stage writes into $OUT (the device tool's output folder; else bench/results/gpu_check/) as it goes:
# check.log (everything), tests.log, sanitizer.log (memcheck then racecheck), gpu_bench7.json(l),
# gpu_bench.json(l), summary.txt: 8 files, what the device tool brings back from $OUT at most (the junit XML
# and each sanitizer run's own log stay in the scratch folder).
#
#   bash bench/gpu_check.sh                     # on the GPU machine
#   REHEARSAL=1 bash bench/gpu_check.sh         # here, without a GPU: the same stages with the GPU parts
#                                               # stubbed (kernels in the g++ emulation, no sanitizer, the
#                                               # benchmark's --cpu-smoke, spaCy/kafka imports blocked)
#
# Wheels: the GPU machine reaches no package registry. Its image has Python 3.12, torch, cupy-cuda13x,
# transformers, msgpack, pytest, tqdm, hypothesis, prometheus-client, compute-sanitizer; not `rwkv`, spaCy,
# kafka-python. The check installs every wheel in $WHEELS (default .venv/gpu-wheels, ignored by git) into a
# temporary folder first. Prepare it once on a machine with pip (`rwkv` is pure Python; ninja lets the
# `rwkv` package build its CUDA kernel where nvcc exists):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .venv/gpu-wheels rwkv==0.8.32 ninja
# and name `.venv/gpu-wheels` in the device run's carry list.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
PY="${PYTHON:-python3}"
# The stages run from a scratch folder: a relative interpreter path (PYTHON=.venv/bin/python) is made absolute.
case "$PY" in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
RESULTS="${OUT:-$REPO/bench/results/gpu_check}"
WHEELS="${WHEELS:-$REPO/.venv/gpu-wheels}"
REHEARSAL="${REHEARSAL:-0}"
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/check.log") 2>&1
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
unset RWKV_JIT_ON RWKV_CUDA_ON  # the `rwkv` peer runs as its users run it (the benchmark sets JIT + CUDA on)
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
: >"$RESULTS/sanitizer.log"
record() { printf '%-12s rc=%-4s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }
# limit NAME SECONDS: the stage's time limit, at most what is left of BUDGET_S (less 10 s for the summary);
# prints nothing and records the stage as not run when under 20 s are left.
limit() {
  local left=$((BUDGET_S - (SECONDS - START) - 10))
  if [ "$left" -lt 20 ]; then record "$1" 124 "not run: ${left}s of BUDGET_S=${BUDGET_S} left" >&2; return 1; fi
  echo $(($2 < left ? $2 : left))
}

# Import rwkv_stream through a link, not by putting the repo root on sys.path: the repo's cuda/ folder
# would otherwise shadow the `cuda` namespace package (cuda.pathfinder) that CuPy imports.
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
ln -s "$REPO/rwkv_stream" "$SITE/rwkv_stream"
mkdir -p "$SITE/deps"
export PYTHONPATH="$SITE:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
if [ "$REHEARSAL" = 1 ]; then
  # What the GPU image lacks cannot be imported here either (`rwkv` comes from the wheels, first on the path).
  mkdir -p "$SITE/blocked"
  cat >"$SITE/blocked/sitecustomize.py" <<'PYEOF'
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("spacy", "kafka"):
            raise ImportError(f"No module named {name!r} (not on the GPU image)")
        return None
sys.meta_path.insert(0, _Missing())
PYEOF
  export PYTHONPATH="$SITE/blocked:$PYTHONPATH"
  export RWKV_REQUIRE_GPU=0
  TEST_SELECT="not gpu"
  TESTS_TIMEOUT=900  # the g++ emulation on a busy 2-core machine; the GPU run keeps 120 s
  SANITIZER=""
  BENCH_ARGS="${BENCH_ARGS:---cpu-smoke}"
  BENCH7_ARGS="${BENCH7_ARGS:---cpu-smoke}"
  BUDGET_S="${BUDGET_S:-3600}"  # the emulation on a shared 2-core machine
else
  export RWKV_REQUIRE_GPU=1
  TEST_SELECT="not emulated and not emulator"
  TESTS_TIMEOUT=120
  SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
  BENCH_ARGS="${BENCH_ARGS:---shapes 169m,1.5b --batches 1,16,64,256 --steps 120}"
  BENCH7_ARGS="${BENCH7_ARGS:---rwkv7-shapes rwkv7-0.1b --batches 1,16,64,256 --steps 80}"
  BUDGET_S="${BUDGET_S:-560}"
fi
cd "$SITE" || exit 2

echo "== machine $(date -u +%FT%TZ) rehearsal=$REHEARSAL"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PYEOF'
import sys, torch
try:
    import cupy; cp = cupy.__version__
except Exception as e:  # noqa: BLE001
    cp = f"missing ({e})"
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cupy", cp, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PYEOF

echo "== wheels from $WHEELS"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/deps" "$WHEELS"/*.whl
  record wheels $? "$(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
else
  record wheels 0 "none in $WHEELS (the rwkv peer will be skipped)"
fi

echo "== import check"
"$PY" -c "
import rwkv_stream, rwkv_stream.gpu, rwkv_stream.models.rwkv4, rwkv_stream.sessions, rwkv_stream.loading
import rwkv_stream.gpu7, rwkv_stream.models.rwkv7, rwkv_stream.kernels_ref7
from rwkv_stream.gpu import CudaGraphStepper
import sys
assert not any(m.split('.')[0] in ('spacy', 'kafka') for m in sys.modules), 'the engine imported spaCy/kafka'
print('engine imports:', rwkv_stream.__file__)
"
rc=$?
record import $rc "rwkv_stream, gpu, gpu7, models (rwkv4, rwkv7), sessions, loading"
[ $rc -eq 0 ] || { echo "the engine does not import: stopping"; exit 1; }

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --rootdir "$REPO" -c "$REPO/setup.cfg")
TESTS=("$REPO/tests/test_cuda_compile.py" "$REPO/tests/test_gpu_kernels.py" "$REPO/tests/test_gpu_engine.py"
       "$REPO/tests/test_gpu_model.py" "$REPO/tests/test_rwkv7_kernels.py")
KERNEL_TESTS=("$REPO/tests/test_gpu_kernels.py" "$REPO/tests/test_rwkv7_kernels.py")

echo "== tests (NVRTC compile, kernels vs reference, stepper and Model vs CPU reference and transformers; RWKV-4 and RWKV-7)"
if [ "$REHEARSAL" = 1 ]; then SEL=(-m "$TEST_SELECT"); else SEL=(-k "$TEST_SELECT"); fi
if t=$(limit tests "$TESTS_TIMEOUT"); then
  timeout "$t" "${PYTEST[@]}" "${TESTS[@]}" "${SEL[@]}" --junitxml="$SITE/tests.xml" >"$RESULTS/tests.log" 2>&1
  rc=$?
  tail -n 15 "$RESULTS/tests.log"
  skipped=$(grep -o 'skipped="[0-9]*"' "$SITE/tests.xml" 2>/dev/null | head -n 1 | tr -dc 0-9)
  if [ "$REHEARSAL" != 1 ] && [ "${skipped:-0}" != 0 ] && [ $rc -eq 0 ]; then rc=5; fi
  record tests $rc "$(tail -n 1 "$RESULTS/tests.log") (skipped: ${skipped:-?})"
fi

for tool in memcheck racecheck; do
  echo "== compute-sanitizer $tool over the kernel tests"
  # test names: RWKV-4's test_wkv_*, test_token_shift_*, test_add_layernorm, test_relu_square; RWKV-7's
  # test_wkv7_step, test_wkv7_ragged, test_token_shift7 (shift7 kernel)
  if [ "$REHEARSAL" = 1 ]; then
    WRAP=()
    SELECT="emulated and (wkv or token_shift or layernorm or relu)"
  elif [ -n "$SANITIZER" ]; then
    WRAP=("$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20)
    SELECT="cuda and (wkv or token_shift or layernorm or relu)"
    [ "$tool" = racecheck ] && SELECT="cuda and (layernorm or token_shift_ragged or wkv7)"
  else
    record "$tool" 127 "compute-sanitizer not found"
    continue
  fi
  stage=100; [ "$tool" = racecheck ] && stage=80; [ "$REHEARSAL" = 1 ] && stage=600
  t=$(limit "$tool" "$stage") || continue
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$t" "${WRAP[@]}" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" \
      -k "$SELECT" >"$SITE/$tool.log" 2>&1
  rc=$?
  { echo "== compute-sanitizer $tool (rc=$rc)"; cat "$SITE/$tool.log"; } >>"$RESULTS/sanitizer.log"
  tail -n 6 "$SITE/$tool.log"
  record "$tool" $rc "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$SITE/$tool.log" | tail -n 2 | tr '\n' ' ')"
done

if [ -z "${SKIP_BENCH:-}" ]; then
  # RWKV-7 first (short, its own stage and file), then RWKV-4 with what is left of the budget.
  echo "== benchmark RWKV-7 ($BENCH7_ARGS)"
  if t=$(limit bench7 120); then
    # shellcheck disable=SC2086
    timeout "$t" "$PY" "$REPO/bench/gpu_bench.py" --out "$RESULTS/gpu_bench7.json" --shapes "" --peers "" \
        $BENCH7_ARGS 2>&1 | grep -v -i "warn" | tail -n 12
    rc=${PIPESTATUS[0]}
    record bench7 "$rc" "$(wc -l <"$RESULTS/gpu_bench7.jsonl" 2>/dev/null || echo 0) rows in gpu_bench7.jsonl"
  fi
  echo "== benchmark RWKV-4 ($BENCH_ARGS)"
  if t=$(limit bench 240); then
    # shellcheck disable=SC2086
    timeout "$t" "$PY" "$REPO/bench/gpu_bench.py" --out "$RESULTS/gpu_bench.json" --rwkv7-shapes "" $BENCH_ARGS \
        2>&1 | grep -v -i "warn" | tail -n 25
    rc=${PIPESTATUS[0]}
    record bench "$rc" "$(wc -l <"$RESULTS/gpu_bench.jsonl" 2>/dev/null || echo 0) rows in gpu_bench.jsonl"
  fi
fi

echo "== summary ($((SECONDS - START)) s of BUDGET_S=$BUDGET_S)"
cat "$SUMMARY"
! grep -qv ' rc=0 ' "$SUMMARY"
