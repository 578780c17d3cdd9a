#!/usr/bin/env bash
# Set up (or reuse) .venv with the test extras and run the whole test suite.
# This is THE test command: the README documents it and .ci/run calls it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sinkhorn -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test

# testpaths (tests/ and the package's doctests) and options come from pyproject.toml.
# pytest's own exit code is kept: 5 ("no tests collected") fails like any other error.
exec "$OT_PYTHON" -m pytest --durations=15 "$@"
