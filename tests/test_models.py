import json

import pytest
import torch

from latexblend.errors import LatexBlendError
from latexblend.models import (
    REGISTRY,
    attn2_shapes,
    build_tiny_pipeline,
    fingerprint,
    load_pipeline,
    load_unet_and_tokenizer,
    resolve_model,
    save_tiny_model,
    sdxl_unet_config,
)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), ctx, added_cond_kwargs=added).sample


def test_tiny_model_round_trip_gives_same_unet_output(tmp_path):
    built = build_tiny_pipeline(seed=0)
    folder = save_tiny_model(tmp_path / "tiny")
    assert (folder / "model_index.json").exists()
    assert {p.name for p in folder.iterdir()} >= {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                 "tokenizer_2", "scheduler"}
    loaded = load_pipeline(str(folder), device="cpu", dtype="fp32")
    out_built, out_loaded = _unet_out(built.unet), _unet_out(loaded.unet)
    assert out_built.shape == (2, 4, 8, 8)
    assert torch.equal(out_built, out_loaded)
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_model_is_deterministic_and_seeded():
    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert torch.equal(_unet_out(a.unet), _unet_out(b.unet))
    assert not torch.equal(_unet_out(a.unet), _unet_out(c.unet))


def test_tiny_pipeline_generates_an_image(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    img = tiny_pipe("a photo of a dog", num_inference_steps=2, generator=g, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert float(img.std()) > 0


def test_registry_matches_architectures(tiny_pipe):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    def dims(shapes):
        out = {}
        for c in shapes.values():
            out[c] = out.get(c, 0) + 1
        return out

    assert dims(attn2_shapes(tiny_pipe.unet)) == REGISTRY["tiny"].attn2_dims
    with init_empty_weights():  # the full SDXL-base UNet, no memory for weights
        sdxl = UNet2DConditionModel(**sdxl_unet_config())
    shapes = attn2_shapes(sdxl)
    assert len(shapes) == 70 == REGISTRY["sdxl"].num_attn2
    assert dims(shapes) == REGISTRY["sdxl"].attn2_dims == {640: 10, 1280: 60}
    assert REGISTRY["sdxl"].values_per_token == 166_400
    assert {m.to_k.in_features for m in sdxl.modules() if hasattr(m, "to_k") and m.to_k.in_features > 1280} == {2048}


def test_fingerprint_survives_dtype_but_not_other_weights(tiny_pipe):
    import copy

    fp = fingerprint(tiny_pipe.unet)
    half = copy.deepcopy(tiny_pipe.unet).to(torch.bfloat16)
    assert fingerprint(half).matches(fp)
    assert fingerprint(build_tiny_pipeline(seed=5).unet).digest != fp.digest
    assert not fingerprint(build_tiny_pipeline(seed=5).unet).matches(fp)
    assert len(fp.norms) == 11 and len(fp.digest) == 16


def test_resolve_model_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LatexBlendError, match="no model_index.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(LatexBlendError, match="no model_index.json"):
        resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(LatexBlendError, match="neither a local folder nor a hub id"):
        resolve_model("./missing/folder")
    assert resolve_model("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(LatexBlendError, match="has no files"):
        resolve_model("sdxl-random")
    assert resolve_model("owner/name") == "owner/name"


def test_offline_hub_id_gives_one_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the hub is never contacted
    with pytest.raises(LatexBlendError) as err:
        load_pipeline("latexblend-tests/not-a-model", device="cpu")
    msg = str(err.value)
    assert "cannot load model 'latexblend-tests/not-a-model'" in msg and "--model DIR" in msg
    assert "\n" not in msg
    with pytest.raises(LatexBlendError, match="cannot load model"):
        load_unet_and_tokenizer("latexblend-tests/not-a-model")


def test_save_tiny_model_refuses_nonempty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("data")
    with pytest.raises(LatexBlendError, match="not empty"):
        save_tiny_model(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "data"


def test_tiny_cache_marker(tiny_dir):
    assert json.loads((tiny_dir / "latexblend_tiny.json").read_text())["version"] == 1


def test_model_cache_is_built_once_when_two_commands_start_together(tmp_path, monkeypatch):
    # The demo trains two concepts at once: both find no cached model; one builds it while the other
    # waits for it (before the lock the second could delete the first one's finished folder).
    import threading
    import time

    from latexblend import models

    monkeypatch.setattr(models, "cache_home", lambda: tmp_path)
    builds = []

    def save(path):
        builds.append(path)
        time.sleep(0.3)
        path.mkdir()
        (path / "model_index.json").write_text("{}")

    got = []
    threads = [threading.Thread(target=lambda: got.append(models.cached_model_dir("m", save))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [tmp_path / "m"] * 2
    assert len(builds) == 1
    assert (tmp_path / "m" / "model_index.json").exists()

    def fails(path):
        raise OSError("No space left on device")

    with pytest.raises(LatexBlendError, match="cannot build the model in .*No space left"):
        models.cached_model_dir("n", fails)
