#!/usr/bin/env bash
# The test command: creates .venv if needed, installs the package with its test extra, lints, runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k bank`).
# On a CPU-only machine torch is pinned to the CPU build 2.13.0; set LATEXBLEND_TORCH to override
# (e.g. LATEXBLEND_TORCH="torch" on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LATEXBLEND_VENV:-.venv}"
TORCH_SPEC="${LATEXBLEND_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "== installing ($TORCH_SPEC, latexblend[test])"
python -m pip install --quiet "$TORCH_SPEC" -e ".[test]"
echo "== ruff"
ruff check src tests scripts
echo "== pytest"
export HF_HUB_OFFLINE=1
python -m pytest "$@"
