"""Exact detectors of the toy world: what a drawn or generated scene holds, and the one scoring function.

:func:`detect` reads background, objects (class by shape, one colour or a top-over-bottom pair) and
concepts from an image with fixed rules (nearest-palette colours, connected components, shape
features); :func:`score` checks an image against a grammar prompt; :func:`summarise` turns per-image
scores into rates with standard errors; :func:`score_samples` scores a ``generate`` output folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from latexblend.blend.samples import read_samples
from latexblend.errors import LatexBlendError
from latexblend.fileio import open_image
from latexblend.toy.world import BACKGROUNDS, COLOURS, CONCEPT_KEYS, CONCEPTS, SIZE, parse_prompt, split_row, two_tone

#: The world's colours: every pixel is read as the nearest of them (concepts use world colours too).
PALETTE_NAMES = [*BACKGROUNDS, *COLOURS]
PALETTE = np.array([c for _, c in BACKGROUNDS.values()] + list(COLOURS.values()), dtype=np.float32)
MIN_PIXELS = 12
TONE_SHARE = 0.2  # each colour of a two-toned object labels at least this share of its pixels
TREE_ASYMMETRY = 0.8  # top-half / bottom-half pixels below this: a triangle
CAR_LOG_ASPECT = 0.3  # log(width / height) above this: a car


@dataclass
class Found:
    """A detected object: class by shape, colour (a world colour, or ``'top-bottom'`` when two-toned),
    box, pixel count, and the world colours that each label at least :data:`TONE_SHARE` of it."""

    cls: str
    colour: str
    box: tuple[int, int, int, int]
    pixels: int
    shares: frozenset[str] = frozenset()

    @property
    def concept(self) -> str | None:
        """The concept this object is (its class and two tones in place), or None."""
        return CONCEPT_KEYS.get((self.cls, self.colour))


@dataclass
class Detection:
    background: str
    objects: list[Found] = field(default_factory=list)

    def has(self, cls: str, colour: str | None = None) -> bool:
        return any(o.cls == cls and (colour is None or o.colour == colour) for o in self.objects)

    def concepts(self, strict: bool = False) -> list[str]:
        """Concepts found: objects of a concept's class in its two tones, top over bottom (``strict``) or
        only carrying both its colours (either order)."""
        if strict:
            return [o.concept for o in self.objects if o.concept]
        return [c.name for c in CONCEPTS.values() for o in self.objects
                if o.cls == c.cls and {c.first, c.second} <= o.shares]


def _pixels(image: Image.Image) -> np.ndarray:
    """The image resized to :data:`SIZE` as float RGB [S, S, 3]."""
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX), dtype=np.float32)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Nearest palette index of RGB values [..., 3]."""
    return ((rgb[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pts))
    return out


def _shape_class(pts: np.ndarray) -> tuple[str, tuple[int, int, int, int]]:
    """Class by shape: a triangle has far fewer pixels in the top half of its box than in the bottom
    half (1:3 when drawn), a car is wide (log aspect ~0.75), a disc is neither (robust to VAE blur)."""
    y0, x0 = pts.min(0)
    y1, x1 = pts.max(0)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    mid = (y0 + y1 + 1) / 2
    top, bottom = np.sum(pts[:, 0] < mid), np.sum(pts[:, 0] >= mid)
    if top < TREE_ASYMMETRY * bottom:
        cls = "tree"
    else:
        cls = "car" if np.log(w / h) > CAR_LOG_ASPECT else "dog"
    return cls, (int(x0), int(y0), int(x1), int(y1))


def _colour_of(arr: np.ndarray, labels: np.ndarray, pts: np.ndarray, cls: str, box) -> tuple[str, frozenset[str]]:
    """``(colour, shares)`` of a component: two-toned ``'top-bottom'`` when two world colours each label
    at least :data:`TONE_SHARE` of its pixels and are the nearest palette colours of the mean RGB of the
    top and bottom halves (split by :func:`split_row`; robust to blur at the seam), else its most frequent colour."""
    counts = np.bincount(labels[pts[:, 0], pts[:, 1]], minlength=len(PALETTE)) / len(pts)
    shares = frozenset(PALETTE_NAMES[i] for i in np.nonzero(counts >= TONE_SHARE)[0] if PALETTE_NAMES[i] in COLOURS)
    majority = PALETTE_NAMES[int(counts.argmax())]
    mid = split_row(cls, box[1], box[3])
    halves = (pts[pts[:, 0] < mid], pts[pts[:, 0] >= mid])
    if len(shares) < 2 or min(len(h) for h in halves) < 3:
        return majority, shares
    top, bottom = (PALETTE_NAMES[int(_nearest(arr[h[:, 0], h[:, 1]].mean(0)))] for h in halves)
    if top != bottom and {top, bottom} <= shares:
        return two_tone(top, bottom), shares
    return majority, shares


def detect(image: Image.Image) -> Detection:
    """Background (most frequent background colour), objects (connected pixels of any other palette
    colour, at least :data:`MIN_PIXELS`), each with a class from its shape and a colour (one world
    colour or a top-over-bottom pair)."""
    arr = _pixels(image)
    labels = _nearest(arr)
    nb = len(BACKGROUNDS)
    counts = np.bincount(labels.ravel(), minlength=len(PALETTE))
    background = PALETTE_NAMES[int(counts[:nb].argmax())]
    found = []
    for pts in _components(labels != PALETTE_NAMES.index(background)):
        if len(pts) < MIN_PIXELS:
            continue
        cls, box = _shape_class(pts)
        colour, shares = _colour_of(arr, labels, pts, cls, box)
        found.append(Found(cls, colour, box, len(pts), shares))
    found.sort(key=lambda f: f.box[0])
    return Detection(background, found)


# --------------------------------------------------------------------------- scoring


def score(image: Image.Image, prompt: str, concepts: list[str] | tuple[str, ...] = ()) -> dict:
    """One image against a grammar prompt: ``background`` right, ``objects`` (every named object not of a
    concept's class present, with its colour where named), ``fidelity`` (both); with ``concepts``, also
    ``concept`` (every one present: its class in its two tones, top over bottom), ``concept_colours`` (both
    its colours on an object of its class, either layout) and ``joint`` (concept and fidelity)."""
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"prompt '{prompt}' is not in the toy grammar")
    det = detect(image)
    classes = {CONCEPTS[c].cls for c in concepts}
    objects = all(det.has(c, col) for c, col in spec["objects"] if c not in classes)
    background = det.background == spec["background"]
    out = {"background": background, "objects": objects, "fidelity": background and objects}
    if concepts:
        out["concept"] = all(c in det.concepts(strict=True) for c in concepts)
        out["concept_colours"] = all(c in det.concepts() for c in concepts)
        out["joint"] = out["concept"] and out["fidelity"]
    return out


def _sem(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarise(rows: list[dict]) -> dict:
    """Rates in % with standard errors over images (``concept``, ``concept_colours``, ``fidelity``, ``joint``;
    a rate counts only the rows that have its key) and ``product_pct`` = concept x fidelity."""
    out = {}
    for key in ("concept", "concept_colours", "fidelity", "joint"):
        vals = [float(r[key]) for r in rows if key in r]
        if vals:
            out[f"{key}_pct"] = 100 * sum(vals) / len(vals)
            out[f"{key}_se"] = 100 * _sem(vals)
    if "concept_pct" in out:
        out["product_pct"] = out["concept_pct"] * out["fidelity_pct"] / 100
    out["images"] = len(rows)
    return out


def score_samples(folder: str | Path) -> dict:
    """Toy-detector metrics of a ``generate`` output folder made with ``--model toy``: per image (background
    and the other named objects right, each toy concept's pattern present) and overall rates in %.
    Concepts whose bank name is a :data:`~latexblend.toy.world.CONCEPTS` name are scored."""
    samples = read_samples(folder)
    rows = []
    for img in samples.images:
        if parse_prompt(img.expanded_prompt) is None:
            raise LatexBlendError(f"{img.file}: prompt '{img.expanded_prompt}' is not in the toy grammar "
                                  "(--detector toy scores toy-world prompts only)")
        if not img.path.is_file():
            raise LatexBlendError(f"image {img.path} listed in metadata.json does not exist")
        concepts = [c for c in img.concepts if c in CONCEPTS]
        row = score(open_image(img.path), img.expanded_prompt, concepts)
        rows.append({"file": img.file, "seed": img.seed, "concepts": concepts, "prompt": img.expanded_prompt} | row)
    return {"format": "latexblend-toy-metrics", "format_version": 1, "samples": str(samples.folder),
            "detector": "latexblend.toy.detect", "overall": summarise(rows), "images": rows}
