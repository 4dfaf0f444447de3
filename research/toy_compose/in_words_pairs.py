"""The toy model's own reference for two concepts at once: both looks described in words, no bank.

    python research/toy_compose/in_words_pairs.py                 # the shipped model
    python research/toy_compose/in_words_pairs.py runs/compose    # the EMA UNet of a scripts/train_toy.py folder

Each set: 2 orders x 4 backgrounds x 8 images (one call per prompt, as `latexblend generate` makes them; 20
Euler-ancestral steps, CFG 5). Prints the share of images with both objects (class and colours) and the
background right, and each object's own rate.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from latexblend.toy import detect
from latexblend.toy import world as toy
from latexblend.toy.model import load_shipped_toy

SETS = {
    "both concepts (red-yellow dog, blue-purple car)": [("dog", "red-yellow"), ("car", "blue-purple")],
    "seen two-tone pairs (blue-yellow dog, red-purple car)": [("dog", "blue-yellow"), ("car", "red-purple")],
    "one colour each (red dog, blue car)": [("dog", "red"), ("car", "blue")],
}
IMAGES = 8


def words(cls: str, colour: str) -> str:
    return f"a {' and '.join(toy.tones(colour))} {cls}"


def score_set(pipe, objects: list[tuple[str, str]]) -> tuple[float, list[float]]:
    both, each = [], {o: [] for o in objects}
    for first, second in (objects, objects[::-1]):
        for background, (where, _) in toy.BACKGROUNDS.items():
            prompt = f"{words(*first)} next to {words(*second)} {where}"
            images = pipe([prompt] * IMAGES, num_inference_steps=20, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(0)).images
            for image in images:
                found = detect.detect(image)
                hits = [found.has(cls, colour) for cls, colour in objects]
                for o, hit in zip(objects, hits, strict=True):
                    each[o].append(hit)
                both.append(all(hits) and found.background == background)
    return float(np.mean(both)), [float(np.mean(v)) for v in each.values()]


def main() -> None:
    pipe = load_shipped_toy()
    if len(sys.argv) > 1:
        state = torch.load(f"{sys.argv[1]}/unet.pt", weights_only=True)
        pipe.unet.load_state_dict(state["ema"])
        print(f"{sys.argv[1]}: EMA UNet at step {state['step']}")
    pipe.set_progress_bar_config(disable=True)
    for name, objects in SETS.items():
        both, each = score_set(pipe, objects)
        parts = "  ".join(f"{cls} {colour} {rate:.0%}" for (cls, colour), rate in zip(objects, each, strict=True))
        print(f"{name:55s} both and background right {both:.0%}   {parts}   ({8 * IMAGES} images)", flush=True)


if __name__ == "__main__":
    main()
