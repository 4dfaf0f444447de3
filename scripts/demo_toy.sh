#!/usr/bin/env bash
# The main job on the trained toy model (--model toy, 32 px, CPU): draws a concept (a car, blue over
# red) and a captioned prior set, trains it with the toy recipe (Stage 1) into a bank (Stage 2),
# generates new scenes with and without the bank (Stage 3, same seeds) and scores both folders with
# the exact toy detectors. Everything goes under $DEMO_DIR (default: demo_toy/).
#
#   bash scripts/demo_toy.sh
#
# What to expect (docs/TOY.md): the concept's colours reach the new scenes (most cars turn blue or
# red), its two-tone layout does not; the toy UNet does not learn it.
# Knobs (environment): DEMO_DIR, DEMO_STEPS (600), LATEXBLEND_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
W="${DEMO_DIR:-demo_toy}"
STEPS="${DEMO_STEPS:-600}"
export HF_HUB_OFFLINE=1
PROMPTS="$W/prompts.txt"

echo "== 1/4 drawing the concept and a prior set"
python -m latexblend.toy "$W" --concept stripecar --num 8 --prior 32

echo "== 2/4 training stripecar on the toy model (writes its bank)"
latexblend train --images "$W/data/stripecar" --class-noun car --name stripecar --model toy \
  --prior "$W/data/prior-car" --steps "$STEPS" --checkpoint-every 0 --runs-dir "$W/runs" \
  --bank-dir "$W/concept_bank" --overwrite

echo "== 3/4 generating new scenes, with and without the bank"
rm -rf "$W/out"
printf '%s\n' "a car in the snow" "a car at night" "a car next to a yellow tree on the grass" \
  "a purple dog next to a car on the beach" > "$PROMPTS"
latexblend generate --prompts-file "$PROMPTS" --concepts stripecar --dir "$W/concept_bank" --model toy \
  --num-images 4 --steps 20 --cfg 5 --out "$W/out/blended"
latexblend generate --prompts-file "$PROMPTS" --model toy --num-images 4 --steps 20 --cfg 5 --out "$W/out/plain"

echo "== 4/4 scoring with the toy detectors"
latexblend evaluate --samples "$W/out/blended" --detector toy
latexblend evaluate --samples "$W/out/plain" --detector toy

cat <<DONE

Done. Under $W/: data/ (concept and prior images), runs/stripecar, concept_bank/stripecar.safetensors,
out/blended and out/plain (grids p00N_grid.png, toy_metrics.json). slot_colour_pct: cars in the
concept's colours; fidelity_pct: background and the other objects right; concept_pct: the two-tone
pattern itself.
DONE
