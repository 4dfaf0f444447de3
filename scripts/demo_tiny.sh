#!/usr/bin/env bash
# The main job on the embedded tiny model (random weights: its images are noise; CPU, ~1 min on 2 cores):
# draws procedural images of two concepts, makes small prior sets, trains both concepts (Stage 1),
# writes their banks (Stage 2), and generates blended images with both (Stage 3), plus the plain
# prompt for comparison. Everything goes under $DEMO_DIR (default: demo_tiny/).
#
#   bash scripts/demo_tiny.sh
#
# Knobs (environment): DEMO_DIR, DEMO_STEPS (training steps per concept, 300), DEMO_LR (3e-3: the
# tiny random model needs a large rate), DEMO_PRIOR (prior images per class, 8), DEMO_GEN_STEPS
# (denoising steps, 30), LATEXBLEND_SKIP_INSTALL=1 to use the current environment as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
W="${DEMO_DIR:-demo_tiny}"
STEPS="${DEMO_STEPS:-300}"
LR="${DEMO_LR:-3e-3}"
PRIOR="${DEMO_PRIOR:-8}"
GEN_STEPS="${DEMO_GEN_STEPS:-30}"
export LATEXBLEND_BANK="$W/concept_bank"
export HF_HUB_OFFLINE=1

echo "== 1/4 drawing concept images"
python -m latexblend.toy.synthetic "$W/data/corgi" --style disc --num 5 --seed 0
python -m latexblend.toy.synthetic "$W/data/castle" --style towers --num 5 --seed 1

echo "== 2/4 prior images from the base model"
latexblend prior --class-noun dog --num "$PRIOR" --model tiny --out "$W/reg_data/dog" --steps 20
latexblend prior --class-noun castle --num "$PRIOR" --model tiny --out "$W/reg_data/castle" --steps 20

echo "== 3/4 training both concepts (each writes its bank)"
for spec in corgi:dog castle:castle; do
  name="${spec%%:*}"; noun="${spec##*:}"
  latexblend train --images "$W/data/$name" --class-noun "$noun" --name "$name" --model tiny \
    --prior "$W/reg_data/$noun" --steps "$STEPS" --lr "$LR" --no-scale-lr --checkpoint-every 0 \
    --runs-dir "$W/runs" --bank-dir "$W/concept_bank" --overwrite
done
latexblend bank ls --dir "$W/concept_bank"

echo "== 4/4 generating"
rm -rf "$W/out"
latexblend generate --prompt "<corgi> in front of a castle" --concepts castle --num-images 4 \
  --steps "$GEN_STEPS" --model tiny --out "$W/out/blended"
latexblend generate --prompt "a dog in front of a castle" --num-images 4 --steps "$GEN_STEPS" --model tiny \
  --out "$W/out/plain"

cat <<DONE

Done. Everything is under $W/:
  concept images   $W/data/corgi, $W/data/castle
  prior images     $W/reg_data/dog, $W/reg_data/castle
  training runs    $W/runs/corgi, $W/runs/castle   (config.yaml, run.json, trained K/V)
  concept banks    $W/concept_bank/corgi.safetensors, $W/concept_bank/castle.safetensors
  blended images   $W/out/blended/   (p000_grid.png, metadata.json)
  plain images     $W/out/plain/     (same seeds, no concepts)
The banks are in $W/concept_bank, not ./concept_bank: pass --dir (or set LATEXBLEND_BANK), e.g.
  latexblend bank ls --dir $W/concept_bank
  latexblend bank inspect corgi --dir $W/concept_bank
  latexblend generate --prompt "<corgi> near <castle>" --dir $W/concept_bank --model tiny --steps $GEN_STEPS
DONE
