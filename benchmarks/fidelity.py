"""Fidelity benchmark on the toy world: does a trained concept appear in new scenes, and does the
rest of the prompt survive? Scored by the exact detectors of :mod:`latexblend.toy.world`.

For each concept of :data:`latexblend.toy.world.CONCEPTS` (a two-toned object of one class, in a colour pair
the toy model never saw) it draws instance images and a prior set (world objects of the class with
their captions), trains the variants (:data:`VARIANTS`: the paper's ablations and the authors'
release's choices; variants that differ only in blending share one training) with the toy recipe,
then generates new-scene prompts (:data:`PROMPTS`) x seeds with no bank, with the concept described in
words (no bank: a reference), and with each variant's bank, plus two-concept prompts (no bank, both concepts
in words, both full banks, and with each blending-only variant's options). Per variant:
concept-present %, prompt-fidelity % (background and the other named objects right), their product,
the per-image joint rate, standard errors; JSON and one grid PNG per variant.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from latexblend.fileio import write_text_atomic
from latexblend.toy import detect
from latexblend.toy import world as toy
from latexblend.toy.detect import summarise
from latexblend.toy.world import draw_data
from latexblend.train.options import RECIPES


@dataclass(frozen=True)
class Variant:
    """A method variant: training settings (``TrainConfig`` fields) and blending options (``apply``)."""

    train: tuple = ()
    blend: tuple = ()


#: The ablations (the paper's) and the release's choices (docs/METHOD.md, and the method questions of docs/TOY.md).
VARIANTS = {
    "full": Variant(),
    "no-base-flow": Variant(train=(("base_flow", False),)),
    "fixed-template": Variant(train=(("fixed_template", True),)),
    "release-loss-weights": Variant(train=(("prior_loss_weight", 0.25),)),  # instance:prior 4:1, as released
    "fixed-time-ids": Variant(train=(("crop_time_ids", False),)),
    "bind-always": Variant(blend=(("bind", "always"),)),  # the release binds before blend_start too
    "no-bind": Variant(blend=(("bind", False),)),
    "enlarge": Variant(train=(("augment_enlarge", True),)),  # Custom Diffusion's 1.2-1.4x enlarge-and-crop
    "guidance": Variant(blend=(("guidance", True),)),  # blending guidance, its defaults (made for many concepts)
    "rectify": Variant(blend=(("rectify", True),)),  # self-attention rectification, its defaults
    "guidance-rectify": Variant(blend=(("guidance", True), ("rectify", True))),
}
DEFAULT_VARIANTS = ["full", "no-base-flow", "fixed-template"]
#: Prompts with the concept's class noun; the other objects and backgrounds vary (none is an instance prompt).
PROMPTS = {
    "dog": ["a dog on the beach", "a dog in the snow", "a dog at night", "a dog on the grass",
            "a dog next to a red car in the snow", "a blue tree next to a dog at night",
            "a dog next to a yellow tree on the beach", "a purple car next to a dog on the grass"],
    "car": ["a car on the beach", "a car in the snow", "a car at night", "a car on the grass",
            "a car next to a red dog in the snow", "a blue tree next to a car at night",
            "a car next to a yellow tree on the beach", "a purple dog next to a car on the grass"],
}
#: Reference rows with no bank: ``no-bank`` (the prompts as they are) and ``in-words`` (the concept's noun
#: phrase replaced by its description, ``a car`` -> ``a blue and purple car``: what the toy model paints
#: when it is told the concept's look, a reference for a bank on these prompts).
REFERENCES = ("no-bank", "in-words")
PAIR_PROMPTS = ["a dog next to a car on the beach", "a dog next to a car in the snow",
                "a car next to a dog at night", "a car next to a dog on the grass"]


@dataclass
class FidelitySettings:
    """What the benchmark trains and generates (defaults: the ``toy`` recipe, see :data:`TOY_RECIPE`)."""

    concepts: list[str] = field(default_factory=lambda: list(toy.CONCEPTS))
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    steps: int = RECIPES["toy"]["steps"]
    lr: float = RECIPES["toy"]["lr"]
    seeds: int = 4
    sample_steps: int = 20
    cfg: float = 5.0
    num_images: int = 8
    num_prior: int = 32
    seed: int = 0
    two_concept: bool = True
    quality: bool = True  # also score the toy model itself on the held-out prompts


#: Training recipe that learns on the toy model (measured with this benchmark; see docs/TOY.md).
TOY_RECIPE = RECIPES["toy"]


def in_words(prompt: str, concept: str) -> str:
    """``prompt`` with the concept's bare noun phrase (``a car``) described in words (``a blue and purple car``)."""
    style = toy.CONCEPTS[concept]
    described, found = re.subn(rf"\ba {style.cls}\b", toy.object_phrase(style.cls, style.colour), prompt, count=1)
    if not found:
        raise ValueError(f"prompt '{prompt}' has no bare 'a {style.cls}' to describe")
    return described


def pair_in_words(pair: list[str]) -> list[str]:
    """:data:`PAIR_PROMPTS` with both concepts described in words (no bank): what the toy model paints when told
    both looks, the reference for two banks at once."""
    return [in_words(in_words(p, pair[0]), pair[1]) for p in PAIR_PROMPTS]


def toy_recipe(settings: FidelitySettings) -> dict:
    """The toy recipe with ``settings``' steps and lr."""
    return RECIPES["toy"] | {"steps": settings.steps, "lr": settings.lr}


def train_variant(root: Path, concept: str, name: str, settings: FidelitySettings, data: tuple[Path, Path],
                  train: tuple = ()):
    """Train ``concept`` on ``toy`` with the toy recipe, ``settings``' steps and lr, and the ``TrainConfig``
    overrides ``train`` (``((key, value), ...)``) as run ``<concept>-<name>``; its bank (a :class:`ConceptBank`)."""
    from latexblend.bank.format import bank_path, load_bank
    from latexblend.settings import merge
    from latexblend.train.loop import train as run_training
    from latexblend.train.options import TrainConfig

    name = f"{concept}-{name}"
    fixed = dict(name=name, images=str(data[0]), prior=str(data[1]), class_noun=toy.CONCEPTS[concept].cls,
                 model="toy", resolution=toy.SIZE, seed=settings.seed, checkpoint_every=0,
                 log_every=max(1, settings.steps), runs_dir=str(root / "runs"), bank_dir=str(root / "bank"),
                 overwrite=True)
    cfg = merge(TrainConfig, toy_recipe(settings), dict(train), fixed, source="training setting")  # as --set
    run_training(cfg, progress=False)
    return load_bank(bank_path(name, root / "bank"))


def generate_rows(pipe, prompts: list[str], seeds: int, settings: FidelitySettings, concepts: list[str],
                  banks: list | None, blend: tuple = ()) -> tuple[list[dict], list]:
    """Generate prompts x seeds (blending ``banks`` with ``apply`` options ``blend`` if given) and score
    each image for ``concepts``."""
    import torch

    from latexblend.blend.blender import apply

    blender = apply(pipe, banks, **dict(blend)) if banks else None
    rows, images = [], []
    try:
        for prompt in prompts:
            gens = [torch.Generator().manual_seed(settings.seed + j) for j in range(seeds)]
            out = pipe(prompt=prompt, num_inference_steps=settings.sample_steps, guidance_scale=settings.cfg,
                       height=toy.SIZE, width=toy.SIZE, num_images_per_prompt=seeds, generator=gens).images
            for j, image in enumerate(out):
                rows.append({"prompt": prompt, "seed": settings.seed + j} | detect.score(image, prompt, concepts))
                images.append(image)
    finally:
        if blender is not None:
            blender.remove()
    return rows, images


def held_out_quality(pipe, seeds: int = 4, steps: int = 20, cfg: float = 5.0) -> dict:
    """The toy model itself on the 20 held-out prompts x ``seeds``: background right %, object class
    and colour right % (one-object prompts), both objects right % (two-object prompts)."""
    import torch

    single, pair, backs = [], [], []
    for prompt in toy.held_out_prompts():
        spec = toy.parse_prompt(prompt)
        gens = [torch.Generator().manual_seed(j) for j in range(seeds)]
        images = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg, height=toy.SIZE,
                      width=toy.SIZE, num_images_per_prompt=seeds, generator=gens).images
        for image in images:
            det = detect.detect(image)
            backs.append(det.background == spec["background"])
            (pair if len(spec["objects"]) == 2 else single).append(all(det.has(c, col) for c, col in spec["objects"]))
    rate = lambda v: round(100 * sum(v) / len(v), 1)  # noqa: E731
    return {"background_pct": rate(backs), "object_pct": rate(single), "two_objects_pct": rate(pair),
            "images": len(backs), "steps": steps, "cfg": cfg}


def save_grid(images: list, path: Path, cols: int, scale: int = 3) -> None:
    from PIL import Image

    from latexblend.blend.samples import make_grid
    from latexblend.fileio import atomic_path

    grid = make_grid([im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images], cols=cols)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def run_fidelity(out: str | Path, settings: FidelitySettings | None = None, progress=print) -> dict:
    """The whole benchmark; writes ``out/fidelity.json`` and ``out/grid-<variant>.png``. Returns the JSON."""
    from latexblend.models import load_pipeline

    settings = settings or FidelitySettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    banks: dict[str, dict] = {}  # training settings -> concept -> bank: variants that differ only in
    for concept in settings.concepts:  # blending share one training
        data = draw_data(out, concept, settings.num_images, settings.num_prior, settings.seed)
        for variant in settings.variants:
            train = VARIANTS[variant].train
            trained = banks.setdefault(train, {})
            if concept not in trained:  # named after the first variant with these settings ("full" for none)
                name = next(n for n, v in VARIANTS.items() if v.train == train)
                progress(f"training {concept} ({name}, {settings.steps} steps)")
                trained[concept] = train_variant(out, concept, name, settings, data, train)
    pipe = load_pipeline("toy", device="cpu", dtype="fp32")
    result = {"settings": settings.__dict__, "variants": {},
              "recipe": toy_recipe(settings),
              "variant_settings": {v: {"train": dict(VARIANTS[v].train), "blend": dict(VARIANTS[v].blend)}
                                   for v in settings.variants}}
    if settings.quality:
        result["base_quality"] = held_out_quality(pipe, settings.seeds, settings.sample_steps, settings.cfg)
        progress(f"toy model on held-out prompts: {result['base_quality']}")
    for variant in [*REFERENCES, *settings.variants]:
        rows, images = [], []
        spec = VARIANTS.get(variant, Variant())
        for concept in settings.concepts:
            prompts = PROMPTS[toy.CONCEPTS[concept].cls]
            if variant == "in-words":
                prompts = [in_words(p, concept) for p in prompts]
            bank = None if variant in REFERENCES else [banks[spec.train][concept]]
            r, ims = generate_rows(pipe, prompts, settings.seeds, settings, [concept], bank, spec.blend)
            rows += [x | {"concept_name": concept} for x in r]
            images += ims
        result["variants"][variant] = summarise(rows) | {"per_concept": {
            c: summarise([x for x in rows if x["concept_name"] == c]) for c in settings.concepts}}
        save_grid(images, out / f"grid-{variant}.png", cols=settings.seeds * 2)
        progress(f"{variant}: {_line(result['variants'][variant])}")
    if settings.two_concept and len(settings.concepts) >= 2 and () in banks:  # the full method's banks
        pair = settings.concepts[:2]
        full = [banks[()][c] for c in pair]
        blended = [(f"two-concept-{v}", PAIR_PROMPTS, full, VARIANTS[v].blend) for v in settings.variants
                   if v != "full" and not VARIANTS[v].train]  # blending options on the full banks
        for variant, prompts, chosen, blend in (("two-concept-no-bank", PAIR_PROMPTS, None, ()),
                                                ("two-concept-in-words", pair_in_words(pair), None, ()),
                                                ("two-concept", PAIR_PROMPTS, full, ()), *blended):
            rows, images = generate_rows(pipe, prompts, settings.seeds, settings, pair, chosen, blend)
            result["variants"][variant] = summarise(rows)
            save_grid(images, out / f"grid-{variant}.png", cols=settings.seeds * 2)
            progress(f"{variant}: {_line(result['variants'][variant])}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(out / "fidelity.json", json.dumps(result, indent=1))
    return result


def _line(summary: dict) -> str:
    return (f"concept {summary['concept_pct']:.0f}% (se {summary['concept_se']:.0f}), colours "
            f"{summary['concept_colours_pct']:.0f}%, fidelity "
            f"{summary['fidelity_pct']:.0f}% (se {summary['fidelity_se']:.0f}), product "
            f"{summary['product_pct']:.0f}%, joint {summary['joint_pct']:.0f}%")


def table(result: dict) -> str:
    """Markdown table of a fidelity result."""
    lines = ["| variant | concept present % | concept colours % | prompt fidelity % | product % | "
             "both in one image % | images |", "|---|---|---|---|---|---|---|"]
    for name, s in result["variants"].items():
        lines.append(f"| {name} | {s['concept_pct']:.0f} ± {s['concept_se']:.0f} | {s['concept_colours_pct']:.0f} | "
                     f"{s['fidelity_pct']:.0f} ± {s['fidelity_se']:.0f} | {s['product_pct']:.0f} | "
                     f"{s['joint_pct']:.0f} | {s['images']} |")
    return "\n".join(lines)
