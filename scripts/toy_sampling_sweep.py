"""Sampling settings on the toy world: blend a fidelity run's full banks with other CFG / blend_start.

    python scripts/toy_sampling_sweep.py out/fidelity cfg=5 cfg=7.5 "cfg=7.5,blend_start=1.0"

Reads ``OUT/bank/<concept>-full.safetensors`` written by ``latexblend bench fidelity --out OUT`` and
prints concept present / concept colours / prompt fidelity % per concept over the benchmark's
prompts x 4 seeds. Keys: ``cfg``, ``steps`` (denoising steps), ``blend_start``.
"""

from __future__ import annotations

import sys

from latexblend import fidelity, toy
from latexblend.bank import load_bank
from latexblend.models import load_pipeline


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    root, specs = sys.argv[1], sys.argv[2:]
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    for spec in specs:
        keys = dict(item.split("=", 1) for item in spec.split(","))
        settings = fidelity.FidelitySettings(cfg=float(keys.get("cfg", 5)), sample_steps=int(keys.get("steps", 20)))
        blend = (("blend_start", float(keys.get("blend_start", 0.9))),)
        cells = []
        for concept in toy.CONCEPTS:
            bank = load_bank(f"{root}/bank/{concept}-full.safetensors")
            prompts = fidelity.PROMPTS[toy.CONCEPTS[concept].cls]
            s = fidelity.summarise(fidelity.generate_rows(pipe, prompts, 4, settings, [concept], [bank], blend)[0])
            cells.append(f"{concept} {s['concept_pct']:.0f}/{s['concept_colours_pct']:.0f}/{s['fidelity_pct']:.0f}")
        print(spec, " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
