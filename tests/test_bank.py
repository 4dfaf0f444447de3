import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import random_bank
from latexblend.bank.format import (
    ConceptBank,
    bank_path,
    load_bank,
    save_bank,
    verify_bank,
)
from latexblend.bank.release import import_release_bank
from latexblend.cli import app
from latexblend.errors import LatexBlendError
from latexblend.models import REGISTRY, build_tiny_pipeline, sdxl_unet_config

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_round_trip_keeps_numbers_and_metadata(tiny_pipe, tmp_path):
    bank = random_bank(tiny_pipe.unet)
    path = save_bank(bank, tmp_path / "corgi.safetensors")
    back = load_bank(path)
    assert sorted(back.layers) == sorted(bank.layers) and back.noun_ids == [1929] and back.num_tokens == 2
    for layer in bank.layers:
        assert torch.equal(back.k[layer], bank.k[layer]) and torch.equal(back.v[layer], bank.v[layer])
        assert back.k[layer].is_contiguous()
    assert back.class_noun == "dog" and back.training == {"steps": 0}
    assert back.fingerprint_digest == bank.fingerprint_digest != "unknown"
    verify_bank(back, tiny_pipe.unet, tiny_pipe.tokenizer)  # fits the model it was made for


def test_identical_banks_are_identical_files(tiny_pipe, tmp_path):
    paths = [save_bank(random_bank(tiny_pipe.unet), tmp_path / f"{i}.safetensors") for i in range(3)]
    assert len({p.read_bytes() for p in paths}) == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_never_written_or_read(tiny_pipe, tmp_path, value):
    bank = random_bank(tiny_pipe.unet)
    good = save_bank(bank, tmp_path / "good.safetensors")
    bank.v[bank.layers[3]][1, 2] = value
    with pytest.raises(LatexBlendError, match="holds NaN or infinite values"):
        save_bank(bank, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    from safetensors.torch import load_file, save_file

    from latexblend.bank.format import FORMAT

    tensors = load_file(str(good))
    tensors[f"{bank.layers[3]}.v"][1, 2] = value
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**bank.metadata(), "format": FORMAT})
    with pytest.raises(LatexBlendError, match="holds NaN or infinite values"):
        load_bank(tmp_path / "bad.safetensors")


def test_one_bad_file_does_not_break_bank_ls(tiny_pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    good = save_bank(random_bank(tiny_pipe.unet), tmp_path / "corgi.safetensors")
    bad = (("format_version", "x"), ("noun_token_ids", "5"), ("training", "[1]"), ("name", "../up"),
           ("base_fingerprint_norms", "abc"), ("base_fingerprint_norms", "[1, -2]"),
           ("training", '{"a": ' * 10_000 + "1" + "}" * 10_000))
    for i, (key, value) in enumerate(bad):
        meta = {**load_bank(good).metadata(), key: value}
        save_file(load_file(str(good)), str(tmp_path / f"bad{i}_{key}.safetensors"), metadata=meta)
    result = cli("bank", "ls", "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 + len(bad) and lines[-1].startswith("corgi ") and "Traceback" not in result.output
    assert all(line.startswith("bad") and "unreadable" in line for line in lines[1:-1])
    for i in range(len(bad)):  # and every command that reads the bank says so in one line
        for args in (("bank", "inspect"), ("bank", "verify")):
            result = cli(*args, next(tmp_path.glob(f"bad{i}_*")))
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_verify_refuses_other_model(tiny_pipe):
    bank = random_bank(tiny_pipe.unet)
    other = build_tiny_pipeline(seed=7).unet
    with pytest.raises(LatexBlendError, match="made for base model 'tiny'"):
        verify_bank(bank, other)


def test_verify_refuses_wrong_shapes_and_layers(tiny_pipe):
    bank = random_bank(tiny_pipe.unet, with_fingerprint=False)
    layer = bank.layers[0]
    narrow = ConceptBank(**{**bank.__dict__, "k": {**bank.k, layer: bank.k[layer][:, :8]},
                            "v": {**bank.v, layer: bank.v[layer][:, :8]}})
    with pytest.raises(LatexBlendError, match="width 8 in the bank"):
        verify_bank(narrow, tiny_pipe.unet)
    fewer = ConceptBank(**{**bank.__dict__, "k": dict(list(bank.k.items())[1:]), "v": dict(list(bank.v.items())[1:])})
    with pytest.raises(LatexBlendError, match="does not fit this model"):
        verify_bank(fewer, tiny_pipe.unet)


def test_verify_refuses_noun_that_tokenizes_differently(tiny_pipe):
    bank = random_bank(tiny_pipe.unet, noun="dog", noun_ids=(2368,))  # 2368 is "cat"
    with pytest.raises(LatexBlendError, match="tokenizes as"):
        verify_bank(bank, tiny_pipe.unet, tiny_pipe.tokenizer)


def test_save_refuses_inconsistent_rows(tiny_pipe, tmp_path):
    bank = random_bank(tiny_pipe.unet, noun_ids=(1929, 1929))  # L should be 3
    bank.k = {n: t[:2] for n, t in bank.k.items()}
    bank.v = {n: t[:2] for n, t in bank.v.items()}
    with pytest.raises(LatexBlendError, match=r"\[L=3, C\]"):
        save_bank(bank, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_old_file_and_leaves_no_temp(tiny_pipe, tmp_path, monkeypatch):
    path = save_bank(random_bank(tiny_pipe.unet, seed=1), tmp_path / "corgi.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("latexblend.fileio.save_file", boom)
    with pytest.raises(RuntimeError):
        save_bank(random_bank(tiny_pipe.unet, seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["corgi.safetensors"]


@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "garbage", "foreign"])
def test_bad_bank_files_give_clear_errors(tiny_pipe, tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        good = save_bank(random_bank(tiny_pipe.unet), tmp_path / "good.safetensors").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 not a bank" * 10)
    elif kind == "foreign":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    expected = {"missing": "not found", "directory": "is a directory", "truncated": "corrupt or truncated",
                "garbage": "corrupt or truncated", "foreign": "not a latexblend concept bank"}[kind]
    with pytest.raises(LatexBlendError, match=expected):
        load_bank(path)
    result = cli("bank", "inspect", str(path))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and expected in result.output


def _release_dict(shapes, rows=2, dtype=torch.float16, views=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, c in shapes.items():
        if views:  # rows of a full [77, C] projection, as the release saved them
            full_k, full_v = torch.randn(77, c, generator=g).to(dtype), torch.randn(77, c, generator=g).to(dtype)
            k, v = full_k[5 : 5 + rows], full_v[5 : 5 + rows]
        else:
            k, v = torch.randn(rows, c, generator=g).to(dtype), torch.randn(rows, c, generator=g).to(dtype)
        out[f"{name}.processor"] = {"k": k, "v": v}
    return out


def test_import_release_bank_sdxl_shapes_is_small_and_exact(tmp_path, tokenizer):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from latexblend.models import attn2_shapes

    with init_empty_weights():
        shapes = attn2_shapes(UNet2DConditionModel(**sdxl_unet_config()))
    raw = _release_dict(shapes, views=True)
    src = tmp_path / "n_2_dog_1500.pt"
    torch.save(raw, src)
    assert src.stat().st_size > 30 * 665_600  # views drag their whole storage into the .pt
    bank = import_release_bank(src, "dog", "dog1500", tokenizer)
    out = save_bank(bank, tmp_path / "bank" / "dog1500.safetensors")
    ideal = 2 * REGISTRY["sdxl"].values_per_token * 2  # L=2 tokens, fp16
    assert ideal == 665_600
    assert out.stat().st_size < 1.5 * ideal
    back = load_bank(out)
    assert back.dtype == "float16" and back.num_tokens == 2 and len(back.layers) == 70
    for key, entry in raw.items():
        layer = key.removesuffix(".processor")
        assert torch.equal(back.k[layer], entry["k"]) and torch.equal(back.v[layer], entry["v"])


def test_import_cli_and_verify(tiny_pipe, tiny_dir, tmp_path):
    from latexblend.models import attn2_shapes

    src = tmp_path / "release.pt"
    torch.save(_release_dict(attn2_shapes(tiny_pipe.unet), views=False, dtype=torch.float32), src)
    banks = tmp_path / "banks"
    r = cli("bank", "import", src, "--class-noun", "dog", "--name", "rex", "--model", tiny_dir, "--dir", banks)
    assert r.exit_code == 0, r.output
    assert (banks / "rex.safetensors").exists()
    r = cli("bank", "import", src, "--class-noun", "dog", "--name", "rex", "--dir", banks)
    assert r.exit_code == 2 and "exists" in r.output
    r = cli("bank", "verify", "rex", "--model", tiny_dir, "--dir", banks)
    assert r.exit_code == 0 and r.output.startswith("ok: 'rex' fits"), r.output
    other = tmp_path / "other-model"
    from latexblend.models import save_tiny_model

    save_tiny_model(other, seed=3)
    r = cli("bank", "verify", "rex", "--model", other, "--dir", banks)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "made for base model" in r.output
    r = cli("bank", "ls", "--dir", banks)
    assert r.exit_code == 0 and "rex" in r.output and "dog" in r.output
    r = cli("bank", "inspect", "rex", "--dir", banks, "--json")
    info = json.loads(r.output)
    assert info["class_noun"] == "dog" and info["num_tokens"] == "2" and info["layers_by_width"] == {"48": 3, "64": 8}


def test_import_wrong_class_noun_and_bad_files(tmp_path, tokenizer, tiny_pipe):
    from latexblend.models import attn2_shapes

    src = tmp_path / "r.pt"
    torch.save(_release_dict(attn2_shapes(tiny_pipe.unet), views=False), src)
    with pytest.raises(LatexBlendError, match="is --class-noun right"):
        import_release_bank(src, "guitar amplifier", "amp", tokenizer)
    torch.save({"not_attn": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(LatexBlendError, match="not an attn2 layer"):
        import_release_bank(tmp_path / "odd.pt", "dog", "x", tokenizer)
    (tmp_path / "junk.pt").write_bytes(b"nope")
    with pytest.raises(LatexBlendError, match="junk.pt is not a torch.save file"):
        import_release_bank(tmp_path / "junk.pt", "dog", "x", tokenizer)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_import_never_unpickles_code(tmp_path, tokenizer):
    src = tmp_path / "evil.pt"
    torch.save({"x.attn2.processor": {"k": _Payload(), "v": torch.zeros(2, 4)}}, src)
    with pytest.raises(LatexBlendError, match="evil.pt is refused as unsafe"):
        import_release_bank(src, "dog", "evil", tokenizer)


def test_bank_names_and_lookup(tmp_path):
    assert bank_path("../x/corgi.safetensors", tmp_path).name == "corgi.safetensors"  # a path is kept
    with pytest.raises(LatexBlendError, match="not allowed"):
        bank_path("bad name", tmp_path)
    with pytest.raises(LatexBlendError, match=r"no concept 'corgi'.*banks there: none"):
        bank_path("corgi", tmp_path)
