"""Recipe search on the toy world: train one concept with each recipe, blend it into new scenes, score.

    python scripts/toy_recipe_sweep.py stripecar out/sweep "lr=3e-4,steps=1500,augment_shrink=0" "lr=1e-3,steps=600"

Each recipe is comma-separated ``key=value`` pairs (values read as YAML): ``lr`` (before batch
scaling), ``steps``, ``seed`` and any ``TrainConfig`` field (``augment_shrink``, ``prior_loss_weight``,
``batch_size``...); unset keys take the toy recipe. Prints concept present %, concept colours % and
prompt fidelity % over 6 new-scene prompts x 4 seeds with the slot bound to the noun (bind on) and
not (bind off). docs/TOY.md has the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from latexblend import fidelity, toy
from latexblend.config import TRAIN_RECIPES, TrainConfig
from latexblend.errors import LatexBlendError

RECIPE_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"name", "images", "prior", "class_noun", "model"}


def prompts_for(cls: str) -> list[str]:
    return [f"a {cls} on the beach", f"a {cls} in the snow", f"a {cls} at night", f"a {cls} on the grass",
            f"a {cls} next to a red tree in the snow", f"a blue tree next to a {cls} at night"]


def run(concept: str, root: Path, recipe: str, pipe) -> str:
    values = fidelity.parse_overrides(recipe, RECIPE_KEYS)
    base = TRAIN_RECIPES["toy"]
    settings = fidelity.FidelitySettings(concepts=[concept], quality=False, seed=values.pop("seed", 0),
                                         steps=values.pop("steps", base["steps"]), lr=values.pop("lr", base["lr"]))
    folder = root / recipe.replace("=", "").replace(",", "_")
    data = toy.draw_data(folder, concept, settings.num_images, settings.num_prior, settings.seed)
    t0 = time.perf_counter()
    bank = fidelity.train_variant(folder, concept, "sweep", settings, data, tuple(values.items()))
    wall = time.perf_counter() - t0
    cells = []
    for bind in (True, False):
        rows = fidelity.generate_rows(pipe, prompts_for(toy.CONCEPTS[concept].cls), settings.seeds, settings,
                                      [concept], [bank], (("bind", bind),))[0]
        s = fidelity.summarise(rows)
        cells.append(f"bind {'on' if bind else 'off'}: present {s['concept_pct']:.0f}%, colours "
                     f"{s['concept_colours_pct']:.0f}%, fidelity {s['fidelity_pct']:.0f}%")
    return f"{recipe} (train {wall:.0f} s): " + "; ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("concept", choices=sorted(toy.CONCEPTS))
    ap.add_argument("out", type=Path)
    ap.add_argument("recipes", nargs="+")
    args = ap.parse_args()
    from latexblend.models import load_pipeline

    try:
        for recipe in args.recipes:  # every recipe checked before the first training
            fidelity.parse_overrides(recipe, RECIPE_KEYS)
        pipe = load_pipeline("toy", device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        for recipe in args.recipes:
            print(run(args.concept, args.out, recipe, pipe), flush=True)
    except LatexBlendError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
