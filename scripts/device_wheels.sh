#!/usr/bin/env bash
# Fill .whl/ (git-ignored through .git/info/exclude) with the wheels the lent GPU machine lacks, for
# scripts/device_check.sh: diffusers and its one missing requirement, importlib_metadata (that machine has
# torch, transformers, accelerate, safetensors, typer, pyyaml, tqdm, huggingface-hub and zipp). Pure-Python
# wheels, about 5 MB; run once, here, with network access to the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
  || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}"
ls -l .whl
