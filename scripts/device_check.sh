#!/usr/bin/env bash
# One GPU measurement session in under 8 minutes (issue 24): our training step (one CUDA graph per step, eager)
# against a stock diffusers Custom-Diffusion step, with and without gradient checkpointing; plain blending,
# guidance and rectification with and without CUDA graphs; the step at 1024 px (MFU); the regional compile's
# time; batch 4; the eager step's profile; blended against stock generation.
#
#   bash scripts/device_check.sh                 # full SDXL architecture, random weights (a CUDA machine)
#   bash scripts/device_check.sh --model tiny    # the same commands at toy sizes (a CPU rehearsal, ~2-3 min)
#
# Writes exactly two files to $OUT (the device tool's output folder; else ./device_check_out): summary.txt (what
# ran, how long, the key figures against the targets) and device_check.tar.gz (every JSON, CSV, log and
# profiler table). Needs no installed latexblend: it runs `python -m benchmarks` with src/ on the path. Python
# packages missing on the machine (diffusers on the lent GPU box) are installed from .whl/ when that folder
# holds wheels (scripts/device_wheels.sh fills it; carry it to the machine). Steps run in order of importance,
# each with its own time limit, all within a budget of BUDGET seconds (default 450); a step that times out
# says how far it got (its last progress line), a step with too little time left is skipped, and the next runs.
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
OUTDIR=${OUT:-./device_check_out}
BUDGET=${BUDGET:-450}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
DEST=$WORK/device_check
mkdir -p "$DEST"
START=$SECONDS
summary() { echo "$*" | tee -a "$DEST/summary.txt"; }
pack() {  # the two files in $OUT, whatever happened
  cp "$DEST/summary.txt" "$OUTDIR/summary.txt" 2>/dev/null
  tar czf "$OUTDIR/device_check.tar.gz" -C "$WORK" device_check 2>/dev/null
  rm -rf "$WORK"
}
trap pack EXIT
: > "$DEST/summary.txt"
summary "model=$MODEL, started $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget $BUDGET s"

if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$DEST/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site
    summary "wheels: installed $(ls .whl | tr '\n' ' ')"
  else
    summary "wheels: install failed ($(tail -1 "$DEST/wheels.log"))"
  fi
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache"
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "
import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())
import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$DEST/env.txt" 2>&1
summary "env: $(tail -2 "$DEST/env.txt" | tr '\n' ' ')"

if [ "$MODEL" = tiny ]; then  # toy sizes: a rehearsal of every command, not a measurement
  TRAIN=(--steps 2) MODES=(--steps 5 --repeats 1) COMPILE=(--steps 2 --compile-backend eager) BIG_SIZE=(--steps 1)
  BIG=(--steps 1 --batch-size 2) PROFILE=(--steps 1) GEN=(--steps 2 --repeats 1)
else
  TRAIN=(--size 512 --steps 10) MODES=(--size 1024 --steps 20 --repeats 2 --dtype bf16) BIG_SIZE=(--size 1024 --steps 5)
  COMPILE=(--size 512 --steps 5) BIG=(--size 512 --steps 5 --batch-size 4) PROFILE=(--size 512 --steps 2)
  GEN=(--size 1024 --steps 20 --repeats 1 --dtype bf16)
fi
BENCH=("$PY" -m benchmarks)

step() {  # step NAME LIMIT COMMAND...: run within min(LIMIT, what the budget has left), log to NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    summary "$name: skipped, $left s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  summary "$name: rc=$rc, $((SECONDS - t0)) s (limit $limit s), at $((SECONDS - START)) s"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    summary "  timed out; got as far as: $(grep -E '^(train|modes|generate|step|cuda graph)' "$DEST/$name.log" | tail -1)"
  elif [ "$rc" -ne 0 ]; then
    summary "  failed: $(grep -v '^\s*$' "$DEST/$name.log" | tail -1 | cut -c1-300)"
  fi
}

step train 150 "${BENCH[@]}" train --model "$MODEL" "${TRAIN[@]}" --checkpointing both --out "$DEST/bench_train.json"
step modes 190 "${BENCH[@]}" modes --model "$MODEL" "${MODES[@]}" --concepts 2 \
  --modes plain,guidance,rectify,plain_graphs,guidance_eager,rectify_eager --profile "$DEST/modes_profile" \
  --profile-modes plain,guidance,guidance_eager --out "$DEST/bench_modes.json"
step train_1024 90 "${BENCH[@]}" train --model "$MODEL" "${BIG_SIZE[@]}" --checkpointing off \
  --out "$DEST/bench_train_1024.json"
step train_compiled 110 "${BENCH[@]}" train --model "$MODEL" "${COMPILE[@]}" --compile-unet --checkpointing off \
  --out "$DEST/bench_train_compiled.json"
step train_batch4 70 "${BENCH[@]}" train --model "$MODEL" "${BIG[@]}" --checkpointing off \
  --out "$DEST/bench_train_batch.json"
step train_profile 60 "$PY" -m benchmarks.train_profile --model "$MODEL" "${PROFILE[@]}" --out "$DEST/train_profile"
step generate 70 "${BENCH[@]}" generate --model "$MODEL" "${GEN[@]}" --concepts 0,2 --out "$DEST/bench_generate.json"
summary "done in $((SECONDS - START)) s"
summary "--- key figures"
timeout 60 "$PY" -m benchmarks.device_summary "$DEST" 2>&1 | tee -a "$DEST/summary.txt"
