"""How many two-object scenes with both objects two-toned survive the toy VAE, by object size?

    python research/toy_compose/vae_pairs.py            # the shipped VAE

Draws 200 such scenes per size range (the world's own drawing, which the detectors read exactly), encodes and
decodes them with the shipped VAE (latent mean) and counts the scenes whose two objects are both read back with
their class and two tones: the VAE's own reconstruction rate, what a UNet trained on its latents learns from.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from latexblend.toy import detect
from latexblend.toy import world as toy
from latexblend.toy.model import load_shipped_toy

SIZES = ((9, 12), (12, 14), (14, 15))  # (9, 12): the world's two-object scenes today


def pair_scene(rng: random.Random, lo: int, hi: int) -> toy.Scene:
    pairs = [c for c in toy.OBJECT_COLOURS if "-" in c]
    halves = ((1, toy.SIZE // 2 - 1), (toy.SIZE // 2 + 1, toy.SIZE - 1))
    things = tuple(toy.Thing(cls, rng.choice(pairs), toy._box(rng, cls, lo, hi, x0, x1))
                   for cls, (x0, x1) in zip(rng.sample(toy.CLASSES, 2), halves, strict=True))
    return toy.Scene(rng.choice(list(toy.BACKGROUNDS)), things)


@torch.no_grad()
def reconstruct(vae, images: list[Image.Image]) -> list[Image.Image]:
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1)
    rec = vae.decode(vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def main() -> None:
    vae = load_shipped_toy().vae
    for lo, hi in SIZES:
        rng = random.Random(3)
        scenes = [pair_scene(rng, lo, hi) for _ in range(200)]
        drawn = [toy.draw_scene(s) for s in scenes]
        right = lambda s, im: all(detect.detect(im).has(t.cls, t.colour) for t in s.things)  # noqa: E731
        exact = np.mean([right(s, im) for s, im in zip(scenes, drawn, strict=True)])
        kept = np.mean([right(s, im) for s, im in zip(scenes, reconstruct(vae, drawn), strict=True)])
        print(f"objects {lo}-{hi} px: drawn scenes read right {exact:.0%}, VAE reconstructions {kept:.0%} (200 scenes)")


if __name__ == "__main__":
    main()
