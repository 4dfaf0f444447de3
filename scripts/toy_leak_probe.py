"""Where a blended concept costs the rest of the prompt on the toy world, and how much of it its K rows carry.

    python scripts/toy_leak_probe.py OUT/bank [--seeds 8] [--key-mix 1,0.7,0.6,0.5,0]

OUT/bank is the bank folder of a `latexblend bench fidelity --model toy --out OUT` run (its
``patchdog-full`` and ``stripecar-full`` banks). For each key mix b, each concept's bank is blended over
the prompts of ``latexblend.fidelity.PROMPTS`` x image seeds 0 to --seeds - 1 (whatever seed the run
trained with) with its K rows moved toward the prompt's own (plain) K rows at the concept's span,
``K = K_prompt + b (K_bank - K_prompt)``, and its own V rows: b = 1 is the bank as trained, b = 0 keeps the
prompt's keys with the bank's values (bind, on as by default, then gives the slot the noun's key).
Prints concept present and prompt fidelity (``toy.detect``) over all prompts, the one-object prompts and
the two-object (``next to``) prompts (docs/TOY.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from latexblend import fidelity, toy
from latexblend.bank import ConceptBank, load_bank
from latexblend.errors import LatexBlendError
from latexblend.extract import kv_rows
from latexblend.models import attn2_modules, load_pipeline
from latexblend.tokens import locate_spans


@torch.no_grad()
def key_mixed(pipe, bank: ConceptBank, prompt: str, mix: float) -> ConceptBank:
    """``bank`` with each layer's K rows ``K_prompt + mix (K_bank - K_prompt)``, ``K_prompt`` the plain
    rows at the concept's span in ``prompt`` (V rows unchanged)."""
    text, (span,) = locate_spans(pipe.tokenizer, prompt, [(bank.name, bank.class_noun, bank.noun_ids)])
    context = pipe.encode_prompt(text, device=pipe.device, do_classifier_free_guidance=False)[0]
    weights = {layer: (attn.to_k.weight, attn.to_v.weight) for layer, attn in attn2_modules(pipe.unet).items()}
    own = kv_rows(context[0], weights, span)[0]  # the rows extraction takes, from the plain prompt
    return dataclasses.replace(bank, k={layer: k + mix * (bank.k[layer].to(k) - k) for layer, k in own.items()})


def mixes(spec: str) -> list[float]:
    """``1,0.7,0`` -> [1.0, 0.7, 0.0]; anything else is one error line."""
    try:
        return [float(m) for m in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}' is not a comma-separated list of numbers") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("banks", type=Path, help="a bench fidelity OUT/bank folder")
    ap.add_argument("--seeds", type=int, default=8, help="image seeds 0 to SEEDS - 1 per prompt")
    ap.add_argument("--key-mix", type=mixes, default="1,0.7,0.6,0.5,0", help="values of b, comma-separated")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    try:
        banks = {c: load_bank(args.banks / f"{c}-full.safetensors") for c in toy.CONCEPTS}
        run(banks, args.seeds, args.key_mix)
    except LatexBlendError as err:
        sys.exit(f"error: {err}")


def run(banks: dict[str, ConceptBank], seeds: int, key_mix: list[float]) -> None:
    """Generate, score and print one line per key mix."""
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    settings = fidelity.FidelitySettings(seeds=seeds)
    for mix in key_mix:
        rows = []
        for concept, bank in banks.items():
            for prompt in fidelity.PROMPTS[toy.CONCEPTS[concept].cls]:
                rows += fidelity.generate_rows(pipe, [prompt], seeds, settings, [concept],
                                               [key_mixed(pipe, bank, prompt, mix)])[0]
        pair = [len(toy.parse_prompt(r["prompt"])["objects"]) == 2 for r in rows]
        parts = {"all": rows, "one object": [r for r, p in zip(rows, pair, strict=True) if not p],
                 "two objects": [r for r, p in zip(rows, pair, strict=True) if p]}
        lines = []
        for name, part in parts.items():
            s = fidelity.summarise(part)
            lines.append(f"{name} present {s['concept_pct']:.0f}% fidelity {s['fidelity_pct']:.0f}%")
        print(f"key mix {mix:g}: {'; '.join(lines)} ({len(rows)} images)", flush=True)


if __name__ == "__main__":
    main()
