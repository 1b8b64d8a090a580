#!/usr/bin/env bash
# One-shot GPU check for the CUDA backend: NVRTC compile test, kernel and engine tests on the GPU, then
# the benchmark (bench/gpu_bench.py). Fits in < 6 min on an H200. Results go to $OUT (the device tool's
# output folder) or bench/results/: gpu_tests.log, gpu_tests.xml, gpu_bench.json, gpu_bench.log.
#
#   bash bench/gpu_check.sh                 # everything
#   SKIP_BENCH=1 bash bench/gpu_check.sh    # tests only
#   BENCH_ARGS="--shapes 169m" bash bench/gpu_check.sh
#
# pytest missing on the machine: it is installed from the wheels in $WHEELS (default .venv/gpu-wheels,
# fill it with `pip download pytest -d .venv/gpu-wheels` and pass that path in the run's carry list).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/bench/results}"
WHEELS="${WHEELS:-$REPO/.venv/gpu-wheels}"
mkdir -p "$RESULTS"
export RWKV_JIT_ON=0 RWKV_CUDA_ON=0 PYTHONDONTWRITEBYTECODE=1
export RWKV_REQUIRE_GPU="${RWKV_REQUIRE_GPU:-1}"  # on the GPU machine a skipped GPU test is a failure

# Import rwkv_stream through a link, not by putting the repo root on sys.path: the repo's cuda/ folder
# would otherwise shadow the `cuda` namespace package (cuda.pathfinder) that CuPy imports.
SITE="$(mktemp -d)"
ln -s "$REPO/rwkv_stream" "$SITE/rwkv_stream"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$SITE" || exit 2

if ! "$PY" -c "import pytest" 2>/dev/null; then
  if ls "$WHEELS"/pytest-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE/deps" pytest 2>/dev/null \
      || cp "$WHEELS"/*.whl "$SITE/" 2>/dev/null
    for w in "$SITE"/*.whl; do [ -e "$w" ] && PYTHONPATH="$PYTHONPATH:$w"; done
    export PYTHONPATH="$PYTHONPATH:$SITE/deps"
  fi
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" - <<'EOF'
import sys, torch
try:
    import cupy; cp = cupy.__version__
except Exception as e:  # noqa: BLE001
    cp = f"missing ({e})"
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cupy", cp, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF

tests_rc=0
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== tests (NVRTC compile, kernels vs reference, stepper vs reference)"
  timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider --rootdir "$REPO" -c "$REPO/setup.cfg" \
      "$REPO/tests/test_cuda_compile.py" "$REPO/tests/test_gpu_kernels.py" "$REPO/tests/test_gpu_engine.py" "$REPO/tests/test_gpu_model.py" \
      -k "not emulated" --junitxml="$RESULTS/gpu_tests.xml" >"$RESULTS/gpu_tests.log" 2>&1
  tests_rc=$?
  tail -n 25 "$RESULTS/gpu_tests.log"
else
  echo "== tests SKIPPED: pytest is not importable and no wheels in $WHEELS"
  tests_rc=3
fi

bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== benchmark"
  # shellcheck disable=SC2086
  timeout 180 "$PY" "$REPO/bench/gpu_bench.py" --out "$RESULTS/gpu_bench.json" ${BENCH_ARGS:-} \
      >"$RESULTS/gpu_bench.log" 2>&1
  bench_rc=$?
  grep -v -i "warn" "$RESULTS/gpu_bench.log" | tail -n 20
fi

rm -rf "$SITE"
echo "== done: tests rc=$tests_rc bench rc=$bench_rc (logs and JSON in $RESULTS)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
