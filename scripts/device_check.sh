#!/usr/bin/env bash
# One GPU measurement session in under 8 minutes: every benchmark the project's performance claims rest on,
# JSON + CSV + profiler tables under one folder, a summary of what ran and how long it took.
#
#   bash scripts/device_check.sh                 # full SDXL architecture, random weights (a CUDA machine)
#   bash scripts/device_check.sh --model tiny    # the same commands at toy sizes (a CPU rehearsal, ~1-2 min)
#
# Results go to $OUT/device_check when $OUT is set (the device tool's output folder), else ./device_check.
# Needs no installed latexblend: it runs `python -m benchmarks` with src/ on the path. Python packages missing on the
# machine (diffusers on the lent GPU box) are installed from .whl/ when that folder holds wheels
# (scripts/device_wheels.sh fills it). Each step has its own time limit; a failed or timed-out step is
# recorded in summary.txt and the next one runs. Steps run in order of importance.
set -uo pipefail
cd "$(dirname "$0")/.."

MODEL=sdxl-random
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (use --model sdxl-random|tiny)" >&2; exit 2 ;;
  esac
done
case "$MODEL" in sdxl-random|tiny) ;; *) echo "error: --model must be sdxl-random or tiny" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
DEST=${OUT:-.}/device_check
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="$DEST/inductor_cache"

if [ "$MODEL" = tiny ]; then  # toy sizes: a rehearsal of every command, not a measurement
  GEN=(--steps 2 --repeats 1) MODES=(--steps 4 --repeats 1) TRAIN=(--steps 2) BIG=(--steps 1 --batch-size 2)
  COMPILE=(--steps 2 --compile-backend eager) PROFILE=(--steps 1) LIMIT=300
else
  GEN=(--size 1024 --steps 20 --repeats 2 --dtype bf16) MODES=(--size 1024 --steps 20 --repeats 2 --dtype bf16)
  TRAIN=(--size 512 --steps 10) BIG=(--size 512 --steps 5 --batch-size 4) COMPILE=(--size 512 --steps 10)
  PROFILE=(--size 512 --steps 2) LIMIT=150
fi

START=$SECONDS
summary() { echo "$*" | tee -a "$DEST/summary.txt"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  summary "$name: rc=$rc, $((SECONDS - t0)) s (limit $limit s), at $((SECONDS - START)) s"
}
BENCH=("$PY" -m benchmarks)

: > "$DEST/summary.txt"
summary "model=$MODEL, started $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "
import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())"
} > "$DEST/env.txt" 2>&1

step train 140 "${BENCH[@]}" train --model "$MODEL" "${TRAIN[@]}" --out "$DEST/bench_train.json"
step train_profile 90 "$PY" -m benchmarks.train_profile --model "$MODEL" "${PROFILE[@]}" --out "$DEST/train_profile"
step modes 150 "${BENCH[@]}" modes --model "$MODEL" "${MODES[@]}" --concepts 2 --profile "$DEST/modes_profile" \
  --out "$DEST/bench_modes.json"
step generate 100 "${BENCH[@]}" generate --model "$MODEL" "${GEN[@]}" --concepts 0,1,8 --out "$DEST/bench_generate.json"
step extract 60 "${BENCH[@]}" extract --model "$MODEL" --out "$DEST/bench_extract.json"
step train_batch4 80 "${BENCH[@]}" train --model "$MODEL" "${BIG[@]}" --checkpointing off --out "$DEST/bench_train_batch.json"
LEFT=$((470 - (SECONDS - START)))  # the compiled run takes what is left of the 8 minutes
if [ "$LEFT" -gt 60 ]; then
  step train_compiled "$(( LEFT < LIMIT ? LEFT : LIMIT ))" "${BENCH[@]}" train --model "$MODEL" "${COMPILE[@]}" \
    --compile-unet --checkpointing off --out "$DEST/bench_train_compiled.json"
else
  summary "train_compiled: skipped, $LEFT s left"
fi
summary "done in $((SECONDS - START)) s"
