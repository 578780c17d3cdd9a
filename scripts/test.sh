#!/usr/bin/env bash
# Set up (or reuse) .venv with the test extras and run the whole test suite.
# This is THE test command: the README documents it and .ci/run calls it.
# Extra arguments go to the main pytest run, e.g. `bash scripts/test.sh -k sinkhorn -x`;
# the CUDA simulator tests (tests/cuda_sim) then run in full in a second process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test

# testpaths (tests/ and the package's doctests) and options come from pyproject.toml.
# pytest's own exit code is kept: 5 ("no tests collected") fails like any other error.
# SCIPY_ARRAY_API=1: scikit-learn's estimator checks then include its Array API checks
# (OTTransformer on array-api-strict and torch arrays); it must be set before SciPy loads.
export SCIPY_ARRAY_API=1
status=0
"$OT_PYTHON" -m pytest --durations=15 "$@" || status=$?

# Then the CUDA kernels on Numba's CUDA simulator (no GPU needed), in a process of their
# own: Numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so tests/conftest.py
# keeps tests/cuda_sim out of the run above. The script fails if either run fails.
sim_status=0
NUMBA_ENABLE_CUDASIM=1 "$OT_PYTHON" -m pytest tests/cuda_sim || sim_status=$?
if [ "$status" -eq 0 ]; then
    status=$sim_status
fi
exit "$status"
