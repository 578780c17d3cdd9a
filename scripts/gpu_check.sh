#!/usr/bin/env bash
# Every GPU check of ot_agnostic, in one command, on a machine with one NVIDIA GPU:
#
#     bash scripts/gpu_check.sh            # results in $OUT (if set) or ./gpu_results
#
# 1. Python packages: uses the interpreter's own torch / CuPy / numba-cuda when they see the
#    GPU; otherwise installs CUDA wheels (torch from PyPI is a CUDA build on Linux x86-64,
#    cupy-cuda12x, numba-cuda[cu12]) with pip. Offline machines: put wheels in ./.whl
#    (see docs/backends.rst, "GPU check"); they are installed with --no-index into a
#    private folder. ot_agnostic itself runs from this checkout (PYTHONPATH), no install.
# 2. Tests on the GPU: tests/test_cupy.py (CuPy + Numba CUDA), tests/test_torch_cuda.py
#    (torch + Numba CUDA, torch + KeOps, the "auto" rule, refusals), tests/test_grid_gpu.py
#    (the grid solvers on the Numba CUDA grid kernel); junit XML and log.
# 3. Benchmark: divergence + gradient, N = M = 10k, 100k, 1M, D = 3, float32 (ours on
#    CuPy, ours on torch with KeOps and with Numba CUDA, GeomLoss online and multiscale),
#    benchmarks_scripts/torch_backends_vs_geomloss.py --device cuda, into gpu_table.json.
#
# Time: at most ~8 minutes (each step has its own timeout; the benchmark skips a contender
# predicted above its cap and saves its table after every size).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
RESULTS="${OUT:-$ROOT/gpu_results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 KEOPS_CACHE_FOLDER="$ROOT/.keops_cache" NUMBA_CACHE_DIR="$ROOT/.numba_cache"
export PYKEOPS_VERBOSE=0
start=$SECONDS
log() { echo "[gpu_check $((SECONDS - start)) s] $*" | tee -a "$RESULTS/gpu_check.log"; }

if ! command -v nvidia-smi >/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
    log "no NVIDIA GPU here (no nvidia-smi): nothing to check; run this on a machine with one"
    exit 2
fi

SITE=/tmp/ot_agnostic_gpu_site
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing the wheels of .whl (offline) into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || log "WARNING: the wheels of .whl did not all install"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi

need() {  # need MODULE PIP-SPEC...: pip install the specs unless MODULE imports
    local module="$1"; shift
    if ! "$PY" -c "import $module" 2>/dev/null; then
        log "installing $* (no $module here)"
        "$PY" -m pip install -q "$@" || log "WARNING: pip install $* failed"
    fi
}
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    log "installing a CUDA build of torch (this interpreter's torch sees no GPU)"
    "$PY" -m pip install -q --upgrade torch || log "WARNING: pip install torch failed"
fi
need cupy cupy-cuda12x
need numba.cuda "numba-cuda[cu12]"
need array_api_compat array-api-compat
need pykeops pykeops
need geomloss geomloss
need pytest pytest hypothesis

"$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS/gpu_check.log"
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "numba", "torch", "cupy", "pykeops", "geomloss", "array_api_compat"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as err:
        print(f"{name} UNAVAILABLE: {type(err).__name__}: {err}")
import torch
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none seen by torch")
try:
    from numba import cuda
    print("numba.cuda available:", cuda.is_available())
except Exception as err:
    print("numba.cuda UNAVAILABLE:", err)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$RESULTS/gpu_check.log" 2>&1

log "tests on the GPU"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/test_cupy.py tests/test_torch_cuda.py tests/test_grid_gpu.py --junitxml="$RESULTS/gpu_tests.xml" \
    >"$RESULTS/gpu_tests.log" 2>&1
tests_status=$?
tail -n 25 "$RESULTS/gpu_tests.log"
log "tests exited with $tests_status"

log "benchmark (N = M = 10k, 100k, 1M)"
timeout 300 "$PY" benchmarks_scripts/torch_backends_vs_geomloss.py --device cuda \
    --sizes 10000 100000 1000000 --repeat 2 --cap 40 --out "$RESULTS/gpu_table.json" \
    2>&1 | tee "$RESULTS/gpu_table.log"
bench_status=${PIPESTATUS[0]}
log "benchmark exited with $bench_status; results in $RESULTS"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
