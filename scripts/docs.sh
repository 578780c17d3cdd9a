#!/usr/bin/env bash
# Set up (or reuse) .venv with the docs extras and build the HTML documentation into
# docs/_build/html. Warnings are errors (-W), and -n reports broken references.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" docs
exec "$OT_PYTHON" -m sphinx -E -W --keep-going -n -b html docs docs/_build/html "$@"
