"""The README's picture from a finished ``scripts/demo.sh`` run: each prompt's images with the banks (left) beside
the same prompts and seeds without them (right), scaled up 3x.

    python scripts/demo_picture.py demo/out docs/images/toy_demo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE, GAP, MARGIN, LINE, HEADING = 3, 12, 12, 22, 30


def prompt_rows(folder: Path) -> list[tuple[str, list[Image.Image]]]:
    """(prompt as written, its images in seed order) per prompt of a generate output folder."""
    images = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["images"]
    rows: dict[int, tuple[str, list]] = {}
    for im in sorted(images, key=lambda im: (im["prompt_index"], im["seed"])):
        rows.setdefault(im["prompt_index"], (im["prompt"], []))[1].append(Image.open(folder / im["file"]))
    return [rows[i] for i in sorted(rows)]


def compose(blended: Path, plain: Path) -> Image.Image:
    left, right = prompt_rows(blended), prompt_rows(plain)
    if len(left) != len(right):
        raise SystemExit(f"error: {blended} and {plain} hold different numbers of prompts")
    side = left[0][1][0].width * SCALE
    column = side * max(len(ims) for _, ims in left)
    font, title = ImageFont.load_default(size=14), ImageFont.load_default(size=17)
    height = MARGIN + HEADING + len(left) * (LINE + side + GAP)
    canvas = Image.new("RGB", (2 * column + 3 * MARGIN + GAP, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (heading, rows) in enumerate((("with the banks (blended)", left),
                                          ("same prompts and seeds, no banks", right))):
        x0 = MARGIN + c * (column + MARGIN + GAP)
        draw.text((x0, MARGIN), heading, fill="black", font=title)
        for r, (prompt, images) in enumerate(rows):
            y0 = MARGIN + HEADING + r * (LINE + side + GAP)
            draw.text((x0, y0 + 2), prompt, fill="black", font=font)
            for i, im in enumerate(images):
                canvas.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x0 + i * side, y0 + LINE))
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the demo's output folder (holding blended/ and plain/)")
    ap.add_argument("picture", type=Path)
    args = ap.parse_args()
    try:
        picture = compose(args.out / "blended", args.out / "plain")
    except (OSError, ValueError, KeyError, IndexError) as err:  # no folder, no metadata.json, a missing image
        raise SystemExit(f"error: {args.out} is not a finished demo output folder ({err!r})") from None
    picture.save(args.picture, optimize=True)
    print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
