"""Evaluation: preprocessing, metrics on tiny random CLIP / DINO folders, outputs, report, bad input."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from latexblend.cli import app
from latexblend.errors import LatexBlendError
from latexblend.evaluate import metrics as ev
from latexblend.evaluate import report

runner = CliRunner()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(eval_model_dirs):
    return ev.load_models(str(eval_model_dirs[0]), str(eval_model_dirs[1]), device="cpu")


def noise_image(path: Path, seed: int, size=(96, 80)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_samples(folder: Path, images: list[dict], concepts: dict) -> Path:
    """A fake `generate` output folder (docs/OUTPUT_FORMAT.md): ``images`` entries carry a ``seed_img``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, img in enumerate(images):
        name = f"p{img['prompt_index']:03d}_s{i:07d}.png"
        noise_image(folder / name, img.pop("seed_img"))
        entries.append({"file": name, "seed": i, **img})
    meta = {"format": "latexblend-samples", "format_version": 1, "model": "tiny", "settings": {},
            "concepts": concepts, "images": entries, "grids": {}, "timings": {}}
    (folder / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def image_entry(seed_img, concepts, prompt_index=0, prompt="<a> on a beach", expanded="a dog on a beach"):
    return {"seed_img": seed_img, "prompt_index": prompt_index, "prompt": prompt, "expanded_prompt": expanded,
            "concepts": concepts}


def ref_folder(path: Path, seeds) -> Path:
    path.mkdir(parents=True)
    for s in seeds:
        noise_image(path / f"ref{s}.png", s)
    return path


# --------------------------------------------------------------------------- preprocessing


def test_resize_keeps_aspect_with_shortest_side_then_centre_crop():
    assert ev.resized_size(300, 200, 224) == (336, 224)
    assert ev.resized_size(200, 300, 256) == (256, 384)
    assert ev.resized_size(64, 64, 224) == (224, 224)
    assert ev.center_crop_box(336, 224, 224) == (56, 0, 280, 224)
    assert ev.center_crop_box(256, 384, 224) == (16, 80, 240, 304)


@pytest.mark.parametrize("spec", [ev.CLIP_PREPROCESS, ev.DINO_PREPROCESS], ids=["clip", "dino"])
def test_preprocess_shape_and_normalisation(spec):
    color = (200, 30, 90)
    images = [Image.new("RGB", (300, 200), color), Image.new("RGB", (64, 500), color)]
    pixels = ev.preprocess(images, spec)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    expected = [(c / 255.0 - m) / s for c, m, s in zip(color, spec.mean, spec.std, strict=True)]
    for ch in range(3):
        assert torch.allclose(pixels[:, ch], torch.full_like(pixels[:, ch], expected[ch]), atol=1e-5)


def test_preprocess_constants_are_the_protocols():
    assert (ev.CLIP_PREPROCESS.resize, ev.CLIP_PREPROCESS.crop) == (224, 224)
    assert (ev.DINO_PREPROCESS.resize, ev.DINO_PREPROCESS.crop) == (256, 224)
    assert ev.CLIP_PREPROCESS.mean == (0.48145466, 0.4578275, 0.40821073)
    assert ev.DINO_PREPROCESS.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("spec", [ev.CLIP_PREPROCESS, ev.DINO_PREPROCESS], ids=["clip", "dino"])
def test_preprocess_is_bicubic_resize_then_centre_crop(tmp_path, spec):
    image = Image.open(noise_image(tmp_path / "x.png", 3, size=(120, 90)))
    size = ev.resized_size(120, 90, spec.resize)
    box = ev.center_crop_box(*size, 224)
    mean, std = np.array(spec.mean), np.array(spec.std)
    for method, same in [(Image.Resampling.BICUBIC, True), (Image.Resampling.BILINEAR, False)]:
        manual = np.asarray(image.resize(size, method).crop(box), dtype=np.float32) / 255.0
        manual = torch.from_numpy(((manual - mean) / std).astype(np.float32)).permute(2, 0, 1)
        assert torch.allclose(ev.preprocess([image], spec)[0], manual, atol=1e-5) == same


# --------------------------------------------------------------------------- metrics


def test_clip_score_clips_negative_cosines():
    assert ev.clip_score(-0.3) == 0.0
    assert ev.clip_score(0.0) == 0.0
    assert ev.clip_score(0.2) == pytest.approx(0.5)


def test_identical_generated_and_reference_sets_score_one(tmp_path, models):
    samples = make_samples(tmp_path / "s", [image_entry(7, ["a"]), image_entry(7, ["a"])],
                           {"a": {"class_noun": "dog", "references": str(ref_folder(tmp_path / "r", [7]))}})
    m = ev.evaluate_samples(samples, models)
    for row in m["images"]:
        assert row["per_concept"]["a"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert row["per_concept"]["a"]["dino"] == pytest.approx(1.0, abs=1e-5)
        assert row["clipscore"] == pytest.approx(2.5 * max(row["clip_t"], 0.0))
    assert m["overall"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert m["overall"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert m["overall"]["n_pairs"] == 2 and m["skipped"] == []


def _embed(models, paths):
    clip = ev.embed_images(paths, ev.CLIP_PREPROCESS, lambda x: ev.clip_image_embeds(models.clip, x), "cpu")
    dino = ev.embed_images(paths, ev.DINO_PREPROCESS, lambda x: ev.dino_embeds(models.dino, x), "cpu")
    return clip, dino


def test_two_concept_images_are_scored_per_concept(tmp_path, models):
    ra, rb = ref_folder(tmp_path / "ra", [1, 2]), ref_folder(tmp_path / "rb", [3])
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a", "b"]), image_entry(5, ["a", "b"], 1),
                                            image_entry(6, ["a"], 1)],
                           {"a": {"class_noun": "dog", "references": str(ra)},
                            "b": {"class_noun": "cat", "references": str(rb)}})
    m = ev.evaluate_samples(samples, models, batch_size=2)
    gen = [samples / r["file"] for r in m["images"]]
    clip, dino = _embed(models, gen + [ra / "ref1.png", ra / "ref2.png", rb / "ref3.png"])
    for i, row in enumerate(m["images"]):  # CLIP-I of (image, concept) = mean cosine over that concept's references
        assert row["per_concept"]["a"]["clip_i"] == pytest.approx(float(clip[i] @ clip[3:5].T.mean(1)), abs=1e-5)
        assert row["per_concept"]["a"]["dino"] == pytest.approx(float(dino[i] @ dino[3:5].T.mean(1)), abs=1e-5)
        assert row["per_concept"]["a"]["n_refs"] == 2
    assert m["images"][0]["per_concept"]["b"]["clip_i"] == pytest.approx(float(clip[0] @ clip[5]), abs=1e-5)
    assert "b" not in m["images"][2]["per_concept"]
    rows_a = [r["per_concept"]["a"]["clip_i"] for r in m["images"]]
    rows_b = [r["per_concept"]["b"]["dino"] for r in m["images"][:2]]
    assert m["per_concept"]["a"]["clip_i"] == pytest.approx(sum(rows_a) / 3)
    assert m["per_concept"]["b"]["dino"] == pytest.approx(sum(rows_b) / 2)
    assert (m["per_concept"]["a"]["n_pairs"], m["per_concept"]["b"]["n_pairs"]) == (3, 2)
    assert m["per_concept"]["b"]["n_images"] == 2
    all_pairs = rows_a + [r["per_concept"]["b"]["clip_i"] for r in m["images"][:2]]
    assert m["overall"]["clip_i"] == pytest.approx(sum(all_pairs) / 5) and m["overall"]["n_pairs"] == 5
    assert m["overall"]["clip_t"] == pytest.approx(sum(r["clip_t"] for r in m["images"]) / 3)
    assert m["per_prompt"]["1"]["n_images"] == 2 and m["per_prompt"]["1"]["n_pairs"] == 3
    assert [(r["file"], r["concept"]) for r in report.csv_rows(m)] == [
        (m["images"][0]["file"], "a"), (m["images"][0]["file"], "b"), (m["images"][1]["file"], "a"),
        (m["images"][1]["file"], "b"), (m["images"][2]["file"], "a")]


def test_clip_t_uses_the_recorded_text_policy(tmp_path, models):
    from transformers import CLIPTokenizer

    samples = make_samples(tmp_path / "s", [image_entry(1, [], prompt="<a> in snow", expanded="a dog in snow")], {})
    expanded = ev.evaluate_samples(samples, models)
    raw = ev.evaluate_samples(samples, models, text_policy="raw")
    assert expanded["images"][0]["text"] == "a dog in snow" and raw["images"][0]["text"] == "<a> in snow"
    assert expanded["settings"]["text_policy"] == "expanded" and raw["settings"]["text_policy"] == "raw"
    assert "identifier" in expanded["settings"]["text_policy_note"]
    tok = CLIPTokenizer.from_pretrained(models.clip_id)
    text = ev.clip_text_embeds(models, ["a dog in snow"])
    ids = tok(["a dog in snow"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        direct = models.clip.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    direct = getattr(direct, "pooler_output", direct)
    assert torch.allclose(text, direct / direct.norm(dim=-1, keepdim=True), atol=1e-5)
    img = _embed(models, [samples / expanded["images"][0]["file"]])[0]
    assert expanded["images"][0]["clip_t"] == pytest.approx(float(text[0] @ img[0]), abs=1e-5)
    with pytest.raises(LatexBlendError, match="text policy"):
        ev.evaluate_samples(samples, models, text_policy="ids")


# --------------------------------------------------------------------------- outputs and report


class _TagChecker(HTMLParser):
    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_outputs_and_self_contained_report(tmp_path, models):
    refs = ref_folder(tmp_path / "refs", [1, 2])
    Image.open(refs / "ref1.png").resize((400, 300)).save(refs / "ref1.png")
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a"], prompt="<a> & <b>ig </div>", expanded="x<y")],
                           {"a": {"class_noun": "dog", "references": str(refs)}})
    m = ev.evaluate_samples(samples, models)
    written = report.write_outputs(m, samples)
    assert {p.name for p in written} == {"metrics.json", "metrics.csv", "report.html"}
    assert json.loads((samples / "metrics.json").read_text())["overall"] == m["overall"]
    rows = list(csv.DictReader((samples / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["concept"] == "a" and float(rows[0]["clip_i"]) == pytest.approx(
        m["images"][0]["per_concept"]["a"]["clip_i"])
    page = (samples / "report.html").read_text()
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert page.startswith("<!DOCTYPE html>") and checker.errors == [] and checker.stack == []
    assert "&lt;b&gt;ig &lt;/div&gt;" in page and "<b>ig" not in page and "x&lt;y" in page
    assert len(checker.urls) == 3  # the generated image and two reference thumbnails
    root = samples.resolve()
    for url in checker.urls:
        assert "://" not in url and not url.startswith(("/", "data:"))
        target = (root / url).resolve()
        assert target.is_relative_to(root) and target.is_file()
    thumbs = sorted((samples / report.ASSETS).iterdir())
    assert len(thumbs) == 2 and max(Image.open(thumbs[0]).size) <= report.THUMB_PX
    assert "<style>" in page and "http" not in page


def test_printed_table_lists_overall_concepts_and_skips(tmp_path, models):
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a", "b"])],
                           {"a": {"class_noun": "dog", "references": str(ref_folder(tmp_path / "r", [1]))},
                            "b": {"class_noun": "cat", "references": None}})
    m = ev.evaluate_samples(samples, models)
    lines = report.table_lines(m)
    assert lines[1].startswith("overall") and lines[2].startswith("a ") and lines[3].startswith("b ")
    assert "n/a" in lines[3] and lines[-1].startswith("skipped concept b")


# --------------------------------------------------------------------------- bad input


def test_folder_without_metadata_is_an_error(tmp_path, models):
    (tmp_path / "s").mkdir()
    with pytest.raises(LatexBlendError, match="no metadata.json"):
        ev.evaluate_samples(tmp_path / "s", models)


def test_empty_references_folder_is_an_error(tmp_path, models):
    (tmp_path / "empty").mkdir()
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a"])],
                           {"a": {"class_noun": "dog", "references": str(tmp_path / "empty")}})
    with pytest.raises(LatexBlendError, match="holds no images"):
        ev.evaluate_samples(samples, models)


def test_concept_without_references_is_a_reported_skip(tmp_path, models):
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a", "b"])],
                           {"a": {"class_noun": "dog", "references": str(ref_folder(tmp_path / "r", [1]))},
                            "b": {"class_noun": "cat", "references": None}})
    m = ev.evaluate_samples(samples, models)
    assert m["skipped"] == [{"kind": "concept", "name": "b", "reason": m["skipped"][0]["reason"]}]
    assert m["per_concept"]["b"]["clip_i"] is None and m["per_concept"]["b"]["n_pairs"] == 0
    assert m["overall"]["n_pairs"] == 1
    assert m["overall"]["clip_i"] == pytest.approx(m["images"][0]["per_concept"]["a"]["clip_i"])


def test_unreadable_image_is_an_error_or_a_reported_skip(tmp_path, models):
    refs = ref_folder(tmp_path / "r", [1, 2])
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a"]), image_entry(2, ["a"])],
                           {"a": {"class_noun": "dog", "references": str(refs)}})
    bad = samples / json.loads((samples / "metadata.json").read_text())["images"][1]["file"]
    bad.write_bytes(b"not a png")
    (refs / "ref2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(LatexBlendError, match=r"p000_s0000001.png is not a readable image"):
        ev.evaluate_samples(samples, models)
    m = ev.evaluate_samples(samples, models, skip_bad=True)
    assert {(s["kind"], Path(s["file"]).name) for s in m["skipped"]} == {("image", bad.name), ("reference", "ref2.png")}
    assert m["overall"]["n_images"] == 1 and m["overall"]["n_pairs"] == 1
    assert m["images"][0]["per_concept"]["a"]["n_refs"] == 1


def test_image_paths_must_stay_inside_the_samples_folder(tmp_path):
    samples = make_samples(tmp_path / "s", [image_entry(1, [])], {})
    meta = json.loads((samples / "metadata.json").read_text())
    meta["images"][0]["file"] = "../elsewhere.png"
    (samples / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(LatexBlendError, match="inside"):
        ev.read_samples(samples)


def test_reference_flags():
    assert ev.parse_reference_flags(["data/x"], ["a"]) == {"a": Path("data/x")}
    assert ev.parse_reference_flags(["b=data/y"], ["a", "b"]) == {"b": Path("data/y")}
    with pytest.raises(LatexBlendError, match="NAME=DIR"):
        ev.parse_reference_flags(["data/x"], ["a", "b"])
    with pytest.raises(LatexBlendError, match="no concept 'c'"):
        ev.parse_reference_flags(["c=data/x"], ["a", "b"])


def test_model_that_cannot_be_loaded_is_one_clear_error(tmp_path, eval_model_dirs):
    with pytest.raises(LatexBlendError, match=r"cannot load model .*--clip-model DIR"):
        ev.load_models(str(tmp_path / "missing"), str(eval_model_dirs[1]), device="cpu")
    with pytest.raises(LatexBlendError, match=r"cannot load model 'nobody/nothing'.*--dino-model DIR"):
        ev.load_models(str(eval_model_dirs[0]), "nobody/nothing", device="cpu")


# --------------------------------------------------------------------------- CLI


def test_evaluate_command_end_to_end(tmp_path, eval_model_dirs):
    refs = ref_folder(tmp_path / "r", [1])
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a"])], {"a": {"class_noun": "dog", "references": None}})
    args = ["evaluate", "--samples", str(samples), "--clip-model", str(eval_model_dirs[0]),
            "--dino-model", str(eval_model_dirs[1]), "--device", "cpu"]
    r = runner.invoke(app, [*args, "--references", f"a={refs}"])
    assert r.exit_code == 0, r.output
    assert "overall" in r.output and "CLIP-I" in r.output and "report.html" in r.output
    m = json.loads((samples / "metrics.json").read_text())
    assert m["overall"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert m["settings"]["references"]["a"]["n"] == 1


def test_evaluate_command_bad_input_is_one_line_and_writes_nothing(tmp_path, eval_model_dirs):
    (tmp_path / "empty").mkdir()
    samples = make_samples(tmp_path / "s", [image_entry(1, ["a"])], {"a": {"class_noun": "dog", "references": None}})
    args = ["evaluate", "--samples", str(samples), "--clip-model", str(eval_model_dirs[0]),
            "--dino-model", str(eval_model_dirs[1]), "--device", "cpu"]
    for extra, message in [(["--references", f"a={tmp_path / 'empty'}"], "holds no images"),
                           (["--references", f"zz={tmp_path}"], "no concept 'zz'")]:
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")
        assert message in r.output
    r = runner.invoke(app, ["evaluate", "--samples", str(tmp_path / "empty"), "--clip-model", "nobody/x"])
    assert r.exit_code == 2 and "no metadata.json" in r.output and r.output.count("\n") == 1
    assert not any((samples / n).exists() for n in ("metrics.json", "metrics.csv", "report.html"))
