"""Stage 1 (dual-flow training) and Stage 2 (extraction): mechanics, exactness, resume, CLI, bad input."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import launch_two
from latexblend.attention import project_kv
from latexblend.bank.format import load_bank, verify_bank
from latexblend.cli import app
from latexblend.config import train_settings
from latexblend.errors import LatexBlendError
from latexblend.fileio import list_images, open_image
from latexblend.models import attn2_modules
from latexblend.settings import merge
from latexblend.train.data import TEMPLATES, augment, load_prior
from latexblend.train.loop import train
from latexblend.train.options import TrainConfig
from latexblend.train.setup import build_setup, check_inputs
from latexblend.train.step import batch_latents, encode_batch, make_batch, step_generator, unet_loss

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def draw_concept(path: Path, i: int, size=(80, 72)) -> Path:
    img = Image.new("RGB", size, (40 + 20 * i, 170, 90))
    d = ImageDraw.Draw(img)
    d.ellipse((8 + i, 6, 52, 60), fill=(220, 40, 40))
    d.rectangle((30, 30 + i, 70, 50), fill=(30, 30, 200))
    img.save(path)
    return path


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    for i in range(3):
        draw_concept(folder / f"{i}.png", i)
    return folder


@pytest.fixture(scope="session")
def prior_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    for i in range(2):
        Image.new("RGB", (64, 64), (90, 60 * i, 30)).save(folder / f"{i:05d}.png")
    (folder / "captions.txt").write_text("a dog\na dog on grass\n")
    return folder


def config(tiny_dir, concept_dir, prior_dir=None, **kw):
    base = dict(name="c", images=str(concept_dir), class_noun="dog", model=str(tiny_dir), steps=2, checkpoint_every=0,
                use_prior=prior_dir is not None, prior=str(prior_dir) if prior_dir else None)
    return merge(TrainConfig, {**base, **kw})


def setup_for(cfg):
    images, prior = check_inputs(cfg)
    return build_setup(cfg, images, prior, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def setup(tiny_dir, concept_dir, prior_dir):
    return setup_for(config(tiny_dir, concept_dir, prior_dir))


# --------------------------------------------------------------------------- data


def test_augmentation_is_seeded_and_masks_the_pasted_object(concept_dir):
    img = open_image(concept_dir / "0.png")
    a = augment(img, 64, 8, torch.Generator().manual_seed(3))
    b = augment(img, 64, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.mask, b.mask) and a.time_ids == b.time_ids
    pasted = cropped = 0
    for seed in range(40):
        s = augment(img, 64, 8, torch.Generator().manual_seed(seed))
        assert s.pixels.shape == (3, 64, 64) and s.mask.shape == (1, 8, 8)
        assert s.time_ids[:2] == (72, 80) and s.time_ids[4:] == (64, 64)
        if s.mask.sum() < 64:  # paste branch: the canvas is exactly 0 (mid-grey), image pixels never are
            pasted += 1
            assert s.mask.sum() >= 1
            blocks = s.pixels.abs().sum(0).reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(8, 8, 64)
            inside = (blocks > 0).all(-1)
            assert bool(inside[s.mask[0] > 0].all())
            assert float((s.pixels.abs().sum(0) == 0).float().mean()) > 0  # some canvas shows
        else:
            cropped += 1
            assert float((s.pixels.abs().sum(0) == 0).float().mean()) == 0
    assert pasted > 15 and cropped > 5  # roughly 2/3 vs 1/3 of 40
    never = [augment(img, 64, 8, torch.Generator().manual_seed(seed), shrink=0.0) for seed in range(20)]
    assert all(float(s.mask.sum()) == 64 for s in never)  # shrink 0 (the toy recipe): always enlarge-and-crop


def test_augmentation_without_enlarging_keeps_the_whole_image(concept_dir):
    """``augment_enlarge`` False (the toy recipe): the image at full size, only flipped, loss everywhere."""
    from latexblend.train.data import _square, _to_tensor

    img = open_image(concept_dir / "0.png")
    whole = _to_tensor(_square(img, 64))
    flips = 0
    for seed in range(12):
        s = augment(img, 64, 8, torch.Generator().manual_seed(seed), shrink=0.0, enlarge=False)
        flipped = torch.equal(s.pixels, whole.flip(-1))
        assert flipped or torch.equal(s.pixels, whole)
        flips += flipped
        assert float(s.mask.sum()) == 64 and s.time_ids == (72, 80, 0, 0, 64, 64)
    assert 0 < flips < 12


def test_images_are_exif_rotated_rgb(tmp_path):
    img = Image.new("L", (40, 20), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    out = open_image(tmp_path / "r.jpg")
    assert out.mode == "RGB" and out.size == (20, 40)


@pytest.mark.parametrize("file, dtype, value, expected", [
    ("a.png", "uint16", 32768, 128), ("a.png", "uint16", 65535, 255), ("a.tif", "int32", 51400, 200),
    ("a.tif", "int32", 100, 100)])
def test_deep_greyscale_images_are_scaled_not_clipped_to_white(tmp_path, file, dtype, value, expected):
    """A 16-bit PNG used to train as an all-white image (PIL's convert clips 16-bit values to 255)."""
    import numpy as np

    path = tmp_path / file
    Image.fromarray(np.full((8, 8), value, dtype=dtype)).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (8, 8, 3) and (rgb == expected).all()


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(LatexBlendError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatexBlendError, match="holds no images"):
        list_images(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    draw_concept(bad / "a.png", 0)
    (bad / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(LatexBlendError, match="b.png is not a readable image"):
        list_images(bad)
    (bad / "b.png").unlink()
    (bad / "notes.md").write_text("hi")
    with pytest.raises(LatexBlendError, match="notes.md is not an image"):
        list_images(bad)


def test_prior_folder_and_release_layout(tmp_path, prior_dir):
    pairs = load_prior(prior_dir, "dog")
    assert [c for _, c in pairs] == ["a dog", "a dog on grass"]
    release = tmp_path / "release"
    (release / "imgs").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(release / "imgs" / f"x{i}.jpg")
    (release / "images.txt").write_text("\n".join(f"imgs/x{i}.jpg" for i in range(3)))
    (release / "caption.txt").write_text("dog one\ndog two\ndog three\n")
    pairs = load_prior(release, "dog")
    assert [p.name for p, _ in pairs] == ["x0.jpg", "x1.jpg", "x2.jpg"] and pairs[2][1] == "dog three"
    (release / "caption.txt").write_text("only one\n")
    with pytest.raises(LatexBlendError, match="1 captions for 3 prior images"):
        load_prior(release, "dog")
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (32, 32)).save(plain / "0.png")
    assert load_prior(plain, "cat") == [(plain / "0.png", "cat")]


# --------------------------------------------------------------------------- the training step


def _step(setup, step=0):
    batch = make_batch(setup, step_generator(setup.cfg.seed, step))
    context, pooled = encode_batch(setup, batch)
    return batch, context.detach(), pooled.detach()


def test_batch_layout_and_independent_templates(setup):
    seen = set()
    for step in range(12):
        batch = make_batch(setup, step_generator(42, step))
        assert batch_latents(setup, batch).shape == (2, 4, 8, 8) and batch.masks.shape == (1, 1, 8, 8)
        assert batch.prompts[1] in ("a dog", "a dog on grass")  # [instance, prior]
        inst = next(t for t in setup.templates if t.instance == batch.prompts[0])
        seen.add(setup.templates.index(inst) == setup.templates.index(batch.replace[0]))
    assert seen == {True, False}  # the two flows draw their templates independently
    a, b = make_batch(setup, step_generator(42, 5)), make_batch(setup, step_generator(42, 5))
    assert torch.equal(batch_latents(setup, a), batch_latents(setup, b)) and torch.equal(a.noise, b.noise)
    assert a.prompts == b.prompts
    assert len(setup.templates) == len(TEMPLATES)


def test_time_ids_carry_the_crop_unless_fixed(setup, tiny_dir, concept_dir, prior_dir):
    crops = [make_batch(setup, step_generator(42, s)).time_ids[0] for s in range(12)]
    assert any(ids[2:4].abs().sum() > 0 for ids in crops)  # enlarge-and-crop steps pass their offset
    fixed = setup_for(config(tiny_dir, concept_dir, prior_dir, crop_time_ids=False))
    for s in range(12):
        assert make_batch(fixed, step_generator(42, s)).time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_instance_kv_is_base_flow_with_concept_rows_at_the_span(setup):
    batch, context, pooled = _step(setup, 1)
    setup.splice.record = {}
    try:
        with torch.no_grad():
            unet_loss(setup, batch, context, pooled)
        record = setup.splice.record
    finally:
        setup.splice.record = None
    template = batch.replace[0]
    cs = next(t.concept_span for t in setup.templates if t.instance == batch.prompts[0])
    rs = template.replace_span
    assert rs.length == cs.length == 2
    for layer, attn in attn2_modules(setup.pipe.unet).items():
        k, v = record[layer]
        with torch.no_grad():
            ck, cv = project_kv(attn, context)
        for got, base, concept in ((k, template.base_kv[layer][0], ck), (v, template.base_kv[layer][1], cv)):
            outside = [i for i in range(77) if i not in rs.positions]
            assert torch.equal(got[0, outside], base[outside])
            assert torch.equal(got[0, rs.start : rs.stop], concept[0, cs.start : cs.stop])
            assert not torch.allclose(got[0, rs.start : rs.stop], base[rs.start : rs.stop])
            assert torch.equal(got[1], concept[1])  # prior sample: the concept flow on its own prompt
    assert torch.equal(pooled[0], template.pooled)  # pooled embedding from the replace prompt


def test_loss_sees_the_concept_flow_only_at_the_span_and_bos_gets_no_gradient(setup):
    batch, context, pooled = _step(setup, 2)
    cs = next(t.concept_span for t in setup.templates if t.instance == batch.prompts[0])
    inst0, _ = unet_loss(setup, batch, context, pooled)
    noise = torch.randn(context.shape[1:], generator=torch.Generator().manual_seed(0))
    outside = context.clone()
    keep = torch.ones(77, 1, dtype=torch.bool)
    keep[cs.start : cs.stop] = False
    outside[0] += noise * keep
    inst1, _ = unet_loss(setup, batch, outside, pooled)
    assert torch.equal(inst0, inst1)
    inside = context.clone()
    inside[0, cs.start] += noise[cs.start]
    inst2, _ = unet_loss(setup, batch, inside, pooled)
    assert abs(float(inst2 - inst0)) > 1e-7
    ctx = context.clone().requires_grad_(True)
    inst, prior = unet_loss(setup, batch, ctx, pooled)
    (inst + prior).backward()
    grad = ctx.grad.abs().sum(-1)  # [2, 77]
    assert float(grad[:, 0].max()) == 0.0  # BOS row detached in both samples
    assert float(grad[1, 1:].min()) > 0  # the prior sample trains on its whole prompt
    nz = set(torch.nonzero(grad[0]).flatten().tolist())
    assert nz == set(cs.positions)  # the instance sample trains only through the span rows


def test_no_base_flow_and_fixed_template(tiny_dir, concept_dir):
    s = setup_for(config(tiny_dir, concept_dir, base_flow=False, fixed_template=True))
    assert [t.instance for t in s.templates] == ["photo of <new1> dog"]
    batch, context, pooled = _step(s)
    assert batch.prompts == ["photo of <new1> dog"] and batch.size == 1
    s.splice.record = {}
    with torch.no_grad():
        unet_loss(s, batch, context, pooled)
    for layer, attn in attn2_modules(s.pipe.unet).items():
        with torch.no_grad():
            k, _ = project_kv(attn, context)
        assert torch.equal(s.splice.record[layer][0], k)  # plain Custom-Diffusion K/V


def test_one_step_changes_only_kv_and_the_identifier_rows(tiny_dir, concept_dir, prior_dir):
    s = setup_for(config(tiny_dir, concept_dir, prior_dir))
    unet = s.pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    encs = [s.pipe.text_encoder, s.pipe.text_encoder_2]
    all_ids = torch.arange(len(s.pipe.tokenizer)).unsqueeze(0)
    emb_before = [e.get_input_embeddings()(all_ids)[0].detach().clone() for e in encs]
    raw_before = [e.get_input_embeddings().weight.detach().clone() for e in encs]
    opt = torch.optim.AdamW(s.flow.trainable(), lr=1e-3, weight_decay=0.5)
    from latexblend.train.step import step_loss

    loss, _, _ = step_loss(s, 0)
    loss.backward()
    opt.step()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    expected = {f"{layer}.{proj}.weight" for layer in attn2_modules(unet) for proj in ("to_k", "to_v")}
    assert changed == expected
    token_id = s.flow.token_id
    for enc, eb, rb in zip(encs, emb_before, raw_before, strict=True):
        after = enc.get_input_embeddings()(all_ids)[0]
        rows = torch.nonzero((after != eb).any(-1)).flatten().tolist()
        assert rows == [token_id]
        assert torch.equal(enc.get_input_embeddings().weight, rb)  # the frozen matrix is untouched


@pytest.mark.parametrize("rank", [0, 2])
def test_no_weight_gradients_anywhere_in_the_frozen_model(tiny_dir, concept_dir, prior_dir, rank):
    from latexblend.train.step import step_loss

    s = setup_for(config(tiny_dir, concept_dir, prior_dir, kv_rank=rank))
    step_loss(s, 0)[0].backward()
    trainable = {id(p) for p in s.flow.trainable()}
    # one flat K/V weight or LoRA pairs per projection, and the rows
    assert len(trainable) == (2 * len(attn2_modules(s.pipe.unet)) * 2 if rank else 1) + 2
    assert all(p.grad is not None and p.requires_grad for p in s.flow.trainable())
    frozen = 0
    for model in (s.pipe.unet, s.pipe.text_encoder, s.pipe.text_encoder_2, s.pipe.vae):
        for name, p in model.named_parameters():
            if id(p) not in trainable:
                assert not p.requires_grad and p.grad is None, name
                frozen += 1
    assert frozen > 100


def _train_steps(s, steps):
    """Losses of ``steps`` optimizer steps and the number of forward calls of the VAE encoder and each text
    encoder during them."""
    from latexblend.train.step import step_loss

    calls = {"vae": 0, "te1": 0, "te2": 0}
    modules = {"vae": s.pipe.vae.encoder, "te1": s.pipe.text_encoder, "te2": s.pipe.text_encoder_2}
    handles = [m.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
               for key, m in modules.items()]
    opt = torch.optim.AdamW(s.flow.trainable(), lr=1e-2)
    losses = []
    try:
        for step in range(steps):
            loss = step_loss(s, step)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    finally:
        for h in handles:
            h.remove()
    return losses, calls


def test_prior_cache_is_exact_and_skips_the_vae_and_text_encoders(tiny_dir, concept_dir, prior_dir):
    steps = 6
    cached, uncached = (setup_for(config(tiny_dir, concept_dir, prior_dir, cache_prior=on)) for on in (True, False))
    losses_c, calls_c = _train_steps(cached, steps)
    losses_u, calls_u = _train_steps(uncached, steps)
    assert all(torch.equal(a, b) for a, b in zip(losses_c, losses_u, strict=True))  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(cached.flow.trainable(), uncached.flow.trainable(), strict=True))
    assert not torch.equal(cached.flow.rows[0], setup_for(config(tiny_dir, concept_dir)).flow.rows[0])  # rows trained
    latents = [k for k in cached.prior_cache.store if k[0] == "latent"]
    captions = [k for k in cached.prior_cache.store if k[0] == "text"]
    assert calls_u == {"vae": 2 * steps, "te1": 2 * steps, "te2": 2 * steps}  # instance + prior, every step
    assert calls_c == {"vae": steps + len(latents), "te1": steps + len(captions), "te2": steps + len(captions)}
    assert len(latents) < steps and len(captions) < steps and not uncached.prior_cache.store


def test_compiled_unet_gives_the_same_losses_with_few_graphs_for_all_layers_and_templates(tiny_dir, concept_dir,
                                                                                        prior_dir):
    """Regional compilation: the repeated transformer blocks share compiled graphs (gradient at the input or
    not, then dynamic sizes), never one per layer nor per template pair."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from latexblend.train.setup import compile_unet

    steps = 4
    plain, compiled = (setup_for(config(tiny_dir, concept_dir, prior_dir)) for _ in range(2))
    compile_unet(compiled.pipe.unet, "eager")  # graph capture without code generation
    pairs = {(b.prompts[0], b.replace[0].instance) for b in (make_batch(plain, step_generator(42, s))
                                                             for s in range(steps))}
    assert len(pairs) > 1  # the steps use different template pairs (span positions)
    graphs = counters["stats"]["unique_graphs"]
    try:
        losses_c, _ = _train_steps(compiled, 1)
        first = counters["stats"]["unique_graphs"] - graphs
        _train_steps(compiled, steps)
        assert 1 <= first <= 3 and counters["stats"]["unique_graphs"] - graphs == first  # no layer, no pair adds one
    finally:
        torch._dynamo.reset()
    losses_p, _ = _train_steps(plain, steps)
    torch.testing.assert_close(torch.stack(losses_c), torch.stack(losses_p[:1]), rtol=1e-5, atol=1e-6)


def test_prior_captions_must_not_hold_the_identifier(tmp_path, tiny_dir, concept_dir):
    Image.new("RGB", (32, 32)).save(tmp_path / "0.png")
    (tmp_path / "captions.txt").write_text("a photo of <new1> dog\n")
    with pytest.raises(LatexBlendError, match="holds the identifier <new1>"):
        check_inputs(config(tiny_dir, concept_dir, tmp_path))


# --------------------------------------------------------------------------- runs, resume, extraction


def _tensors(folder):
    return {**load_file(str(folder / "kv.safetensors")), **load_file(str(folder / "tokens.safetensors"))}


def test_bank_equals_kv_of_trained_weights_and_resume_is_exact(tmp_path, tiny_dir, concept_dir, prior_dir, tiny_pipe,
                                                              capsys):
    common = dict(steps=4, checkpoint_every=2)
    a = config(tiny_dir, concept_dir, prior_dir, runs_dir=str(tmp_path / "ra"), bank_dir=str(tmp_path / "ba"), **common)
    run_a = train(a, progress=False)
    b = config(tiny_dir, concept_dir, prior_dir, runs_dir=str(tmp_path / "rb"), bank_dir=str(tmp_path / "bb"), **common)

    def stop(step, losses, setup):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, progress=False, on_step=stop)
    run_b = tmp_path / "rb" / "c"
    assert (run_b / "checkpoints" / "step_2" / "optimizer.pt").is_file()
    assert not (run_b / "kv.safetensors").exists() and not (tmp_path / "bb" / "c.safetensors").exists()
    b.resume = "latest"
    capsys.readouterr()
    train(b, progress=False)
    assert f"resuming from step 2 ({run_b / 'checkpoints' / 'step_2'})" in capsys.readouterr().out
    ta, tb = _tensors(run_a), _tensors(run_b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["text_encoder"], _tensors(run_a / "checkpoints" / "step_2")["text_encoder"])
    info = json.loads((run_b / "run.json").read_text())
    assert info["start_step"] == 2 and info["steps"] == 4 and info["lr"] == pytest.approx(2e-5)
    assert {"python", "torch", "diffusers", "transformers"} <= set(info["versions"])

    # the bank equals K/V computed from the trained weights with the stock pipeline's encode_prompt
    bank = load_bank(tmp_path / "ba" / "c.safetensors")
    verify_bank(bank, tiny_pipe.unet, tiny_pipe.tokenizer)  # fingerprint of the *pretrained* model
    assert bank.training["images"] == str(concept_dir.resolve()) and bank.training["steps"] == 4
    assert bank.training["base_flow"] is True and bank.training["resolution"] == 64
    from latexblend.models import load_pipeline
    from latexblend.tokens import add_identifier_token

    pipe = load_pipeline(str(tiny_dir), device="cpu", dtype="fp32")
    encs = [pipe.text_encoder, pipe.text_encoder_2]
    new_id = add_identifier_token([pipe.tokenizer, pipe.tokenizer_2], encs)
    with torch.no_grad():
        for name, enc in zip(("text_encoder", "text_encoder_2"), encs, strict=True):
            enc.get_input_embeddings().weight[new_id] = ta[name]
        ctx = pipe.encode_prompt("photo of <new1> dog", device="cpu", do_classifier_free_guidance=False)[0][0]
    ids = pipe.tokenizer("photo of <new1> dog").input_ids
    start = ids.index(new_id)
    assert ids[start + 1] == 1929
    for layer in bank.layers:
        wk, wv = ta[f"{layer}.to_k.weight"], ta[f"{layer}.to_v.weight"]
        torch.testing.assert_close(bank.k[layer], ctx[start : start + 2] @ wk.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.v[layer], ctx[start : start + 2] @ wv.T, rtol=1e-5, atol=1e-6)


def test_a_run_stopped_before_its_first_checkpoint_starts_again_and_identical_runs_give_identical_files(
        tmp_path, tiny_dir, concept_dir, capsys):
    """Issue 12, items 7 and 10: the retry needs no flag (and --resume latest works too), the newest
    --keep-checkpoints are kept, and two identical runs write byte-identical weight and bank files."""
    def cfg(tag, **kw):
        return config(tiny_dir, concept_dir, steps=4, runs_dir=str(tmp_path / f"r{tag}"),
                      bank_dir=str(tmp_path / f"b{tag}"), **kw)

    run_a = train(cfg("a", checkpoint_every=1, keep_checkpoints=2), progress=False)
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["step_2", "step_3"]

    def crash(step, losses, setup):
        raise KeyboardInterrupt

    for tag, resume in (("b", None), ("c", "latest")):
        with pytest.raises(KeyboardInterrupt):
            train(cfg(tag, checkpoint_every=10), progress=False, on_step=crash)
        assert [p.name for p in (tmp_path / f"r{tag}" / "c").iterdir()] == ["config.yaml"]
        capsys.readouterr()
        run = train(cfg(tag, checkpoint_every=1, keep_checkpoints=0, resume=resume), progress=False)
        assert "holds no checkpoint (an earlier run stopped before its first one)" in capsys.readouterr().out
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    run_b = tmp_path / "rb" / "c"
    for name in ("kv.safetensors", "tokens.safetensors", "checkpoints/step_3/kv.safetensors"):
        assert (run_a / name).read_bytes() == (run_b / name).read_bytes(), name
    assert (tmp_path / "ba" / "c.safetensors").read_bytes() == (tmp_path / "bb" / "c.safetensors").read_bytes()


def test_lora_variant_trains_low_rank_and_reextracts(tmp_path, tiny_dir, concept_dir):
    cfg = config(tiny_dir, concept_dir, kv_rank=2, lr=1e-3, runs_dir=str(tmp_path / "r"),
                 bank_dir=str(tmp_path / "b"))
    run = train(cfg, progress=False)
    kv = load_file(str(run / "kv.safetensors"))
    assert all(k.endswith(("lora_A", "lora_B")) for k in kv)
    assert float(kv[next(k for k in kv if k.endswith("lora_B"))].abs().sum()) > 0
    from latexblend.train.runfolder import extract_run

    bank, _ = extract_run(run, out=tmp_path / "again.safetensors", device="cpu")
    first = load_bank(tmp_path / "b" / "c.safetensors")
    for layer in first.layers:
        torch.testing.assert_close(bank.k[layer], first.k[layer], rtol=1e-5, atol=1e-6)


def test_gradients_are_averaged_in_few_flat_buckets_element_for_element():
    from latexblend.train.step import average_gradients, grad_buckets

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (7, 3), (1,), (6, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)))
    for i, p in enumerate(params):
        p.grad = None if i == 2 else torch.randn(p.shape, generator=g, dtype=p.dtype)
    before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    cap = 20 * 4  # bytes: several float32 buckets (one over the cap alone); the float64 tensor apart
    buckets = grad_buckets(params, cap)
    assert [len(b) for b in buckets] == [2, 1, 1, 2, 1] and sum(buckets, []) == params
    calls = []

    def reduce(flat):  # stands in for the cross-process mean: any elementwise map must come back in place
        calls.append(flat.numel())
        return flat * 3 - 1

    average_gradients(params, reduce, cap)
    assert calls == [sum(p.numel() for p in b) for b in buckets]
    for p, old in zip(params, before, strict=True):
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert torch.equal(p.grad, old * 3 - 1)
    average_gradients(params, lambda flat: flat)  # default cap: every float32 gradient in one bucket
    assert len(grad_buckets(params)) == 2


def test_two_processes_train_identically(tmp_path, tiny_dir, concept_dir, prior_dir):
    """Each process's trainables after every step, read through ``train(on_step=...)`` by a launched script."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    cfg = {"images": str(concept_dir), "class_noun": "dog", "name": "mp", "model": str(tiny_dir),
           "prior": str(prior_dir), "steps": 2, "runs_dir": str(tmp_path / "runs"), "bank_dir": str(tmp_path / "bank")}
    out = launch_two([json.dumps(cfg), tmp_path / "digest"], script=script)
    assert out.returncode == 0, out.stderr[-2000:]
    digests = [json.loads((tmp_path / f"digest.{rank}.json").read_text()) for rank in (0, 1)]
    assert digests[0] == digests[1] and len(digests[0]) == 2
    assert digests[0][0]["sha256"] != digests[0][1]["sha256"]  # the weights moved between the steps
    info = json.loads((tmp_path / "runs" / "mp" / "run.json").read_text())
    assert info["num_processes"] == 2 and info["lr"] == pytest.approx(4e-5)  # 1e-5 x (1 + 1) x 2
    assert (tmp_path / "bank" / "mp.safetensors").is_file()


TWO_PROCESS_SCRIPT = """
import hashlib, json, sys
from latexblend.settings import merge
from latexblend.train.options import TrainConfig
from latexblend.train.loop import train

cfg, out = merge(TrainConfig, json.loads(sys.argv[1])), sys.argv[2]
digests = []

def on_step(step, losses, setup):
    h = hashlib.sha256()
    for p in setup.flow.trainable():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digests.append({"step": step, "sha256": h.hexdigest()})

train(cfg, progress=False, on_step=on_step)
import torch.distributed as dist
with open(f"{out}.{dist.get_rank()}.json", "w") as f:
    json.dump(digests, f)
"""


def test_accumulating_two_micro_batches_is_the_average_of_two_processes_gradients(tiny_dir, concept_dir, prior_dir):
    """Micro-batch ``m`` of process ``r`` draws as process ``r * grad_accum + m``; accumulating ``loss / 2``
    twice is bit for bit the mean of the two processes' gradients (halving is exact)."""
    from latexblend.train.loop import accelerator, make_optimizer
    from latexblend.train.step import step_loss, train_step

    s = setup_for(config(tiny_dir, concept_dir, prior_dir, grad_accum=2, max_grad_norm=0.0))
    params = s.flow.trainable()
    per_rank = []
    for rank in (0, 1):
        step_loss(s, 5, rank)[0].backward()
        per_rank.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    expected = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]
    acc, _ = accelerator("no", "cpu")
    seen = []
    optimizer = make_optimizer(s.cfg, params, lr=0.0)
    optimizer.step = lambda: seen.extend(p.grad.clone() for p in params)  # the gradients the update would use
    losses = train_step(s, optimizer, acc, 5, params)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    assert all(p.grad is None for p in params)  # zeroed for the next step
    separate = torch.stack([step_loss(s, 5, r)[0].detach() for r in (0, 1)]).mean()
    torch.testing.assert_close(losses[0], separate, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- CLI


def test_cli_prior_train_extract(tmp_path, tiny_dir, concept_dir):
    prior = tmp_path / "reg" / "dog"
    args = ["prior", "--class-noun", "dog", "--num", "2", "--steps", "2", "--model", str(tiny_dir), "--out", str(prior)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in prior.iterdir()) == [".latexblend-prior.json", "00000.png", "00001.png",
                                                       "captions.txt"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "nothing to do" in r.output
    first = (prior / "00000.png").read_bytes()
    (prior / "00001.png").unlink()  # a stopped run: the same settings continue it
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "generated 1 prior images" in r.output, r.output
    assert (prior / "00000.png").read_bytes() == first and (prior / "00001.png").is_file()
    runs, banks = tmp_path / "runs", tmp_path / "banks"
    r = runner.invoke(app, ["train", "--images", str(concept_dir), "--class-noun", "dog", "--name", "corgi",
                            "--model", str(tiny_dir), "--prior", str(prior), "--steps", "2", "--runs-dir", str(runs),
                            "--bank-dir", str(banks), "--set", "log_every=1"])
    assert r.exit_code == 0, r.output
    run = runs / "corgi"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "run.json", "kv.safetensors", "tokens.safetensors"}
    bank = load_bank(banks / "corgi.safetensors")
    assert bank.num_tokens == 2 and len(bank.layers) == 11
    r = runner.invoke(app, ["extract", "--run", str(run), "--out", str(tmp_path / "x.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    again = load_bank(tmp_path / "x.safetensors")
    assert all(torch.equal(again.k[n], bank.k[n]) and torch.equal(again.v[n], bank.v[n]) for n in bank.layers)
    r = runner.invoke(app, ["extract", "--run", str(run), "--prompt", "a photo of a <new1> dog", "--out",
                            str(tmp_path / "y.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    other = load_bank(tmp_path / "y.safetensors")
    assert other.extraction_prompt == "a photo of a <new1> dog" and not torch.equal(other.k[bank.layers[0]],
                                                                                  bank.k[bank.layers[0]])
    r = runner.invoke(app, ["extract", "--run", str(run), "--checkpoint", "7"])
    assert r.exit_code == 2 and "checkpoint 7" in r.output
    r = runner.invoke(app, ["train", "--images", str(concept_dir), "--class-noun", "dog", "--name", "corgi",
                            "--model", str(tiny_dir), "--prior", str(prior), "--runs-dir", str(runs)])
    assert r.exit_code == 2 and "--resume latest" in r.output  # an existing run is never clobbered


def test_a_bank_that_fails_to_be_written_keeps_the_weights_and_says_how_to_finish(tmp_path, tiny_dir, concept_dir,
                                                                                  monkeypatch):
    """The weights of a finished training are kept when its bank cannot be written (a full disk), and every
    later command points at `extract --run`, which writes the bank from them."""
    import latexblend.train.loop as loop

    def full_disk(bank, path):
        raise LatexBlendError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(loop, "save_bank", full_disk)
    runs, banks = tmp_path / "runs", tmp_path / "banks"
    args = ["train", "--images", str(concept_dir), "--class-noun", "dog", "--name", "corgi", "--model", str(tiny_dir),
            "--no-prior", "--steps", "1", "--runs-dir", str(runs), "--bank-dir", str(banks)]
    r = runner.invoke(app, args)
    run = runs / "corgi"
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert f"but could not write its bank: cannot write {banks / 'corgi.safetensors'}: No space left on device; " \
           f"fix that, then run `latexblend extract --run {run}`" in r.stderr
    assert (run / "kv.safetensors").is_file() and json.loads((run / "run.json").read_text())["bank"] is None
    monkeypatch.undo()
    for extra in ([], ["--resume", "latest"]):
        r = runner.invoke(app, args + extra)
        assert r.exit_code == 2 and f"`latexblend extract --run {run}`" in r.output, r.output
    r = runner.invoke(app, ["extract", "--run", str(run), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert load_bank(banks / "corgi.safetensors").name == "corgi"


def test_concept_yaml_and_precedence(tmp_path, concept_dir):
    cdir = tmp_path / "concepts"
    cdir.mkdir()
    (cdir / "rex.yaml").write_text(f"images: {concept_dir}\nclass_noun: dog\nsteps: 7\nlr: 2.0e-5\nseed: 3\n")
    cfg = train_settings("rex", cdir, {"steps": 5}, ["seed=9", "fixed_template=true"])
    assert (cfg.name, cfg.class_noun, cfg.steps, cfg.lr, cfg.seed, cfg.fixed_template) == ("rex", "dog", 5, 2e-5, 9,
                                                                                            True)
    with pytest.raises(LatexBlendError, match="unknown concept 'nobody'.*rex"):
        train_settings("nobody", cdir, {})
    with pytest.raises(LatexBlendError, match="unknown training setting key 'stpes'"):
        train_settings("rex", cdir, {}, ["stpes=3"])


def test_config_values_are_converted_to_their_field_types(tmp_path, concept_dir):
    cdir = tmp_path / "concepts"
    cdir.mkdir()
    (cdir / "rex.yaml").write_text(f"images: {concept_dir}\nclass_noun: dog\nsteps: '12'\nlr: 1e-5\n"
                                   "max_grad_norm: 2\nkv_rank: 4.0\n")
    cfg = train_settings("rex", cdir, {}, ["adam_eps=1e-6", "seed=7"])
    assert (cfg.steps, cfg.lr, cfg.max_grad_norm, cfg.kv_rank, cfg.adam_eps, cfg.seed) == (12, 1e-5, 2.0, 4, 1e-6, 7)
    assert [type(v) for v in (cfg.steps, cfg.lr, cfg.max_grad_norm, cfg.kv_rank)] == [int, float, float, int]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, concept_dir):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    draw_concept(root / "corrupt" / "a.png", 0)
    (root / "corrupt" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "text").mkdir()
    draw_concept(root / "text" / "a.png", 0)
    (root / "text" / "list.csv").write_text("x")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--images", "{root}/missing"], "does not exist"),
    (["--images", "{root}/empty"], "holds no images"),
    (["--images", "{root}/corrupt"], "b.jpg is not a readable image"),
    (["--images", "{root}/text"], "list.csv is not an image"),
    (["--concept", "nobody"], "unknown concept 'nobody'"),
    (["--class-noun", " "], "class noun is empty"),
    (["--class-noun", " ".join(["big"] * 80)], "over CLIP's limit"),
    (["--resolution", "60"], "multiple of 8"),
    (["--resolution", "72"], "multiple of 32"),
    (["--resume", "{root}/no-such-checkpoint"], "does not exist"),
    (["--set", "init_token=hello world"], "init token"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_dir, concept_dir, bad_inputs, extra, message):
    base = {"--images": str(concept_dir), "--class-noun": "dog", "--name": "bad"}
    extra = [e.format(root=bad_inputs) for e in extra]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    if "--concept" in base:
        base = {"--concept": base["--concept"], "--concepts-dir": str(tmp_path)}
    args = ["train", *[x for kv in base.items() for x in kv], "--model", str(tiny_dir), "--no-prior", "--steps", "1",
            "--runs-dir", str(tmp_path / "runs"), "--bank-dir", str(tmp_path / "banks")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and message in r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "banks").exists()


def test_a_training_step_reads_no_value_back_except_its_cpu_data_draws(tiny_dir, concept_dir, prior_dir):
    """No ``.item()`` / ``float()`` on the step's tensors (on a GPU each would make the host wait for the
    device): the only scalar reads are the data draws from the step's CPU generator; the fused
    optimizer reads none (the default per-tensor AdamW read one step counter per tensor)."""
    from benchmarks.counters import OpCounter

    from latexblend.train.loop import accelerator, make_optimizer
    from latexblend.train.step import train_step

    s = setup_for(config(tiny_dir, concept_dir, prior_dir))
    params = s.flow.trainable()
    acc, _ = accelerator("no", "cpu")
    optimizer = make_optimizer(s.cfg, params, 1e-5)
    train_step(s, optimizer, acc, 0, params)
    with OpCounter() as ops:
        losses = train_step(s, optimizer, acc, 1, params)
    assert ops.count > 1000 and ops.reads and all(where.startswith("data.py:") for where in ops.reads), ops.reads
    assert losses.shape == (3,) and not losses.requires_grad


def test_settings_added_later_change_the_resume_hash_only_when_set():
    import hashlib
    import json

    from latexblend.settings import to_dict
    from latexblend.train.runfolder import NOT_HASHED, config_hash

    cfg = TrainConfig(name="c", images="i", class_noun="dog")
    added = ("crop_time_ids", "augment_shrink", "augment_enlarge")
    older = {k: v for k, v in to_dict(cfg).items() if k not in NOT_HASHED and k not in added}
    # a run started before these settings existed kept this digest: it must still resume
    assert config_hash(cfg) == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(TrainConfig(name="c", images="i", class_noun="dog", augment_shrink=0.0)) != config_hash(cfg)
    assert config_hash(TrainConfig(name="c", images="i", class_noun="dog", crop_time_ids=False)) != config_hash(cfg)
    assert config_hash(TrainConfig(name="c", images="i", class_noun="dog", augment_enlarge=False)) != config_hash(cfg)


# --------------------------------------------------------------------------- one CUDA graph per step


def _run_steps(s, steps, emulate):
    """Losses of ``steps`` optimizer steps through a :class:`Runner` (``emulate``: the CUDA graph's stand-in)."""
    from latexblend.train.loop import accelerator, make_optimizer
    from latexblend.train.runner import Runner

    params = s.flow.trainable()
    acc, _ = accelerator("no", "cpu")
    optimizer = make_optimizer(s.cfg, params, 1e-3)
    lines = []
    runner = Runner(s, optimizer, acc, params, log=lines.append, emulate=emulate)
    losses = [runner.step(step) for step in range(steps)]
    return runner, optimizer, losses, lines


def test_the_step_replays_as_a_graph_would_and_trains_exactly_as_eager_steps(tiny_dir, concept_dir, prior_dir):
    """What a CUDA graph of the step needs, checked on the CPU with the runner's stand-in for the graph: the
    step's device work reads only its static batch tensors (their host fields are emptied), reads nothing
    back, keeps its shapes and tensors from step to step; capture, check and replays train bit for bit as
    eager steps do."""
    from benchmarks.counters import OpCounter

    steps = 6
    eager, graphed = (setup_for(config(tiny_dir, concept_dir, prior_dir, grad_accum=2)) for _ in range(2))
    ref, _, ref_losses, _ = _run_steps(eager, steps, emulate=False)
    assert ref.path == "eager" and ref.graph is None
    runner, optimizer, losses, lines = _run_steps(graphed, steps, emulate=True)
    assert runner.path == "cuda graph" and runner.check["same"] and runner.check["update_rel_diff"] == 0.0
    assert len(lines) == 1 and lines[0].startswith("cuda graph: captured at step 3")
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(eager.flow.trainable(), graphed.flow.trainable(), strict=True))
    static = [{k: (t.data_ptr(), t.shape, t.dtype) for k, t in b.tensors().items()} for b in runner.static]
    state = {id(t): t.data_ptr() for st in optimizer.state.values() for t in st.values()}
    from latexblend.train.step import micro_batches

    for step in range(steps, steps + 3):
        batches = micro_batches(graphed, runner.acc, step)
        assert [{k: (t.shape, t.dtype) for k, t in b.tensors().items()} for b in batches] == [
            {k: v[1:] for k, v in st.items()} for st in static]  # every step fits the static buffers
        with OpCounter() as ops:
            runner.graph.replay()
        assert not ops.reads, ops.reads  # no value read back: nothing waits for the device
    assert static == [{k: (t.data_ptr(), t.shape, t.dtype) for k, t in b.tensors().items()} for b in runner.static]
    assert state == {id(t): t.data_ptr() for st in optimizer.state.values() for t in st.values()}


@pytest.mark.parametrize("fault, message", [("raise", "capture failed (RuntimeError: boom)"),
                                            ("differ", "its step differed from the eager step"),
                                            ("replay", "a replay failed (RuntimeError: boom)")])
def test_a_graph_that_fails_or_differs_is_dropped_and_the_run_goes_on_eagerly(tiny_dir, concept_dir, prior_dir,
                                                                               monkeypatch, fault, message):
    from latexblend.train import runner as runner_module

    steps = 4
    eager, graphed = (setup_for(config(tiny_dir, concept_dir, prior_dir)) for _ in range(2))
    _, _, ref_losses, lines = _run_steps(eager, steps, emulate=False)
    assert lines == []  # on the CPU, cuda_graph auto: eager without a word
    real = runner_module.update

    def faulty(*args, **kwargs):
        if fault == "raise":
            raise RuntimeError("boom\nsecond line")
        return real(*args, **kwargs) * 1.5

    if fault == "replay":  # the check's replay passes, the next one fails
        replays = []
        real_replay = runner_module.Emulated.replay

        def replay(self):
            replays.append(1)
            if len(replays) == 2:
                raise RuntimeError("boom")
            return real_replay(self)

        monkeypatch.setattr(runner_module.Emulated, "replay", replay)
    else:
        monkeypatch.setattr(runner_module, "update", faulty)
    runner, _, losses, lines = _run_steps(graphed, steps, emulate=True)
    assert runner.path == "eager" and runner.graph is None and runner.note.startswith("cuda graph dropped")
    assert len(lines) == (2 if fault == "replay" else 1)  # a graph that failed later was captured first
    assert message in lines[-1] and lines[-1].endswith("training runs eagerly")
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(eager.flow.trainable(), graphed.flow.trainable(), strict=True))


def test_a_checkpoint_with_one_optimizer_entry_per_kv_weight_resumes_into_the_flat_weight(setup):
    """Checkpoints written before the flat K/V weight hold AdamW state per to_k/to_v weight: loading
    concatenates it into the flat weight's state, element for element what the flat optimizer holds."""
    from latexblend.train.loop import flat_optimizer_state

    flow = setup.flow
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(flow.weight.shape, generator=g)
    old_params = [torch.nn.Parameter(w.detach().clone()) for w in flow.weight.detach().split(flow.sizes)]
    old_params += [torch.nn.Parameter(r.detach().clone()) for r in flow.rows]
    new_params = [torch.nn.Parameter(flow.weight.detach().clone())] + old_params[len(flow.sizes):]
    for p, gr in zip(old_params, [*grad.split(flow.sizes), *(torch.ones_like(r) for r in flow.rows)], strict=True):
        p.grad = gr.clone()
    new_params[0].grad = grad.clone()
    old, new = torch.optim.AdamW(old_params, lr=1e-3), torch.optim.AdamW(new_params, lr=1e-3)
    old.step()
    new.step()
    converted = flat_optimizer_state(old.state_dict(), flow)
    expected = new.state_dict()
    assert converted["param_groups"] == expected["param_groups"]
    for i, st in expected["state"].items():
        assert all(torch.equal(converted["state"][i][k], v) for k, v in st.items())
    assert flat_optimizer_state(expected, flow) is expected  # today's checkpoints load as they are


def test_cuda_graph_setting_takes_auto_on_off_and_yaml_booleans():
    base = dict(name="c", images="i", class_noun="dog")
    assert [TrainConfig(**base, cuda_graph=v).cuda_graph for v in ("auto", "on", "off", True, False)] == [
        "auto", "on", "off", "on", "off"]
    with pytest.raises(LatexBlendError, match="cuda_graph must be one of auto, on, off, got 'always'"):
        TrainConfig(**base, cuda_graph="always")
