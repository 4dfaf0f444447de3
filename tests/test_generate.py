import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import latexblend
from conftest import random_bank
from latexblend.attention import project_kv
from latexblend.bank.format import ConceptBank, save_bank, verify_bank
from latexblend.blend.blender import apply
from latexblend.blend.generate import generate
from latexblend.blend.options import GenerateConfig
from latexblend.blend.processor import BlendProcessor
from latexblend.cli import app
from latexblend.errors import LatexBlendError
from latexblend.models import attn2_modules, build_tiny_pipeline, fingerprint, load_pipeline
from latexblend.tokens import locate_spans, token_ids

runner = CliRunner()
STEPS = 3


def stock(pipe, prompt, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="np", **kw).images


def bank_for(pipe, name, noun, seed):
    return random_bank(pipe.unet, name=name, noun=noun, noun_ids=tuple(token_ids(pipe.tokenizer, noun)), seed=seed)


def own_rows_bank(pipe, prompt, noun, name="plain"):
    """A bank holding the base model's own K/V rows of `[a, noun]` in `prompt` (stock encode_prompt)."""
    _, spans = locate_spans(pipe.tokenizer, prompt, [(name, noun, token_ids(pipe.tokenizer, noun))])
    with torch.no_grad():
        ctx = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
        k, v = {}, {}
        for layer, attn in attn2_modules(pipe.unet).items():
            kk, vv = project_kv(attn, ctx)
            k[layer], v[layer] = kk[0, spans[0].positions], vv[0, spans[0].positions]
    return ConceptBank(name=name, class_noun=noun, noun_ids=token_ids(pipe.tokenizer, noun), k=k, v=v,
                       base_model="tiny", fingerprint=fingerprint(pipe.unet).to_json())


@pytest.fixture()
def banks_dir(tiny_pipe, tmp_path):
    for i, (name, noun) in enumerate([("corgi", "dog"), ("husky", "dog"), ("castle", "castle")]):
        save_bank(bank_for(tiny_pipe, name, noun, seed=i), tmp_path / f"{name}.safetensors")
    return tmp_path


def test_no_concepts_matches_stock_pipeline(tiny_pipe, tmp_path):
    expected = stock(tiny_pipe, "a photo of a dog on the beach", seed=3, guidance_scale=6.0)
    arrays = []
    cfg = GenerateConfig(prompts=["a photo of a dog on the beach"], steps=STEPS, seed=3, out=str(tmp_path / "o"))
    from latexblend.blend.blender import Blender
    from latexblend.blend.generate import run_prompts

    blender = Blender(tiny_pipe, {})
    try:
        run_prompts(tiny_pipe, cfg, blender, on_image=lambda r, p, a, m: arrays.append(a))
    finally:
        blender.remove()
    assert np.abs(arrays[0] - expected[0]).max() <= 1e-5
    assert np.abs(stock(tiny_pipe, "a photo of a dog on the beach", seed=3, guidance_scale=6.0) - expected).max() == 0


def test_bank_of_the_models_own_rows_is_a_no_op(tiny_pipe):
    prompt = "a dog on the beach"
    expected = stock(tiny_pipe, prompt)
    with apply(tiny_pipe, [own_rows_bank(tiny_pipe, prompt, "dog")], bind=False):
        got = stock(tiny_pipe, prompt)
    assert np.abs(got - expected).max() <= 1e-5


def test_random_bank_changes_the_image_and_remove_restores(tiny_pipe):
    expected = stock(tiny_pipe, "a dog on the beach")
    blender = apply(tiny_pipe, [bank_for(tiny_pipe, "corgi", "dog", 0)])
    changed = stock(tiny_pipe, "a dog on the beach")
    blender.remove()
    assert np.abs(changed - expected).max() > 1e-3
    assert np.array_equal(stock(tiny_pipe, "a dog on the beach"), expected)


def _record_kv(monkeypatch):
    calls = []
    original = BlendProcessor.kv

    def spy(self, attn, context):
        k, v = original(self, attn, context)
        plain_k, plain_v = project_kv(attn, context)
        calls.append((self.layer, self.state.t_frac, k.detach().clone(), v.detach().clone(), plain_k, plain_v))
        return k, v

    monkeypatch.setattr(BlendProcessor, "kv", spy)
    return calls


@pytest.mark.parametrize("bind", [False, True, "always"])
def test_rows_are_the_bank_rows_only_in_the_window_and_on_the_conditional_branch(tiny_pipe, monkeypatch, bind):
    calls = _record_kv(monkeypatch)
    bank = bank_for(tiny_pipe, "corgi", "dog", 0)
    with apply(tiny_pipe, [bank], blend_start=0.5, bind=bind):
        stock(tiny_pipe, "photo of a dog")
    fracs = sorted({c[1] for c in calls})
    assert any(f < 0.5 for f in fracs) and any(f >= 0.5 for f in fracs)
    span = slice(3, 5)  # [BOS, photo, of, a, dog, EOS]
    for layer, frac, k, v, pk, pv in calls:
        assert k.shape[0] == 2  # [uncond, cond]
        assert torch.equal(k[0], pk[0]) and torch.equal(v[0], pv[0])  # unconditional branch untouched
        outside = [i for i in range(77) if i not in (3, 4)]
        assert torch.equal(k[1, outside], pk[1, outside]) and torch.equal(v[1, outside], pv[1, outside])
        if frac < 0.5:
            assert torch.equal(v[1, span], bank.v[layer])
            if bind:
                assert torch.equal(k[1, 3], bank.k[layer][1]) and torch.equal(k[1, 4], bank.k[layer][1])
            else:
                assert torch.equal(k[1, span], bank.k[layer])
        elif bind == "always":  # the release: the plain slot ("a") bound to the noun before blend_start
            assert torch.equal(v[1], pv[1]) and torch.equal(k[1, 3], pk[1, 4]) and torch.equal(k[1, 4], pk[1, 4])
        else:
            assert torch.equal(k[1], pk[1]) and torch.equal(v[1], pv[1])


def test_bind_must_be_a_known_mode(tiny_pipe):
    with pytest.raises(LatexBlendError, match="bind must be"):
        apply(tiny_pipe, [], bind="sometimes")


@pytest.mark.parametrize("scheduler", ["default", "ddim", "dpmpp_2m"])
def test_recorded_t_over_T_follows_the_schedule(tiny_pipe, monkeypatch, scheduler):
    from latexblend.blend.generate import set_scheduler

    calls = _record_kv(monkeypatch)
    old = tiny_pipe.scheduler
    set_scheduler(tiny_pipe, scheduler)
    try:
        with apply(tiny_pipe, []):
            stock(tiny_pipe, "a dog")
        expected = [float(t) / 1000 for t in tiny_pipe.scheduler.timesteps]
    finally:
        tiny_pipe.scheduler = old
    per_step = [c[1] for c in calls][:: len(attn2_modules(tiny_pipe.unet))]
    assert per_step == pytest.approx(expected) and len(per_step) == STEPS


def test_text_is_projected_once_per_prompt_not_per_step(tiny_pipe):
    calls = []
    hooks = [m.to_k.register_forward_hook(lambda *a: calls.append(1)) for m in attn2_modules(tiny_pipe.unet).values()]
    try:
        stock(tiny_pipe, "a dog")
        per_stock = len(calls)
        calls.clear()
        with apply(tiny_pipe, [bank_for(tiny_pipe, "corgi", "dog", 0)]):
            stock(tiny_pipe, "a dog")
    finally:
        for h in hooks:
            h.remove()
    assert per_stock == 11 * STEPS and len(calls) == 11


def test_two_concepts_of_one_class_through_placeholders(tiny_pipe, monkeypatch):
    calls = _record_kv(monkeypatch)
    corgi, husky = bank_for(tiny_pipe, "corgi", "dog", 1), bank_for(tiny_pipe, "husky", "dog", 2)
    with apply(tiny_pipe, [], optional=[corgi, husky]) as blender:
        stock(tiny_pipe, "<husky> playing with <corgi>")
        assert blender.call.prompts == ["a dog playing with a dog"]
    layer, _, k, v, _, _ = next(c for c in calls if c[1] < 0.9)
    assert torch.equal(v[1, 1:3], husky.v[layer]) and torch.equal(v[1, 5:7], corgi.v[layer])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_one_to_eight_concepts(tiny_pipe, monkeypatch, n):
    nouns = ["dog", "cat", "car", "tree", "house", "cup", "boat", "bird"][:n]
    calls = _record_kv(monkeypatch)
    banks = [bank_for(tiny_pipe, f"c{i}", noun, i) for i, noun in enumerate(nouns)]
    prompt = ", ".join(f"a {noun}" for noun in nouns)
    with apply(tiny_pipe, banks, bind=False):
        img = stock(tiny_pipe, prompt)
    assert np.isfinite(img).all()
    layer, _, k, v, _, _ = next(c for c in calls if c[1] < 0.9)
    for i, bank in enumerate(banks):
        start = 1 + 3 * i  # "a noun ," repeats every 3 tokens after BOS
        assert torch.equal(k[1, start : start + 2], bank.k[layer]), bank.name


def test_batch_of_prompts_and_images_per_prompt(tiny_pipe, monkeypatch):
    calls = _record_kv(monkeypatch)
    bank = bank_for(tiny_pipe, "corgi", "dog", 0)
    with apply(tiny_pipe, [bank], bind=False):
        g = [torch.Generator().manual_seed(s) for s in range(4)]
        tiny_pipe(["a dog", "photo of a dog"], num_inference_steps=2, num_images_per_prompt=2, generator=g,
                  output_type="np")
    layer, _, k, _, pk, _ = next(c for c in calls if c[1] < 0.9)
    assert k.shape[0] == 8 and torch.equal(k[:4], pk[:4])
    for row, start in ((4, 1), (5, 1), (6, 3), (7, 3)):
        assert torch.equal(k[row, start : start + 2], bank.k[layer])


def test_generate_writes_images_metadata_and_grid(tiny_pipe, banks_dir, tmp_path):
    cfg = GenerateConfig(prompts=["<corgi> in front of a castle", "<husky> and <corgi>"], concepts=["castle"],
                         num_images=2, seed=10, steps=2, out=str(tmp_path / "out"), bank_dir=str(banks_dir))
    with pytest.raises(LatexBlendError, match="noun 'castle' is not in the prompt"):
        generate(cfg, pipe=tiny_pipe)  # castle is required in every prompt; the second lacks it
    cfg.prompts[1] = "<husky> and <corgi> at a castle"
    cfg.out = str(tmp_path / "out2")
    out = generate(cfg, pipe=tiny_pipe)
    assert cfg.height is None and cfg.width is None  # the caller's settings are not changed
    meta = json.loads((out / "metadata.json").read_text())
    assert [im["seed"] for im in meta["images"]] == [10, 11, 10, 11]
    assert meta["images"][0]["expanded_prompt"] == "a dog in front of a castle"
    assert meta["images"][0]["concepts"] == ["castle", "corgi"]
    assert meta["images"][2]["concepts"] == ["castle", "husky", "corgi"]
    assert set(meta["concepts"]) == {"castle", "corgi", "husky"}
    assert meta["concepts"]["corgi"]["bank"].endswith("corgi.safetensors")
    assert meta["settings"]["height"] == 64 and meta["settings"]["steps"] == 2
    for im in meta["images"]:
        png = Image.open(out / im["file"])
        assert png.size == (64, 64)
        assert json.loads(png.text["latexblend"])["seed"] == im["seed"]
    assert Image.open(out / meta["grids"]["0"]).size == (128, 64)
    first = np.asarray(Image.open(out / meta["images"][0]["file"]))
    assert not np.array_equal(first, np.asarray(Image.open(out / meta["images"][1]["file"])))  # seeds differ
    cfg.out = str(tmp_path / "out3")
    again = generate(cfg, pipe=tiny_pipe)
    assert np.array_equal(first, np.asarray(Image.open(again / meta["images"][0]["file"])))  # same seed, same image


@pytest.mark.parametrize("factor, ok", [(1.0, True), (20.0, True), (1e5, False), (1e30, False)])
def test_bank_rows_far_larger_than_the_models_own_are_refused(tiny_pipe, factor, ok):
    """Random rows are about 3x the model's own rows of 'a dog'; over 100x is refused, also in fp32 where 1e30
    would still be finite, by verify_bank given the text side and by every Blender."""
    bank = bank_for(tiny_pipe, "corgi", "dog", seed=0)
    bank.k = {n: t * factor for n, t in bank.k.items()}
    text_side = ([tiny_pipe.tokenizer, tiny_pipe.tokenizer_2], [tiny_pipe.text_encoder, tiny_pipe.text_encoder_2])
    if ok:
        verify_bank(bank, tiny_pipe.unet, tiny_pipe.tokenizer, text_side=text_side)
        apply(tiny_pipe, [bank]).remove()
        return
    with pytest.raises(LatexBlendError, match=r"its K rows are .* times the norm of this model's own rows of 'a dog'"):
        verify_bank(bank, tiny_pipe.unet, tiny_pipe.tokenizer, text_side=text_side)
    with pytest.raises(LatexBlendError, match="at most 100"):
        apply(tiny_pipe, [bank])
    assert getattr(tiny_pipe, "_latexblend", None) is None
    verify_bank(bank, tiny_pipe.unet, tiny_pipe.tokenizer)  # without the text side: shapes and fingerprint only


def test_an_image_holding_nan_is_an_error_and_the_folder_is_not_finished(tiny_dir, tmp_path):
    pipe = load_pipeline(str(tiny_dir), device="cpu", dtype="fp32")
    pipe.vae.decoder.register_forward_hook(lambda module, args, out: out * float("nan"))
    cfg = GenerateConfig(prompts=["a dog"], num_images=2, steps=2, out=str(tmp_path / "out"))
    with pytest.raises(LatexBlendError, match=r"image p000_s0000000.png came out holding NaN or infinite values .* "
                                              r"the output folder is not marked finished"):
        generate(cfg, pipe=pipe)
    assert not (tmp_path / "out" / "metadata.json").exists() and not (tmp_path / "out" / "p000_s0000000.png").exists()


def test_an_interrupted_generation_is_continued_only_with_the_same_settings(tiny_pipe, tmp_path, monkeypatch):
    from latexblend.blend import samples

    save = samples.save_image

    def stop_after_one(out, record, pil, settings):
        save(out, record, pil, settings)
        if record["seed"] == 0:
            raise KeyboardInterrupt

    cfg = GenerateConfig(prompts=["a dog"], num_images=2, steps=2, out=str(tmp_path / "out"))
    monkeypatch.setattr(samples, "save_image", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, pipe=tiny_pipe)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [samples.UNFINISHED, "p000_s0000000.png"]
    other = GenerateConfig(prompts=["a dog"], num_images=2, steps=2, seed=7, out=str(out))
    with pytest.raises(LatexBlendError, match=r"unfinished generation of other settings \(different seed\)"):
        generate(other, pipe=tiny_pipe)
    generate(cfg, pipe=tiny_pipe)  # the same settings: continued and finished
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "p000_grid.png", "p000_s0000000.png",
                                                     "p000_s0000001.png"]


def _cli(*args):
    return runner.invoke(app, ["generate", "--steps", "2", *[str(a) for a in args]])


def test_cli_generate_end_to_end(banks_dir, tmp_path, tiny_dir):
    r = _cli("-p", "a dog near a castle", "--concepts", "corgi,castle", "--dir", banks_dir, "--out", tmp_path / "o",
             "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["images"][0]["concepts"] == ["corgi", "castle"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "a dog", "--concepts", "nobody"], "no concept 'nobody'"),
        (["-p", "a cat on a sofa", "--concepts", "corgi"], "noun 'dog' is not in the prompt"),
        (["-p", "a dog " + "very " * 80, "--concepts", "corgi"], "over CLIP's limit of 77"),
        (["-p", "a dog on grass", "--concepts", "corgi,husky"], "claim the same 'dog' span"),
        (["-p", "a dog", "--concepts", "other"], "made for base model"),
        (["-p", "a dog", "--height", "60"], "multiple of 8"),
        (["-p", "a dog", "--blend-start", "1.5"], "blend_start must be in"),
        (["--concepts", "corgi"], "no prompt given"),
    ],
)
def test_cli_bad_input_is_one_line(banks_dir, tmp_path, args, message):
    other = build_tiny_pipeline(seed=9)
    save_bank(random_bank(other.unet, name="other"), banks_dir / "other.safetensors")
    r = _cli(*args, "--dir", banks_dir, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o" / "metadata.json").exists()


def test_cli_unwritable_out(banks_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    r = _cli("-p", "a dog", "--out", tmp_path / "file" / "sub", "--dir", banks_dir)
    assert r.exit_code == 2 and "cannot write to output folder" in r.output


def test_cli_refuses_existing_run(banks_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metadata.json").write_text("{}")
    r = _cli("-p", "a dog", "--out", tmp_path / "o", "--dir", banks_dir)
    assert r.exit_code == 2 and "already holds a generation" in r.output
    assert (tmp_path / "o" / "metadata.json").read_text() == "{}"


def test_release_inference_json(tiny_pipe, banks_dir, tmp_path):
    from latexblend.models import attn2_shapes

    shapes = attn2_shapes(tiny_pipe.unet)
    pt = banks_dir / "n_2_dog_1500.pt"
    torch.save({f"{n}.processor": {"k": torch.randn(2, c), "v": torch.randn(2, c)} for n, c in shapes.items()}, pt)
    release = [{"prompt": "a dog in front of a castle", "batch_size": 2, "num_inference_steps": 2,
                "blending_start": 0.8, "concept_num": 2,
                "concept1": {"concept_bank": str(pt), "class_noun": "dog"},
                "concept2": {"concept_bank": str(banks_dir / "castle.pt"), "class_noun": "castle"}}]
    cfg_file = tmp_path / "inference.json"
    cfg_file.write_text(json.dumps(release))
    r = _cli("--config", cfg_file, "--dir", banks_dir, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "bank import" in r.output and "n_2_dog_1500" in r.output
    r = runner.invoke(app, ["bank", "import", str(pt), "--class-noun", "dog", "--dir", str(banks_dir)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--config", str(cfg_file), "--dir", str(banks_dir),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["settings"]["blend_start"] == 0.8 and meta["settings"]["steps"] == 2 and len(meta["images"]) == 2
    assert meta["images"][0]["concepts"] == ["n_2_dog_1500", "castle"]


def test_encode_prompt_wrapper_binds_positional_arguments_and_passes_embeds(tiny_pipe):
    bank = bank_for(tiny_pipe, "corgi", "dog", 0)
    with apply(tiny_pipe, [bank]) as blender:
        embeds = tiny_pipe.encode_prompt("a dog", None, "cpu", 1, False)[0]  # stock positional order
        assert embeds.shape == (1, 77, 64) and blender.call.prompts == ["a dog"]
        with pytest.raises(LatexBlendError, match="needs the prompt text"):
            tiny_pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=1)
    with apply(tiny_pipe, [], optional=[bank]):  # nothing required: precomputed embeddings pass through
        g = torch.Generator().manual_seed(0)
        out = tiny_pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=2,
                        guidance_scale=1.0, generator=g, output_type="np").images
    g = torch.Generator().manual_seed(0)
    ref = tiny_pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=2,
                    guidance_scale=1.0, generator=g, output_type="np").images
    assert np.abs(out - ref).max() <= 1e-5


def test_applying_twice_is_refused_and_remove_allows_again(tiny_pipe):
    bank = bank_for(tiny_pipe, "corgi", "dog", 0)
    with apply(tiny_pipe, [bank]):
        with pytest.raises(LatexBlendError, match="already applied"):
            apply(tiny_pipe, [bank])
    with apply(tiny_pipe, [bank]) as blender:
        assert blender.pipe is tiny_pipe
    assert "encode_prompt" not in tiny_pipe.__dict__


def test_package_exposes_apply():
    assert latexblend.apply is apply


def csv_rows_of(folder):
    import csv

    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_generate_output_feeds_evaluate(tiny_pipe, tmp_path, eval_model_dirs):
    """Real generate output (references recorded in the bank) -> evaluate -> metrics and report."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(refs / f"{i}.png")
    bank = bank_for(tiny_pipe, "corgi", "dog", 0)
    bank.training = {"images": str(refs)}
    save_bank(bank, tmp_path / "banks" / "corgi.safetensors")
    cfg = GenerateConfig(prompts=["<corgi> on a beach", "a cat"], num_images=2, steps=2, out=str(tmp_path / "s"),
                         bank_dir=str(tmp_path / "banks"))
    out = generate(cfg, pipe=tiny_pipe)
    clip, dino = eval_model_dirs
    r = runner.invoke(app, ["evaluate", "--samples", str(out), "--clip-model", str(clip), "--dino-model", str(dino)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "corgi" in text and (out / "report.html").exists() and (out / "metrics.csv").exists()
    rows = list(csv_rows_of(out))
    assert sum(1 for row in rows if row.get("concept") == "corgi") == 2  # the two <corgi> images


RANK_ONE_FAILS = """
import os

import latexblend.blend.generate as generate
from latexblend.errors import LatexBlendError

check = generate._check_finite


def fail_on_rank_one(arrays, prompt_index, seeds):
    if os.environ.get("RANK") == "1":
        raise LatexBlendError("rank 1 failed on purpose")
    return check(arrays, prompt_index, seeds)


generate._check_finite = fail_on_rank_one
from latexblend.cli import main  # noqa: E402

main()
"""


def test_a_process_failing_while_sampling_stops_the_others(tiny_dir, banks_dir, tmp_path):
    """accelerate launch (2 CPU processes), the second fails at its first image: each process stops with one clear
    line (not a traceback from a barrier whose peer has gone, nor a wait for it; the others at their next image),
    no metadata.json, and a re-run finishes the folder."""
    from conftest import launch_two

    script = tmp_path / "rank_one_fails.py"
    script.write_text(RANK_ONE_FAILS)
    out = tmp_path / "out"
    args = ["generate", "-p", "<corgi> on a beach", "-p", "a dog at a castle", "--num-images", "2", "--steps", "2",
            "--model", tiny_dir, "--dir", banks_dir, "--batch-size", "1", "--out", out]
    r = launch_two(args, script=script, timeout=150)
    assert r.returncode != 0
    assert "rank 1 failed on purpose" in r.stderr and "another process failed" in r.stderr, r.stderr[-2000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr
    assert not (out / "metadata.json").exists() and not (out / ".latexblend-stopped").exists()
    r = launch_two(args, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((out / "metadata.json").read_text())["images"]) == 4


def test_two_processes_share_the_images_of_one_folder(tiny_dir, banks_dir, tmp_path):
    """accelerate launch (2 CPU processes): no image lost or duplicated, the same pixels as one process."""
    from conftest import launch_two

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<corgi> on a beach\na dog at a castle\n# skipped\na photo of a cat\n")
    args = ["generate", "--prompts-file", prompts, "--num-images", "3", "--steps", "2", "--model", tiny_dir,
            "--dir", banks_dir, "--batch-size", "1"]  # batching changes float rounding
    r = launch_two([*args, "--out", tmp_path / "two"])
    assert r.returncode == 0, r.stderr[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): same float reduction order
    try:
        r = runner.invoke(app, [str(a) for a in args] + ["--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    two = json.loads((tmp_path / "two" / "metadata.json").read_text())
    one = json.loads((tmp_path / "one" / "metadata.json").read_text())
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    assert two["images"] == one["images"] and len(two["images"]) == 9  # 3 prompts x 3 seeds, once each
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for im in one["images"]:  # same seeds and settings: the same images up to float rounding
        a, b = (np.asarray(Image.open(tmp_path / d / im["file"])).astype(int) for d in ("one", "two"))
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, im["file"]


def test_distributed_units_cover_everything_once():
    from latexblend.blend.generate import work_units

    cfg = GenerateConfig(prompts=["a", "b", "c"], num_images=5)
    seen = [(p, j) for rank in range(4) for p, js in work_units(cfg, rank, 4).items() for j in js]
    assert sorted(seen) == [(p, j) for p in range(3) for j in range(5)]
    assert work_units(cfg) == {p: list(range(5)) for p in range(3)}


def test_a_single_string_is_a_one_element_list_in_settings_files():
    """YAML ``prompts: "a dog"`` used to be read one character at a time ('a', ' ', 'd', ...)."""
    from latexblend.settings import merge

    cfg = merge(GenerateConfig, {"prompts": "a dog on the grass", "concepts": "corgi", "cfg": "7", "steps": 3.0})
    assert cfg.prompts == ["a dog on the grass"] and cfg.concepts == ["corgi"]
    assert (cfg.cfg, cfg.steps) == (7.0, 3) and isinstance(cfg.steps, int)


def test_heatmap_file_names_are_checked(tmp_path):
    """A concept name becomes part of a heatmap's file name: one with a separator is refused, nothing written."""
    import numpy as np
    from PIL import Image

    from latexblend.blend import samples

    pil = Image.new("RGB", (8, 8))
    record = {"file": "p000_s0000000.png"}
    files = samples.save_heatmaps(tmp_path, record, pil, {"corgi": np.ones((2, 2))})
    assert files == {"corgi": "p000_s0000000_map_corgi.png"} and (tmp_path / files["corgi"]).is_file()
    with pytest.raises(LatexBlendError, match="'../../escaped' is not allowed"):
        samples.save_heatmaps(tmp_path / "sub", record, pil, {"../../escaped": np.ones((2, 2))})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["p000_s0000000_map_corgi.png"]


@pytest.mark.parametrize("field, value", [("cfg", float("nan")), ("cfg", float("inf")), ("blend_start", float("nan"))])
def test_python_api_refuses_non_finite_settings_too(tmp_path, field, value):
    """Configs built in Python skip settings.merge: they validate themselves when built (no NaN in metadata.json)."""
    from latexblend.blend.options import BlendOptions

    with pytest.raises(LatexBlendError, match=f"{field} must be in .*, got {value}"):
        given = {"blend": BlendOptions(start=value)} if field == "blend_start" else {field: value}
        generate(GenerateConfig(prompts=["a dog"], steps=2, out=str(tmp_path / "o"), **given))
    assert not (tmp_path / "o").exists()
