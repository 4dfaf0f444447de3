# Sourced by scripts/test.sh, scripts/demo.sh and scripts/demo_tiny.sh: create .venv if needed, install latexblend into it.
# On a CPU-only machine torch is pinned to the CPU build 2.13.0; set LATEXBLEND_TORCH to override
# (e.g. LATEXBLEND_TORCH="torch" on a CUDA machine). Set LATEXBLEND_VENV to use another folder.
# LATEXBLEND_SKIP_INSTALL=1 uses the current environment as it is (nothing created or installed).
if [ "${LATEXBLEND_SKIP_INSTALL:-0}" = 1 ]; then
  return 0
fi
VENV="${LATEXBLEND_VENV:-.venv}"
TORCH_SPEC="${LATEXBLEND_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "== installing ($TORCH_SPEC, latexblend${1:-})"
python -m pip install --quiet "$TORCH_SPEC" -e ".${1:-}"
