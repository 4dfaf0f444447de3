import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import latexblend.blend.steering as steering_mod
from conftest import random_bank
from latexblend.bank.format import save_bank
from latexblend.bank.release import release_config
from latexblend.blend.blender import apply
from latexblend.blend.guidance import distance, g1, g2, guidance_loss, layer_hw, select_layers, spatial_log_probs
from latexblend.cli import app
from latexblend.errors import LatexBlendError
from latexblend.models import attn2_shapes
from latexblend.tokens import Span, token_ids

runner = CliRunner()
NOUNS = ["dog", "cat", "car", "tree", "house", "cup"]


def bank(pipe, i):
    noun = NOUNS[i]
    return random_bank(pipe.unet, name=f"c{i}", noun=noun, noun_ids=tuple(token_ids(pipe.tokenizer, noun)), seed=i)


def run(pipe, prompt, steps=2, seed=0, **kw):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, generator=g, output_type="np", **kw).images


def halves(side=16):
    top = torch.zeros(side, side)
    top[: side // 2] = 1
    return top, 1 - top


def disjoint_by_hand(m, n, tau):
    """Sym-KL of softmax(a/tau), softmax(b/tau) for 0/1 maps with m ones each on disjoint pixels of n:
    both normalisers are Z = m e^(1/tau) + n - m; only the 2m differing pixels contribute
    (e^(1/tau) - 1)/Z * (1/tau) each."""
    e = math.exp(1 / tau)
    return 2 * m * (e - 1) / (tau * (m * e + n - m))


# ---------------------------------------------------------------- distances and losses on synthetic maps


@pytest.mark.parametrize("tau", [0.01, 1.0])
def test_distance_identical_is_zero_disjoint_is_the_hand_value(tau):
    a, b = halves(16)  # 16x16 -> 4x4 pooled (kernel 4), 8 of 16 pooled pixels each, constant on blocks
    assert distance(a, a, tau).item() == pytest.approx(0, abs=1e-9)
    assert distance(a, b, tau).item() == pytest.approx(disjoint_by_hand(8, 16, tau), rel=1e-5)
    assert distance(a, b, tau).item() == pytest.approx(distance(b, a, tau).item(), rel=1e-6)  # symmetric


def test_pooling_is_4x4_average():
    a = torch.zeros(16, 16)
    a[0, 0] = 16.0  # one pixel: pooled, its 4x4 block averages to 1
    lp = spatial_log_probs(a, tau=1.0)
    assert lp.shape == (16,)
    expected = torch.log_softmax(torch.tensor([1.0] + [0.0] * 15), 0)
    assert torch.allclose(lp, expected, atol=1e-6)


def _maps(*pairs):
    """[K=8, 16, 16] token maps: token i gets the top half (0) or bottom half (1) or a blend."""
    top, bottom = halves(16)
    maps = torch.full((8, 16, 16), 0.5)
    for token, which in pairs:
        maps[token] = top if which == 0 else bottom
    return maps


def test_g1_sums_over_every_concept():
    d = disjoint_by_hand(8, 16, 0.01)
    spans = [Span("x", 1, 2), Span("y", 3, 2), Span("z", 5, 2)]
    agree = _maps((1, 0), (2, 0), (3, 1), (4, 1), (5, 0), (6, 0))
    assert g1(spatial_log_probs(agree), spans).item() == pytest.approx(0, abs=1e-6)
    first_only = _maps((1, 1), (2, 0), (3, 1), (4, 1), (5, 0), (6, 0))  # slot of the FIRST concept elsewhere
    assert g1(spatial_log_probs(first_only), spans).item() == pytest.approx(d, rel=1e-5)
    all_three = _maps((1, 1), (2, 0), (3, 0), (4, 1), (5, 1), (6, 0))
    assert g1(spatial_log_probs(all_three), spans).item() == pytest.approx(3 * d, rel=1e-5)
    multi_noun = [Span("w", 1, 3)]  # slot + two noun tokens: both distances count
    assert g1(spatial_log_probs(_maps((1, 1), (2, 0), (3, 0))), multi_noun).item() == pytest.approx(2 * d, rel=1e-5)


def test_g2_is_minus_the_sum_over_unordered_pairs():
    d = disjoint_by_hand(8, 16, 0.01)
    spans = [Span("x", 1, 2), Span("y", 3, 2), Span("z", 5, 2)]
    same = _maps((2, 0), (4, 0), (6, 0))
    assert g2(spatial_log_probs(same), spans).item() == pytest.approx(0, abs=1e-6)
    # nouns at top, bottom, top: pairs (x,y) and (y,z) disjoint, (x,z) identical
    mixed = _maps((2, 0), (4, 1), (6, 0))
    assert g2(spatial_log_probs(mixed), spans).item() == pytest.approx(-2 * d, rel=1e-5)
    bound = _maps((1, 0), (2, 0), (3, 1), (4, 1), (5, 0), (6, 0))  # slots agree with nouns: g1 = 0
    same_bound = _maps(*[(t, 0) for t in range(1, 7)])
    loss = guidance_loss(torch.stack([bound, same_bound]), [spans, spans])
    assert loss.shape == (2,) and loss[0].item() == pytest.approx(-2 * d, rel=1e-5) and abs(loss[1].item()) < 1e-6


def test_layer_grid_for_square_non_square_and_odd_latents():
    assert layer_hw(16, (8, 8)) == (4, 4) and layer_hw(4, (8, 8)) == (2, 2)
    assert layer_hw(24, (8, 12)) == (4, 6) and layer_hw(6, (8, 12)) == (2, 3)
    assert layer_hw(20, (8, 9)) == (4, 5) and layer_hw(4096, (128, 128)) == (64, 64)


def test_layer_sets(tiny_pipe):
    shapes = attn2_shapes(tiny_pipe.unet)
    assert select_layers(shapes, "all") == list(shapes) and len(shapes) == 11
    assert all(n.startswith("down_blocks.") for n in select_layers(shapes, "down"))
    wide = select_layers(shapes, "64")
    assert wide == [n for n, c in shapes.items() if c == 64] and len(wide) == 8
    assert select_layers(shapes, "mid,up_blocks.0") == [n for n in shapes if n.startswith(("mid_block", "up_blocks.0"))]
    with pytest.raises(LatexBlendError, match="matches no attn2 layer"):
        select_layers(shapes, "up_blocks.7")


# ---------------------------------------------------------------- guidance on the tiny model


@pytest.fixture()
def recorded_passes(monkeypatch):
    """Every guidance pass, with the loss re-measured at the updated latent, same step and conditioning, and
    the activations it kept for backward (benchmarks.counters.SavedBytes)."""
    from benchmarks.counters import SavedBytes

    passes = []
    original = steering_mod.guidance_pass

    def spy(unet, z, scale, call, state, layers, row_spans, latent_hw, checkpointing=False):
        with SavedBytes(unet) as saved:
            grad, loss = original(unet, z, scale, call, state, layers, row_spans, latent_hw, checkpointing)
        step = spy.step_size
        _, again = original(unet, z - step * grad, scale, call, state, layers, row_spans, latent_hw, checkpointing)
        passes.append({"loss": loss, "again": again, "grad": grad, "nbytes": saved.nbytes, "layers": list(layers),
                       "requires_grad": [p.requires_grad for p in unet.parameters()]})
        return grad, loss

    spy.step_size = 1.0
    monkeypatch.setattr(steering_mod, "guidance_pass", spy)
    return passes


def test_one_update_lowers_the_loss_and_weights_get_no_gradient(tiny_pipe, recorded_passes):
    before = [p.requires_grad for p in tiny_pipe.unet.parameters()]
    with apply(tiny_pipe, [bank(tiny_pipe, 0), bank(tiny_pipe, 1)], bind=False, guidance={"window": 0.0}):
        run(tiny_pipe, "a dog and a cat", steps=3)
    assert len(recorded_passes) == 3  # every step is inside window 0.0
    for p in recorded_passes:
        assert p["grad"].abs().max() > 0
        assert (p["again"] < p["loss"]).all(), (p["loss"], p["again"])
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert [p.requires_grad for p in tiny_pipe.unet.parameters()] == before


def test_window_follows_t_over_T_and_layer_set_is_used(tiny_pipe, recorded_passes):
    options = {"window": 0.6, "layers": "up", "history": True}
    with apply(tiny_pipe, [bank(tiny_pipe, 0), bank(tiny_pipe, 1)], guidance=options) as b:
        run(tiny_pipe, "a dog and a cat", steps=4)  # t/T = 0.751, 0.501, 0.251, 0.001
        assert [round(h["t_frac"], 3) for h in b.steering.history] == [0.751]
    assert recorded_passes[0]["layers"] == [n for n in attn2_shapes(tiny_pipe.unet) if n.startswith("up_blocks")]


def test_update_reaches_unet_input_and_scheduler_step_alike(tiny_pipe):
    seen = {}
    with apply(tiny_pipe, [bank(tiny_pipe, 0), bank(tiny_pipe, 1)], guidance={"window": 0.0, "history": True}) as b:
        def main_call(module, args):  # the guidance pass (conditional only, batch 1) also calls the UNet
            if args[0].shape[0] == 2:
                seen.setdefault("unet", args[0].clone())

        hook = tiny_pipe.unet.register_forward_pre_hook(main_call)
        original = b._step

        def step(out, t, sample, *a, **k):
            seen.setdefault("step", sample.clone())
            return original(out, t, sample, *a, **k)

        b._step = step
        try:
            run(tiny_pipe, "a dog and a cat", steps=2)
        finally:
            hook.remove()
        delta = b.steering.history[0]["delta"]
    sigma = float(tiny_pipe.scheduler.sigmas[0])
    assert delta.abs().max() > 0
    expected_input = seen["step"] / math.sqrt(sigma**2 + 1)  # scale_model_input of the updated latent
    assert torch.allclose(seen["unet"][1], expected_input[0], atol=1e-5)  # cond half
    assert torch.allclose(seen["unet"][0], expected_input[0], atol=1e-5)  # uncond half: the same latent


def test_batch_updates_are_per_sample(tiny_pipe):
    banks = [bank(tiny_pipe, i) for i in range(6)]

    def first_update(prompts):
        with apply(tiny_pipe, [], optional=banks, bind=False, guidance={"window": 0.0, "history": True}) as b:
            run(tiny_pipe, prompts, steps=1)
            return b.steering.history[0]

    a = first_update(["<c0> near <c1>", "<c2> near <c3>"])
    b = first_update(["<c0> near <c1>", "<c4> near <c5>"])
    assert torch.allclose(a["delta"][0], b["delta"][0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(a["loss"][0], b["loss"][0], rtol=1e-5)
    assert not torch.allclose(a["delta"][1], b["delta"][1], rtol=1e-2)  # sample 1's own update did change


def test_gradient_checkpointing_same_update_less_saved_memory(tiny_pipe, recorded_passes):
    results = []
    for ckpt in (False, True):
        with apply(tiny_pipe, [bank(tiny_pipe, 0), bank(tiny_pipe, 1)], guidance={"window": 0.0, "history": True,
                                                                                 "checkpointing": ckpt}) as b:
            run(tiny_pipe, "a dog and a cat", steps=1)
            results.append(b.steering.history[0]["delta"])
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-9)
    assert 0 < recorded_passes[1]["nbytes"] < recorded_passes[0]["nbytes"] / 2
    assert not tiny_pipe.unet.is_gradient_checkpointing


def _one_step(pipe, read, **steering):
    """``read(blender)`` after a 1-step generation with two concepts, and the batch sizes conv_out saw."""
    calls = []
    hook = pipe.unet.conv_out.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with apply(pipe, [bank(pipe, 0), bank(pipe, 1)], bind=False, **steering) as b:
            run(pipe, "a dog and a cat", steps=1)
            return read(b), calls
    finally:
        hook.remove()


@pytest.mark.parametrize("ckpt", [False, True])
def test_guidance_pass_is_one_whole_unet_call_before_the_step(tiny_pipe, ckpt):
    """The guidance pass (the conditional batch of 1) runs the whole UNet before the step's own CFG batch of 2:
    no exception ends it early. With checkpointing, the update is the same as without."""
    updates = []
    for checkpointing in (False, ckpt):
        options = {"guidance": {"window": 0.0, "layers": "down", "checkpointing": checkpointing, "history": True}}
        delta, calls = _one_step(tiny_pipe, lambda b: b.steering.history[0]["delta"], **options)
        assert calls == [1, 2]
        updates.append(delta)
    assert updates[0].abs().max() > 0 and torch.allclose(updates[0], updates[1], rtol=1e-4, atol=1e-9)


def test_rectify_capture_is_one_whole_unet_call_before_the_step(tiny_pipe):
    masks, calls = _one_step(tiny_pipe, lambda b: b.steering.masks(0), **{"rectify": {"start": 1.0, "clusters": 3}})
    assert calls == [1, 2] and masks.shape[0] == 2 and masks.any()


def test_steering_that_changes_nothing_is_bit_identical_to_plain_blending(tiny_pipe):
    banks = [bank(tiny_pipe, 0), bank(tiny_pipe, 1)]
    with apply(tiny_pipe, banks):
        plain = run(tiny_pipe, "a dog and a cat", steps=3)
    # installed but never active: window 1.0 (t/T >= 1 never) and rectify start 0.0 (t/T < 0 never)
    with apply(tiny_pipe, banks, guidance={"window": 1.0}, rectify={"start": 0.0}) as b:
        idle = run(tiny_pipe, "a dog and a cat", steps=3)
        assert b.steering is not None and not b.steering.history
    with apply(tiny_pipe, banks, guidance={"window": 0.0}):
        guided = run(tiny_pipe, "a dog and a cat", steps=3)
    assert np.array_equal(plain, idle)
    assert not np.array_equal(plain, guided)
    # active at every step, with an update of exactly zero: one concept with bind on (its slot's map is
    # its noun's: g1 = 0; no second concept: no g2). The guidance pass, the UNet input and the wrapped
    # scheduler step all run, and the image is still plain blending's, bit for bit.
    with apply(tiny_pipe, banks[:1]):
        plain_one = run(tiny_pipe, "a dog on the grass", steps=3)
    with apply(tiny_pipe, banks[:1], guidance={"window": 0.0, "history": True}) as b:
        zero = run(tiny_pipe, "a dog on the grass", steps=3)
        assert b.steering.stats["guidance_passes"] == len(b.steering.history) == 3
        assert all(h["delta"].shape == (1, 4, 8, 8) and not h["delta"].any() for h in b.steering.history)
    assert np.array_equal(plain_one, zero)


# ---------------------------------------------------------------- CLI, config, release JSON


@pytest.fixture()
def banks_dir(tiny_pipe, tmp_path):
    for i, name in enumerate(["corgi", "kitty"]):
        b = random_bank(tiny_pipe.unet, name=name, noun=NOUNS[i],
                        noun_ids=tuple(token_ids(tiny_pipe.tokenizer, NOUNS[i])), seed=i)
        save_bank(b, tmp_path / f"{name}.safetensors")
    return tmp_path


def test_cli_guidance_rectify_and_save_maps_end_to_end(banks_dir, tmp_path, tiny_dir):
    out = tmp_path / "o"
    r = runner.invoke(app, ["generate", "-p", "a dog and a cat", "--concepts", "corgi,kitty", "--steps", "3",
                            "--num-images", "2", "--guidance", "--guidance-window", "0.5", "--guidance-layers",
                            "down,mid", "--rectify", "--rectify-start", "0.6", "--rectify-clusters", "3",
                            "--save-maps", "--dir", str(banks_dir), "--out", str(out), "--model", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "metadata.json").read_text())
    s = meta["settings"]
    assert s["guidance"] and s["guidance_window"] == 0.5 and s["guidance_layers"] == "down,mid"
    assert s["rectify"] and s["rectify_start"] == 0.6 and s["rectify_clusters"] == 3 and s["save_maps"]
    for im in meta["images"]:
        assert set(im["maps"]) == {"corgi", "kitty"}
        assert im["maps"]["corgi"] == im["file"].replace(".png", "_map_corgi.png")
        heat = Image.open(out / im["maps"]["kitty"])
        assert heat.size == (64, 64) and heat.mode == "RGB"
    a, b = (np.asarray(Image.open(out / meta["images"][0]["maps"][n])) for n in ("corgi", "kitty"))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("options, message", [
    ({"guidance": {"window": 1.5}}, "guidance_window must be in"),
    ({"guidance": {"step_size": 0}}, "guidance_step_size must be in"),
    ({"guidance": {"layers": "sideways"}}, "unknown guidance layer set 'sideways'"),
    ({"rectify": {"start": -0.5}}, "rectify_start must be in"),
    ({"rectify": {"clusters": 65}}, "rectify_clusters must be in"),  # the settings' upper bound holds here too
    ({"blend_start": 2.0}, "blend_start must be in"),
])
def test_apply_checks_the_same_bounds_as_the_settings(tiny_pipe, options, message):
    with pytest.raises(LatexBlendError, match=message):
        apply(tiny_pipe, [bank(tiny_pipe, 0)], **options)
    assert getattr(tiny_pipe, "_latexblend", None) is None  # nothing left installed


@pytest.mark.parametrize("args, message", [
    (["--guidance-window", "1.5"], "guidance_window must be in"),
    (["--guidance-window", "-0.1"], "guidance_window must be in"),
    (["--guidance-step-size", "0"], "guidance_step_size must be in"),
    (["--guidance-layers", "sideways"], "unknown guidance layer set 'sideways'"),
    (["--guidance", "--guidance-layers", "up_blocks.7"], "matches no attn2 layer"),
    (["--rectify-start", "2"], "rectify_start must be in"),
    (["--rectify-clusters", "1"], "rectify_clusters must be in"),
])
def test_cli_bad_guidance_options_are_one_line(banks_dir, tmp_path, tiny_dir, args, message):
    r = runner.invoke(app, ["generate", "-p", "a dog and a cat", "--concepts", "corgi", "--steps", "1", *args,
                            "--dir", str(banks_dir), "--out", str(tmp_path / "o"), "--model", str(tiny_dir)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1, r.output


def test_release_json_guidance_keys_map_to_options(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text(json.dumps([{"prompt": "a dog", "num_inference_steps": 100, "concept_num": 0,
                                 "blending_guidance": True, "guidance_steps": 20, "guidance_stepsize": 0.5,
                                 "self_rectification": True, "rectification_start": 0.7}]))
    cfg = release_config(path)
    assert cfg["guidance"] is True and cfg["guidance_window"] == 0.8 and cfg["guidance_step_size"] == 0.5
    assert cfg["rectify"] is True and cfg["rectify_start"] == 0.7


def test_guided_calls_leave_no_tensors_behind(tiny_pipe):
    """Guidance measures saved activations with saved-tensor hooks; returning the packed tensor itself made
    each node that saves its own output hold a cycle through C++ that leaked every pass."""
    import gc

    from benchmarks.speed import MODES, random_banks

    from latexblend.blend.blender import apply

    def live():
        gc.collect()
        return {o.untyped_storage().data_ptr() for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter)}

    banks = random_banks(tiny_pipe, 2)

    def call():
        g = torch.Generator().manual_seed(0)
        tiny_pipe("a dog and a cat", num_inference_steps=10, generator=g, output_type="latent")

    call()
    before = len(live())
    for mode in ("guidance", "guidance_ckpt", "rectify"):
        with apply(tiny_pipe, banks, **MODES[mode]) as blender:
            call()
            stats = dict(blender.steering.stats)
        del blender  # a live Blender legitimately keeps its last pass's history
        assert stats["guidance_passes" if "guidance" in mode else "rectify_passes"] > 0, mode
    assert len(live()) <= before


@pytest.mark.parametrize("history", [False, True])
def test_memory_is_flat_over_many_guided_calls(tiny_pipe, history):
    """A live Blender holds as many tensors (and bytes) after its 4th guided call as after its 2nd: the
    guidance history is opt-in and reset per call (it used to keep every pass's update for the whole run)."""
    import gc

    from benchmarks.speed import random_banks

    def held():
        gc.collect()
        storages = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter)}
        return len(storages), sum(storages.values())

    counts = []
    with apply(tiny_pipe, random_banks(tiny_pipe, 2), guidance={"window": 0.5, "history": history}) as blender:
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            tiny_pipe("a dog and a cat", num_inference_steps=4, generator=g, output_type="latent")
            counts.append(held())
        passes, kept = blender.steering.stats["guidance_passes"], len(blender.steering.history)
    assert passes == 4 * 2  # 4 steps, window 0.5: t/T = 0.751 and 0.501 are guided
    assert kept == (2 if history else 0)  # only the last call's passes, and only when asked for
    assert counts[3] == counts[1]
