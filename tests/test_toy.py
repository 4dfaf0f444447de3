"""The toy world: drawing, grammar, held-out split and exact detectors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from latexblend.toy import detect
from latexblend.toy import world as toy


def _scenes(n: int, seed: int = 0, concepts: bool = True) -> list[toy.Scene]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        concept = rng.choice(list(toy.CONCEPTS)) if concepts and i % 4 == 0 else None
        out.append(toy.random_scene(rng, concept=concept))
    return out


def test_detector_is_exact_on_drawn_scenes():
    scenes = _scenes(600)
    things = [t for s in scenes for t in s.things]
    assert sum(len(s.things) == 2 for s in scenes) > 150 and sum("-" in t.colour for t in things) > 150
    for scene in scenes:
        det = detect.detect(toy.draw_scene(scene))
        assert det.background == scene.background
        assert [(f.cls, f.colour) for f in det.objects] == [(t.cls, t.colour) for t in scene.things]
        assert [f.concept for f in det.objects] == [toy.CONCEPT_KEYS.get((t.cls, t.colour)) for t in scene.things]


def test_no_concept_found_in_base_scenes():
    rng = random.Random(1)
    scenes = [toy.random_scene(rng, allow=toy.in_training) for _ in range(1500)]
    found = [detect.detect(toy.draw_scene(s)) for s in scenes]
    assert all(d.concepts() == [] for d in found)  # not even a concept's two colours on its class
    objects = [(o.cls, o.colour) for d in found for o in d.objects]
    # ...yet the world draws the concepts' colour pairs on other classes and other pairs on their classes
    for style in toy.CONCEPTS.values():
        assert sum(col == style.colour and cls != style.cls for cls, col in objects) > 20
        assert sum("-" in col and col != style.colour and cls == style.cls for cls, col in objects) > 100


def test_detector_reads_upscaled_images_and_rejects_plain_background():
    scene = toy.random_scene(random.Random(3), two=True)
    big = toy.draw_scene(scene, size=128)
    assert big.size == (128, 128)
    det = detect.detect(big)
    assert det.background == scene.background and len(det.objects) == 2
    empty = detect.detect(Image.new("RGB", (32, 32), toy.BACKGROUNDS["snow"][1]))
    assert empty.background == "snow" and empty.objects == []


def test_held_out_combinations_never_drawn_for_training():
    rng = random.Random(5)
    keys = {toy.combo(toy.random_scene(rng, allow=toy.in_training)) for _ in range(3000)}
    assert not keys & (toy.HELD_OUT_SINGLES | toy.HELD_OUT_PAIRS)
    prompts = toy.held_out_prompts()
    assert len(prompts) == 20 and sum(" next to " in p for p in prompts) == 10
    for p in prompts:
        spec = toy.parse_prompt(p)
        assert spec is not None and all(col is not None for _, col in spec["objects"])


def test_caption_round_trips_through_the_parser():
    rng = random.Random(9)
    for scene in _scenes(200, seed=2, concepts=False):
        spec = toy.parse_prompt(toy.caption(scene, rng, drop_colour=0.5))
        assert spec["background"] == scene.background
        assert [c for c, _ in spec["objects"]] == [t.cls for t in scene.things]
        assert all(col in (None, t.colour) for (_, col), t in zip(spec["objects"], scene.things, strict=True))
    assert toy.parse_prompt("a photo of a dog") is None
    assert toy.parse_prompt("a green dog on the grass") is None
    assert toy.parse_prompt("a red and red dog on the grass") is None
    two = toy.Scene("snow", (toy.Thing("tree", "blue-purple", (2, 2, 14, 14)),
                             toy.Thing("dog", "red-yellow", (17, 2, 30, 15))))
    assert toy.caption(two) == "a blue and purple tree next to a dog in the snow"  # a concept: its class only
    assert toy.parse_prompt(toy.caption(two))["objects"] == [("tree", "blue-purple"), ("dog", None)]


def test_template_captions_name_the_one_object_in_a_training_template():
    from latexblend.train.data import TEMPLATES

    rng = random.Random(4)
    scene = toy.Scene("beach", (toy.Thing("car", "blue-yellow", (2, 8, 20, 16)),))
    seen = {toy.template_caption(scene, rng) for _ in range(200)}
    assert seen == {t.format("a blue and yellow car") for t in TEMPLATES}
    assert all(toy.parse_prompt(c) is None for c in seen)  # not grammar prompts: evaluation never uses them
    with pytest.raises(ValueError):
        toy.template_caption(toy.random_scene(rng, two=True), rng)


def test_score_counts_what_the_prompt_names():
    scene = toy.Scene("beach", (toy.Thing("dog", "red", (2, 8, 14, 20)), toy.Thing("car", "blue", (17, 10, 30, 17))))
    image = toy.draw_scene(scene)
    assert detect.score(image, "a red dog next to a blue car on the beach") == {
        "background": True, "objects": True, "fidelity": True}
    assert detect.score(image, "a red dog next to a blue car in the snow")["background"] is False
    assert detect.score(image, "a yellow dog on the beach")["objects"] is False
    concept = toy.Scene("grass", (toy.Thing("dog", "red-yellow", (4, 4, 20, 20)),))
    got = detect.score(toy.draw_scene(concept), "a dog on the grass", ["patchdog"])
    assert got["concept"] and got["fidelity"]
    assert detect.score(image, "a dog next to a blue car on the beach", ["patchdog"])["concept"] is False
    with pytest.raises(ValueError):
        detect.score(image, "a photo of a dog")


def test_toy_architecture_matches_its_registry_spec():
    from latexblend.models import REGISTRY, attn2_shapes
    from latexblend.toy.model import build_toy_pipeline

    pipe = build_toy_pipeline()
    dims: dict[int, int] = {}
    for dim in attn2_shapes(pipe.unet).values():
        dims[dim] = dims.get(dim, 0) + 1
    spec = REGISTRY["toy"]
    assert dims == spec.attn2_dims
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == spec.resolution == toy.SIZE


def test_fidelity_scores_count_concepts_and_the_rest_of_the_prompt():
    from latexblend.toy.detect import score, summarise

    scene = toy.Scene("snow", (toy.Thing("dog", "red-yellow", (1, 8, 14, 21)),
                               toy.Thing("car", "red", (17, 10, 30, 16))))
    row = score(toy.draw_scene(scene), "a dog next to a red car in the snow", ["patchdog"])
    assert row["concept"] and row["fidelity"] and row["joint"]
    miss = score(toy.draw_scene(scene), "a dog next to a blue car in the snow", ["patchdog"])
    assert miss["concept"] and not miss["fidelity"]
    plain = toy.Scene("snow", (toy.Thing("dog", "red", (1, 8, 14, 21)),))
    assert not score(toy.draw_scene(plain), "a dog in the snow", ["patchdog"])["concept"]
    s = summarise([row, miss, row, miss])
    assert s["concept_pct"] == 100 and s["fidelity_pct"] == 50 and s["product_pct"] == 50
    assert abs(s["fidelity_se"] - 100 * (1 / 3) ** 0.5 / 2) < 1e-9


def test_concept_pattern_survives_mirroring_but_not_flipping_or_recolouring():
    image = toy.draw_scene(toy.Scene("grass", (toy.Thing("dog", "red-yellow", (4, 4, 20, 20)),)))
    assert detect.detect(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).concepts(strict=True) == ["patchdog"]
    assert detect.detect(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)).concepts(strict=True) == []
    flipped = detect.detect(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    assert flipped.concepts() == ["patchdog"] and flipped.objects[0].colour == "yellow-red"  # colours only
    arr = np.asarray(image).copy()
    arr[(arr == toy.COLOURS["yellow"]).all(-1)] = toy.COLOURS["red"]
    det = detect.detect(Image.fromarray(arr))
    assert det.concepts() == [] and [(o.cls, o.colour) for o in det.objects] == [("dog", "red")]


def _samples_folder(tmp_path, entries):
    import json

    images = []
    for i, (scene, prompt, concepts) in enumerate(entries):
        toy.draw_scene(scene).save(tmp_path / f"{i}.png")
        images.append({"file": f"{i}.png", "prompt": prompt, "concepts": concepts, "seed": i})
    meta = {"format": "latexblend-samples", "images": images, "concepts": {"patchdog": {}}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    return tmp_path


def test_evaluate_with_the_toy_detector(tmp_path):
    from typer.testing import CliRunner

    from latexblend.cli import app
    from latexblend.toy.detect import score_samples

    things = (toy.Thing("dog", "red-yellow", (2, 8, 15, 21)), toy.Thing("car", "red", (17, 10, 30, 16)))
    concept = toy.Scene("beach", things)
    plain = toy.Scene("snow", (toy.Thing("dog", "blue", (4, 4, 20, 20)),))
    folder = _samples_folder(tmp_path, [(concept, "a dog next to a red car on the beach", ["patchdog"]),
                                        (plain, "a dog at night", ["patchdog"]),
                                        (plain, "a blue dog in the snow", [])])  # names no concept
    metrics = score_samples(folder)
    assert [r.get("concept") for r in metrics["images"]] == [True, False, None]
    assert [r["fidelity"] for r in metrics["images"]] == [True, False, True]
    overall = metrics["overall"]
    assert overall["concept_pct"] == 50 and overall["joint_pct"] == 50 and overall["images"] == 3
    assert abs(overall["fidelity_pct"] - 200 / 3) < 1e-9
    result = CliRunner().invoke(app, ["evaluate", "--samples", str(folder), "--detector", "toy"])
    assert result.exit_code == 0 and (folder / "toy_metrics.json").is_file()
    bad = CliRunner().invoke(app, ["evaluate", "--samples", str(folder), "--detector", "dino"])
    assert bad.exit_code == 2 and "--detector" in bad.output


def test_toy_model_folder_loads_with_stock_diffusers_and_draws_the_prompt(tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from latexblend.toy.model import save_toy_model

    folder = save_toy_model(tmp_path / "toy")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    images = pipe("a red dog on the beach", num_inference_steps=20, guidance_scale=5.0, num_images_per_prompt=2,
                  generator=gens).images
    assert images[0].size == (toy.SIZE, toy.SIZE)
    assert any(detect.score(im, "a red dog on the beach")["fidelity"] for im in images)
    with pytest.raises(Exception, match="not empty"):
        save_toy_model(folder)


def test_two_concept_prompts_in_words_describe_both_concepts_in_both_orders():
    from benchmarks.fidelity import PAIR_PROMPTS, pair_in_words

    described = pair_in_words(["patchdog", "stripecar"])
    assert described[0] == "a red and yellow dog next to a blue and purple car on the beach"
    assert described[2] == "a blue and purple car next to a red and yellow dog at night"
    assert len(described) == len(PAIR_PROMPTS) and all(toy.parse_prompt(p) for p in described)


def test_in_words_describes_only_the_concepts_bare_noun_phrase():
    from benchmarks.fidelity import in_words

    from latexblend.toy.detect import score

    assert in_words("a dog next to a red car in the snow", "patchdog") == \
        "a red and yellow dog next to a red car in the snow"
    assert in_words("a purple car next to a dog on the grass", "patchdog") == \
        "a purple car next to a red and yellow dog on the grass"
    assert in_words("a car at night", "stripecar") == "a blue and purple car at night"
    with pytest.raises(ValueError, match="no bare 'a car'"):
        in_words("a red car at night", "stripecar")
    scene = toy.Scene("night", (toy.Thing("car", "blue-purple", (4, 10, 25, 19)),))
    row = score(toy.draw_scene(scene), in_words("a car at night", "stripecar"), ["stripecar"])
    assert row["concept"] and row["fidelity"]
