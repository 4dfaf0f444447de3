"""The toy world: procedural scenes, their caption grammar and exact detectors.

A scene is a flat background named by a word (grass, snow, night, beach) with one object, or two
objects "next to" each other (left and right halves), each a class with a distinct shape (dog = disc,
car = wide rectangle, tree = triangle) and a colour: one world colour (``a red dog``) or two, top over
bottom in a fixed order (``a red and yellow dog``; the training augmentation's horizontal flip keeps it).
Captions come from a small grammar; a fixed set of combinations is held out of training so prompts
can test what the model composes.

Concepts are two-toned objects of one class whose colour pair is held out of the world: the base model
has learned to paint two-toned objects (as SDXL has learned to paint spotted dogs) but has never drawn
a concept, which it sees only in the concept's instance images. :func:`detect` finds background,
objects (class, one colour or a top-over-bottom pair) and concepts exactly on drawn scenes
(nearest-palette colours, connected components, shape features), so a generated image can be scored
without any learned metric.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from latexblend.fileio import write_text_atomic
from latexblend.train.data import TEMPLATES

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


TWO_TONE = 0.5  # share of world objects drawn in two colours


def two_tone(top: str, bottom: str) -> str:
    """The colour name of a two-toned object, ``'red-yellow'``: top half red, bottom half yellow."""
    return f"{top}-{bottom}"


def tones(colour: str) -> tuple[str, ...]:
    """``'red-yellow'`` -> ``('red', 'yellow')``, ``'red'`` -> ``('red',)``."""
    return tuple(colour.split("-"))


#: Every colour an object can have: the four world colours and the six two-tone pairs, always in the
#: order of :data:`COLOURS` from top to bottom (``red-yellow``, never ``yellow-red``), as a breed has
#: its markings in their place.
OBJECT_COLOURS = list(COLOURS) + [two_tone(a, b) for i, a in enumerate(COLOURS) for b in list(COLOURS)[i + 1:]]


@dataclass(frozen=True)
class ConceptStyle:
    """A concept: an object of ``cls`` with ``first`` on its top half and ``second`` on its bottom half."""

    name: str
    cls: str
    first: str
    second: str

    @property
    def colour(self) -> str:
        return two_tone(self.first, self.second)


CONCEPTS: dict[str, ConceptStyle] = {
    "patchdog": ConceptStyle("patchdog", "dog", "red", "yellow"),
    "stripecar": ConceptStyle("stripecar", "car", "blue", "purple"),
}
#: (class, colour) of every concept: held out of the world, so the base model never draws one.
CONCEPT_KEYS = {(c.cls, c.colour): c.name for c in CONCEPTS.values()}


@dataclass(frozen=True)
class Thing:
    """One drawn object: class, colour (a world colour or a two-tone ``'top-bottom'``) and box
    (x0, y0, x1, y1), inclusive."""

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


def split_row(cls: str, y0: int, y1: int) -> int:
    """The first row of a two-toned object's bottom colour: the row that halves the shape's area (the
    middle of a disc or a rectangle; 1/sqrt(2) of the height down from a triangle's apex)."""
    if cls == "tree":
        return y0 + round((y1 - y0 + 1) * math.sqrt(0.5))
    return (y0 + y1 + 1) // 2


def _draw_thing(image: Image.Image, thing: Thing) -> None:
    top, *bottom = tones(thing.colour)
    _shape(ImageDraw.Draw(image), thing.cls, thing.box, COLOURS[top])
    if bottom:
        x0, y0, x1, y1 = thing.box
        mask = Image.new("L", image.size, 0)
        _shape(ImageDraw.Draw(mask), thing.cls, thing.box, 255)
        mask.paste(0, (0, 0, image.size[0], split_row(thing.cls, y0, y1)))  # keep the bottom half only
        image.paste(COLOURS[bottom[0]], (0, 0), mask)


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


def _colour(rng: random.Random) -> str:
    """A world object's colour: one world colour, or (:data:`TWO_TONE` of the time) two different ones."""
    if rng.random() < TWO_TONE:
        return rng.choice(OBJECT_COLOURS[len(COLOURS):])
    return rng.choice(list(COLOURS))


def random_scene(rng: random.Random, two: bool | None = None, allow=None, concept: str | None = None) -> Scene:
    """A random scene; ``allow(scene) -> bool`` filters (held-out combinations); ``concept`` draws a concept
    object as the (only) object."""
    for _ in range(1000):
        background = rng.choice(list(BACKGROUNDS))
        if concept is not None:
            style = CONCEPTS[concept]
            return Scene(background, (Thing(style.cls, style.colour, _box(rng, style.cls, 12, 17, 1, SIZE - 1)),))
        pair = rng.random() < 0.5 if two is None else two
        if pair:
            things = tuple(Thing(cls, _colour(rng), _box(rng, cls, 9, 12, lo, hi))
                           for cls, (lo, hi) in zip(rng.sample(CLASSES, 2) if rng.random() < 0.7
                                                    else [rng.choice(CLASSES)] * 2,
                                                    ((1, SIZE // 2 - 1), (SIZE // 2 + 1, SIZE - 1)), strict=True))
        else:
            cls = rng.choice(CLASSES)
            things = (Thing(cls, _colour(rng), _box(rng, cls, 11, 16, 2, SIZE - 2)),)
        scene = Scene(background, things)
        if allow is None or allow(scene):
            return scene
    raise RuntimeError("no allowed scene found")


# --------------------------------------------------------------------------- grammar


def object_phrase(cls: str, colour: str | None = None) -> str:
    """``a dog``, ``a red dog``, ``a red and yellow dog``."""
    return f"a {cls}" if colour is None else f"a {' and '.join(tones(colour))} {cls}"


def _phrases(scene: Scene, rng: random.Random | None, drop_colour: float) -> list[str]:
    """Each object's phrase, its colour dropped with ``drop_colour`` (a concept's always: it has no words)."""
    out = []
    for thing in scene.things:
        drop = rng is not None and rng.random() < drop_colour
        hidden = drop or (thing.cls, thing.colour) in CONCEPT_KEYS
        out.append(object_phrase(thing.cls, None if hidden else thing.colour))
    return out


def caption(scene: Scene, rng: random.Random | None = None, drop_colour: float = 0.0) -> str:
    """``a red dog next to a blue and yellow car on the grass``; each object's colour words dropped with
    ``drop_colour``. A concept object is captioned by its class alone (``a dog``)."""
    return f"{' next to '.join(_phrases(scene, rng, drop_colour))} {BACKGROUNDS[scene.background][0]}"


def template_caption(scene: Scene, rng: random.Random, drop_colour: float = 0.0) -> str:
    """A one-object scene's object phrase in a template of the training pool, without its background
    (``a photo of a red dog``): the toy model learns what these prompts mean, as SDXL knows "a photo of
    a dog", so the frozen base flow of a concept's replace prompts is a real scene (any background)."""

    if len(scene.things) != 1:
        raise ValueError("a template caption describes a one-object scene")
    return rng.choice(TEMPLATES).format(_phrases(scene, rng, drop_colour)[0])


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
    """False for scenes whose combination is held out or that hold a concept (they never appear in the
    toy model's data)."""
    key = combo(scene)
    concept = any((t.cls, t.colour) in CONCEPT_KEYS for t in scene.things)
    return not concept and key not in HELD_OUT_SINGLES and key not in HELD_OUT_PAIRS


def held_out_prompts() -> list[str]:
    """The 20 held-out prompts (10 one-object, 10 two-object), colours always named, sorted."""
    out = []
    for key in sorted(HELD_OUT_SINGLES) + sorted(HELD_OUT_PAIRS):
        things = tuple(Thing(cls, col, (0, 0, 0, 0)) for cls, col in key[1:])
        out.append(caption(Scene(key[0], things)))
    return out


_OBJECT = r"a (?:(?P<c{0}>\w+(?: and \w+)?) )?(?P<o{0}>\w+)"
_PROMPT = re.compile(f"^{_OBJECT.format(1)}(?: next to {_OBJECT.format(2)})? "
                     r"(?P<bg>on the grass|in the snow|at night|on the beach)$")


def _colour_words(words: str | None) -> str | None:
    """``'red and yellow'`` -> ``'red-yellow'``; ``'red'`` and ``None`` as they are."""
    return two_tone(*words.split(" and ")) if words and " and " in words else words


def parse_prompt(prompt: str) -> dict | None:
    """``{'background': word, 'objects': [(class, colour or None)...]}`` of a grammar prompt, else None."""
    m = _PROMPT.match(prompt.strip().lower())
    if m is None:
        return None
    background = next(k for k, (phrase, _) in BACKGROUNDS.items() if phrase == m["bg"])
    objects = [(m[f"o{i}"], _colour_words(m[f"c{i}"])) for i in (1, 2) if m[f"o{i}"]]
    if any(cls not in CLASSES or (col is not None and col not in OBJECT_COLOURS) for cls, col in objects):
        return None
    return {"background": background, "objects": objects}


# --------------------------------------------------------------------------- concept data


def draw_data(root: Path, concept: str, num_images: int, num_prior: int, seed: int) -> tuple[Path, Path]:
    """Instance images of ``concept`` and a captioned prior set of its class (world scenes: never the
    concept itself), drawn at 32 px."""
    style = CONCEPTS[concept]
    rng = random.Random(seed)
    inst, prior = root / "data" / concept, root / "data" / f"prior-{style.cls}"
    inst.mkdir(parents=True, exist_ok=True)
    prior.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        draw_scene(random_scene(rng, concept=concept)).save(inst / f"{i:02d}.png")
    captions = []
    for i in range(num_prior):
        scene = random_scene(rng, two=False, allow=lambda s: s.things[0].cls == style.cls and in_training(s))
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
    for flag, value, lo, hi in (("--num", args.num, 1, 10_000), ("--prior", args.prior, 0, 100_000),
                                ("--seed", args.seed, 0, 2**63 - 1)):
        if not lo <= value <= hi:
            ap.error(f"{flag} must be in [{lo}, {hi}], got {value}")
    inst, prior = draw_data(Path(args.root), args.concept, args.num, args.prior, args.seed)
    print(f"drew {args.num} '{args.concept}' images in {inst}/ and {args.prior} prior images in {prior}/")


if __name__ == "__main__":
    main()
