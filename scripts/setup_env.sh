# shellcheck shell=bash
# Create (or reuse) the project's virtualenv and install ot_agnostic into it.
#
# Sourced, not executed, by scripts/test.sh, scripts/demo.sh, scripts/docs.sh and .ci/run:
#
#     source scripts/setup_env.sh [EXTRAS]      # e.g. EXTRAS="test" or "docs,bench"
#
# Afterwards: $OT_ROOT is the repository root, $OT_PYTHON the venv's python, the working
# directory is $OT_ROOT, and KEOPS_CACHE_FOLDER / NUMBA_CACHE_DIR point inside the repo.
#
# Environment knobs:
#   OT_VENV           where the venv lives (default: $OT_ROOT/.venv)
#   PYTHON            interpreter used to create it (default: python3)
#   OT_FORCE_INSTALL  1 to reinstall even if the venv looks up to date
#
# torch is installed FIRST and pinned to 2.13.0: that CPU wheel is what CI machines have on
# disk; an unpinned `torch` would pull a multi-GB CUDA build. The extras' range
# `torch>=2.1,<3` is then already satisfied and pip leaves torch alone.

OT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OT_VENV="${OT_VENV:-$OT_ROOT/.venv}"
OT_TORCH_SPEC="torch==2.13.0"
_ot_extras="${1-}"

cd "$OT_ROOT"

if [ ! -x "$OT_VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $OT_VENV" >&2
    "${PYTHON:-python3}" -m venv "$OT_VENV"
    "$OT_VENV/bin/python" -m pip install --upgrade pip
fi
OT_PYTHON="$OT_VENV/bin/python"

# Skip pip when nothing changed since the last install of these extras (a no-op
# `pip install -e` still rebuilds the editable wheel, which takes a few seconds and
# briefly uninstalls the package under the feet of anyone using the same venv).
_ot_stamp="$OT_VENV/.ot_agnostic_installed"
_ot_key="$({ cat "$OT_ROOT/pyproject.toml"; echo "extras=$_ot_extras $OT_TORCH_SPEC root=$OT_ROOT"; } \
    | { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; } | cut -d' ' -f1)"
if [ "${OT_FORCE_INSTALL:-0}" = 1 ] \
    || ! grep -qx "$_ot_key" "$_ot_stamp" 2>/dev/null \
    || ! "$OT_PYTHON" -c "import torch, ot_agnostic, sys; sys.exit(not ot_agnostic.__file__.startswith('$OT_ROOT/'))" 2>/dev/null; then
    echo "[setup] installing $OT_TORCH_SPEC, then ot_agnostic[${_ot_extras}] (editable)" >&2
    "$OT_PYTHON" -m pip install "$OT_TORCH_SPEC"
    if [ -n "$_ot_extras" ]; then
        "$OT_PYTHON" -m pip install -e ".[$_ot_extras]"
    else
        "$OT_PYTHON" -m pip install -e .
    fi
    echo "$_ot_key" >> "$_ot_stamp"
else
    echo "[setup] $OT_VENV is up to date for ot_agnostic[${_ot_extras}]" >&2
fi

# JIT caches stay inside the repository (both folders are in .gitignore).
export KEOPS_CACHE_FOLDER="${KEOPS_CACHE_FOLDER:-$OT_ROOT/.keops_cache}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$OT_ROOT/.numba_cache}"
mkdir -p "$KEOPS_CACHE_FOLDER" "$NUMBA_CACHE_DIR"

unset _ot_extras _ot_stamp _ot_key
