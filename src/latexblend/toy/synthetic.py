"""Procedural concept images for the demo, the ablation and the tests (no data download needed).

Each style draws one recognisable "subject" (a fixed arrangement of shapes and colours) at a random
place, size and background, so a concept can be trained on the tiny model in a few minutes.

    python -m latexblend.toy.synthetic OUT_DIR [--style disc] [--num 5] [--size 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from latexblend.fileio import atomic_path


def _disc(d: ImageDraw.ImageDraw, x: int, y: int, s: int) -> None:
    """A red disc with a blue bar and a yellow square: the demo's 'corgi'."""
    d.ellipse((x, y, x + s, y + s), fill=(220, 30, 40))
    d.rectangle((x + s // 7, y + 2 * s // 5, x + 6 * s // 7, y + 3 * s // 5), fill=(20, 40, 210))
    d.rectangle((x + 2 * s // 5, y + s // 14, x + 3 * s // 5, y + 2 * s // 7), fill=(250, 220, 30))


def _towers(d: ImageDraw.ImageDraw, x: int, y: int, s: int) -> None:
    """Three grey towers with a purple gate: the demo's 'castle'."""
    w = s // 4
    for i, h in enumerate((3 * s // 4, s, 3 * s // 4)):
        left = x + i * (w + w // 3)
        d.rectangle((left, y + s - h, left + w, y + s), fill=(150, 150, 160))
        d.rectangle((left, y + s - h - w // 3, left + w // 3, y + s - h), fill=(150, 150, 160))
    d.rectangle((x + s // 3, y + 2 * s // 3, x + s // 2, y + s), fill=(110, 30, 140))


STYLES: dict[str, Callable[[ImageDraw.ImageDraw, int, int, int], None]] = {"disc": _disc, "towers": _towers}


def draw_concept(folder: str | Path, style: str = "disc", num: int = 5, size: int = 96, seed: int = 0) -> Path:
    """Write ``num`` PNGs ``0.png``... of ``style`` into ``folder`` (deterministic for a seed)."""
    if style not in STYLES:
        raise ValueError(f"unknown style '{style}'; choose one of {', '.join(STYLES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num):
        background = (rng.randrange(40, 140), rng.randrange(90, 200), rng.randrange(40, 140))
        image = Image.new("RGB", (size, size), background)
        s = rng.randrange(size // 2, 3 * size // 4)
        x, y = rng.randrange(0, size - s), rng.randrange(0, size - s)
        STYLES[style](ImageDraw.Draw(image), x, y, s)
        with atomic_path(folder / f"{i}.png") as tmp:
            image.save(tmp, format="PNG")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Draw procedural concept images.")
    ap.add_argument("out")
    ap.add_argument("--style", default="disc", choices=sorted(STYLES))
    ap.add_argument("--num", type=int, default=5)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for flag, value, lo, hi in (("--num", args.num, 1, 10_000), ("--size", args.size, 8, 4096),
                                ("--seed", args.seed, 0, 2**63 - 1)):
        if not lo <= value <= hi:
            ap.error(f"{flag} must be in [{lo}, {hi}], got {value}")
    folder = draw_concept(args.out, args.style, args.num, args.size, args.seed)
    print(f"drew {args.num} '{args.style}' images in {folder}/")


if __name__ == "__main__":
    main()
