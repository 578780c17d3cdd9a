#!/usr/bin/env bash
# Set up (or reuse) .venv with torch and ot_agnostic, then run examples/demo.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" torch
exec "$OT_PYTHON" examples/demo.py "$@"
