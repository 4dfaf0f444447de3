#!/usr/bin/env bash
# The test command: creates .venv if needed, installs the package with its test extra, lints, runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k bank`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh "[test]"
echo "== ruff"
ruff check src tests scripts benchmarks
echo "== pytest"
export HF_HUB_OFFLINE=1
python -m pytest "$@"
