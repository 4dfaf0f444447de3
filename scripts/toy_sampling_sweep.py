"""Sampling settings on the toy world: blend a fidelity run's full banks with other CFG / blend_start.

    python scripts/toy_sampling_sweep.py out/fidelity cfg=5 cfg=7.5 "cfg=7.5,blend_start=1.0"

Reads ``OUT/fidelity.json`` and ``OUT/bank/<concept>-full.safetensors`` written by
``latexblend bench fidelity --out OUT`` and prints concept present / concept colours / prompt
fidelity % per concept over the benchmark's prompts and seeds. Keys: ``cfg``, ``steps`` (denoising
steps), ``blend_start``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from latexblend import fidelity, toy
from latexblend.bank import load_bank
from latexblend.errors import LatexBlendError


def numbers(spec: str) -> dict[str, float]:
    """``cfg=7.5,blend_start=1`` -> numbers; anything else is one error line."""
    keys = fidelity.parse_overrides(spec, {"cfg", "steps", "blend_start"})
    bad = [k for k, v in keys.items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise LatexBlendError(f"'{spec}': {', '.join(bad)} must be a number")
    return {k: float(v) for k, v in keys.items()}


def sweep(root: Path, specs: list[str]) -> None:
    from latexblend.models import load_pipeline

    try:
        ran = json.loads((root / "fidelity.json").read_text())["settings"]
    except (OSError, ValueError, KeyError) as err:
        raise LatexBlendError(f"{root}/fidelity.json is not a bench fidelity result ({err})") from err
    banks = {c: load_bank(root / "bank" / f"{c}-full.safetensors") for c in ran["concepts"]}
    options = [numbers(spec) for spec in specs]
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    for spec, keys in zip(specs, options, strict=True):
        settings = fidelity.FidelitySettings(cfg=keys.get("cfg", 5.0), sample_steps=int(keys.get("steps", 20)),
                                             seed=ran["seed"])
        blend = (("blend_start", keys.get("blend_start", 0.9)),)
        cells = []
        for concept, bank in banks.items():
            prompts = fidelity.PROMPTS[toy.CONCEPTS[concept].cls]
            rows = fidelity.generate_rows(pipe, prompts, ran["seeds"], settings, [concept], [bank], blend)[0]
            s = fidelity.summarise(rows)
            cells.append(f"{concept} {s['concept_pct']:.0f}/{s['concept_colours_pct']:.0f}/{s['fidelity_pct']:.0f}")
        print(spec, " ".join(cells), flush=True)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    try:
        sweep(Path(sys.argv[1]), sys.argv[2:])
    except LatexBlendError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
