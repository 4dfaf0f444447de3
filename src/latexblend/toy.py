"""The toy world: procedural scenes, their caption grammar and exact detectors.

A scene is a flat background named by a word (grass, snow, night, beach) with one object, or two
objects "next to" each other (left and right halves), each a class with a distinct shape (dog = disc,
car = wide rectangle, tree = triangle) and a colour. Captions come from a small grammar; a fixed set
of combinations is held out of training so prompts can test what the model composes.

Concepts are objects of a class drawn two-toned (top | bottom halves, which the training augmentation's
horizontal flip keeps; a left | right pattern would count in either order) in world colours: the base
world only has one-colour objects, and the toy UNet can only paint colours it has seen. They are big
enough to survive a 4x VAE at 32 px; :func:`detect` finds background, objects and concept patterns
exactly on drawn scenes (nearest-palette colours, connected components, shape features), so a
generated image can be scored without any learned metric.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latexblend.fileio import write_text_atomic

SIZE = 32
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "grass": ("on the grass", (50, 140, 50)),
    "snow": ("in the snow", (235, 235, 235)),
    "night": ("at night", (15, 15, 50)),
    "beach": ("on the beach", (215, 185, 120)),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "blue": (30, 60, 230), "yellow": (245, 225, 20), "purple": (150, 40, 170),
}
CLASSES = ("dog", "car", "tree")


@dataclass(frozen=True)
class ConceptStyle:
    """A concept: an object of ``cls`` split in two halves (``axis`` 'x': left|right, 'y': top|bottom)."""

    name: str
    cls: str
    first: str
    second: str
    axis: str


CONCEPTS: dict[str, ConceptStyle] = {
    "patchdog": ConceptStyle("patchdog", "dog", "red", "yellow", "y"),
    "stripecar": ConceptStyle("stripecar", "car", "blue", "red", "y"),

}


@dataclass(frozen=True)
class Thing:
    """One drawn object: class, colour word (or a concept name) and box (x0, y0, x1, y1), inclusive."""

    cls: str
    colour: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]


# --------------------------------------------------------------------------- drawing


def _shape(d: ImageDraw.ImageDraw, cls: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if cls == "dog":
        d.ellipse(box, fill=fill)
    elif cls == "car":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def _draw_thing(image: Image.Image, thing: Thing) -> None:
    d = ImageDraw.Draw(image)
    style = CONCEPTS.get(thing.colour)
    if style is None:
        _shape(d, thing.cls, thing.box, COLOURS[thing.colour])
        return
    x0, y0, x1, y1 = thing.box
    for colour, half in ((style.first, 0), (style.second, 1)):
        mask = Image.new("L", image.size, 0)
        _shape(ImageDraw.Draw(mask), thing.cls, thing.box, 255)
        clip = Image.new("L", image.size, 0)
        if style.axis == "x":
            mid = (x0 + x1 + 1) // 2
            part = (x0, y0, mid - 1, y1) if half == 0 else (mid, y0, x1, y1)
        else:
            mid = (y0 + y1 + 1) // 2
            part = (x0, y0, x1, mid - 1) if half == 0 else (x0, mid, x1, y1)
        ImageDraw.Draw(clip).rectangle(part, fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(clip)))
        image.paste(COLOURS[colour], (0, 0), mask)


def draw_scene(scene: Scene, size: int = SIZE) -> Image.Image:
    """The RGB image of ``scene`` (boxes are in :data:`SIZE` coordinates; other sizes scale them)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background][1])
    for thing in scene.things:
        _draw_thing(image, thing)
    return image if size == SIZE else image.resize((size, size), Image.NEAREST)


def _box(rng: random.Random, cls: str, lo: int, hi: int, xmin: int, xmax: int) -> tuple[int, int, int, int]:
    """A box for ``cls`` whose left/right edges lie in [xmin, xmax)."""
    s = rng.randrange(lo, hi + 1)
    w, h = (min(s + s // 2 + 3, xmax - xmin), max(s // 2 + 2, 6)) if cls == "car" else (min(s, xmax - xmin), s)
    x0 = rng.randrange(xmin, xmax - w + 1)
    y0 = rng.randrange(2, SIZE - h - 1)
    return (x0, y0, x0 + w - 1, y0 + h - 1)


def random_scene(rng: random.Random, two: bool | None = None, allow=None, concept: str | None = None) -> Scene:
    """A random scene; ``allow(scene) -> bool`` filters (held-out combinations); ``concept`` draws a concept
    object as the (only) object."""
    for _ in range(1000):
        background = rng.choice(list(BACKGROUNDS))
        if concept is not None:
            style = CONCEPTS[concept]
            return Scene(background, (Thing(style.cls, concept, _box(rng, style.cls, 12, 17, 1, SIZE - 1)),))
        pair = rng.random() < 0.5 if two is None else two
        if pair:
            things = tuple(Thing(cls, rng.choice(list(COLOURS)), _box(rng, cls, 9, 12, lo, hi))
                           for cls, (lo, hi) in zip(rng.sample(CLASSES, 2) if rng.random() < 0.7
                                                    else [rng.choice(CLASSES)] * 2,
                                                    ((1, SIZE // 2 - 1), (SIZE // 2 + 1, SIZE - 1)), strict=True))
        else:
            cls = rng.choice(CLASSES)
            things = (Thing(cls, rng.choice(list(COLOURS)), _box(rng, cls, 11, 16, 2, SIZE - 2)),)
        scene = Scene(background, things)
        if allow is None or allow(scene):
            return scene
    raise RuntimeError("no allowed scene found")


# --------------------------------------------------------------------------- grammar


def caption(scene: Scene, rng: random.Random | None = None, drop_colour: float = 0.0) -> str:
    """``a red dog next to a blue car on the grass``; each colour word dropped with ``drop_colour``."""
    parts = []
    for thing in scene.things:
        drop = rng is not None and rng.random() < drop_colour
        word = thing.cls if drop or thing.colour in CONCEPTS else f"{thing.colour} {thing.cls}"
        parts.append(f"a {word}")
    return f"{' next to '.join(parts)} {BACKGROUNDS[scene.background][0]}"


def combo(scene: Scene) -> tuple:
    """The (background, (class, colour)...) key of a scene, what the held-out split is about."""
    return (scene.background,) + tuple((t.cls, t.colour) for t in scene.things)


def _held_out() -> tuple[set, set]:
    rng = random.Random(1234)
    backs, cols = list(BACKGROUNDS), list(COLOURS)
    singles, pairs = set(), set()
    while len(singles) < 10:
        singles.add((rng.choice(backs), (rng.choice(CLASSES), rng.choice(cols))))
    while len(pairs) < 10:
        a, b = rng.sample(CLASSES, 2)
        pairs.add((rng.choice(backs), (a, rng.choice(cols)), (b, rng.choice(cols))))
    return singles, pairs


HELD_OUT_SINGLES, HELD_OUT_PAIRS = _held_out()


def in_training(scene: Scene) -> bool:
    """False for scenes whose combination is held out (they never appear in the toy model's data)."""
    key = combo(scene)
    return key not in HELD_OUT_SINGLES and key not in HELD_OUT_PAIRS


def held_out_prompts() -> list[str]:
    """The 20 held-out prompts (10 one-object, 10 two-object), colours always named, sorted."""
    out = []
    for key in sorted(HELD_OUT_SINGLES) + sorted(HELD_OUT_PAIRS):
        things = tuple(Thing(cls, col, (0, 0, 0, 0)) for cls, col in key[1:])
        out.append(caption(Scene(key[0], things)))
    return out


_PROMPT = re.compile(
    r"^a (?:(?P<c1>\w+) )?(?P<o1>\w+)(?: next to a (?:(?P<c2>\w+) )?(?P<o2>\w+))? (?P<bg>on the grass|in the snow|"
    r"at night|on the beach)$")


def parse_prompt(prompt: str) -> dict | None:
    """``{'background': word, 'objects': [(class, colour or None)...]}`` of a grammar prompt, else None."""
    m = _PROMPT.match(prompt.strip().lower())
    if m is None:
        return None
    background = next(k for k, (phrase, _) in BACKGROUNDS.items() if phrase == m["bg"])
    objects = [(m[f"o{i}"], m[f"c{i}"]) for i in (1, 2) if m[f"o{i}"]]
    if any(cls not in CLASSES or (col is not None and col not in COLOURS) for cls, col in objects):
        return None
    return {"background": background, "objects": objects}


# --------------------------------------------------------------------------- detectors


#: The world's colours: every pixel is read as the nearest of them (concepts use world colours too).
PALETTE_NAMES = [*BACKGROUNDS, *COLOURS]
PALETTE = np.array([c for _, c in BACKGROUNDS.values()] + list(COLOURS.values()), dtype=np.float32)
MIN_PIXELS = 12
CONCEPT_SHARE = 0.2  # each of a concept's two colours labels at least this share of the object's pixels
TREE_ASYMMETRY = 0.8  # top-half / bottom-half pixels below this: a triangle
CAR_LOG_ASPECT = 0.3  # log(width / height) above this: a car


@dataclass
class Found:
    """A detected object: class by shape, colour (a palette name), box, pixel count, concept name or None."""

    cls: str
    colour: str
    box: tuple[int, int, int, int]
    pixels: int
    concept: str | None = None
    strict: bool = False  # the concept's halves are in place, not only its two colours


@dataclass
class Detection:
    background: str
    objects: list[Found] = field(default_factory=list)

    def has(self, cls: str, colour: str | None = None) -> bool:
        return any(o.cls == cls and (colour is None or o.colour == colour) for o in self.objects)

    def concepts(self, strict: bool = False) -> list[str]:
        """Concepts found: two-toned objects in a concept's colours (``strict``: halves in place too)."""
        return [o.concept for o in self.objects if o.concept and (o.strict or not strict)]


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


def _concept_of(arr: np.ndarray, labels: np.ndarray, pts: np.ndarray, box) -> tuple[str | None, bool]:
    """``(concept, strict)`` of a component: a concept whose two colours each label at least
    :data:`CONCEPT_SHARE` of its pixels (a two-toned object: the world has none), and whether the
    halves are also in place (nearest palette colours of the mean RGB of the two halves, robust to blur
    at the seam; a left | right pattern in either order)."""
    x0, y0, x1, y1 = box
    counts = np.bincount(labels[pts[:, 0], pts[:, 1]], minlength=len(PALETTE)) / len(pts)
    for name, style in CONCEPTS.items():
        if min(counts[PALETTE_NAMES.index(style.first)], counts[PALETTE_NAMES.index(style.second)]) < CONCEPT_SHARE:
            continue
        coord, mid = (pts[:, 1], (x0 + x1 + 1) // 2) if style.axis == "x" else (pts[:, 0], (y0 + y1 + 1) // 2)
        halves = (pts[coord < mid], pts[coord >= mid])
        if min(len(h) for h in halves) < 3:
            return name, False
        got = tuple(PALETTE_NAMES[int(_nearest(arr[h[:, 0], h[:, 1]].mean(0)))] for h in halves)
        return name, got == (style.first, style.second) or (style.axis == "x" and got == (style.second, style.first))
    return None, False


def detect(image: Image.Image) -> Detection:
    """Background (most frequent background colour), objects (connected pixels of any other palette
    colour, at least :data:`MIN_PIXELS`), each with a class from its shape, a colour (most frequent
    palette colour) and a concept if any."""
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
        colour = PALETTE_NAMES[int(np.bincount(labels[pts[:, 0], pts[:, 1]]).argmax())]
        concept, strict = _concept_of(arr, labels, pts, box)
        found.append(Found(cls, colour, box, len(pts), concept, strict))
    found.sort(key=lambda f: f.box[0])
    return Detection(background, found)


def score(image: Image.Image, prompt: str, concept: str | None = None) -> dict:
    """Per-image toy metrics for a grammar prompt: background right, every named object present
    (class and colour where named; a slot bound to ``concept`` counts by class only), all right,
    concept present."""
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"prompt '{prompt}' is not in the toy grammar")
    det = detect(image)
    style = CONCEPTS.get(concept) if concept else None
    others = [(c, col) for c, col in spec["objects"] if style is None or c != style.cls]
    objects_ok = all(det.has(c, col) for c, col in others)
    out = {"background": det.background == spec["background"], "objects": objects_ok}
    out["all"] = out["background"] and objects_ok
    if concept:
        out["concept"] = concept in det.concepts()
    return out


# --------------------------------------------------------------------------- concept data


def draw_data(root: Path, concept: str, num_images: int, num_prior: int, seed: int) -> tuple[Path, Path]:
    """Instance images of ``concept`` and a captioned prior set of its class, drawn at 32 px."""
    style = CONCEPTS[concept]
    rng = random.Random(seed)
    inst, prior = root / "data" / concept, root / "data" / f"prior-{style.cls}"
    inst.mkdir(parents=True, exist_ok=True)
    prior.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        draw_scene(random_scene(rng, concept=concept)).save(inst / f"{i:02d}.png")
    captions = []
    for i in range(num_prior):
        scene = random_scene(rng, two=False, allow=lambda s: s.things[0].cls == style.cls)
        draw_scene(scene).save(prior / f"{i:03d}.png")
        captions.append(caption(scene))
    write_text_atomic(prior / "captions.txt", "\n".join(captions) + "\n")
    return inst, prior


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Draw a toy concept's instance images and a captioned prior set.")
    ap.add_argument("root", help="writes ROOT/data/<concept>/ and ROOT/data/prior-<class>/")
    ap.add_argument("--concept", default="patchdog", choices=sorted(CONCEPTS))
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--prior", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    inst, prior = draw_data(Path(args.root), args.concept, args.num, args.prior, args.seed)
    print(f"drew {args.num} '{args.concept}' images in {inst}/ and {args.prior} prior images in {prior}/")


if __name__ == "__main__":
    main()
