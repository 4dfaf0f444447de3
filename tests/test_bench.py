import csv
import json

import pytest
import torch
from benchmarks.cli import app
from typer.testing import CliRunner

from latexblend.cli import app as latexblend_app

runner = CliRunner()


def test_bench_generate_times_stock_and_blended_calls_in_alternation(tiny_dir, tmp_path, monkeypatch):
    """Every round calls stock, ours (blend processors installed), stock again, per concept count; the
    warm-up round is untimed; the rows and the CSV hold one row per count."""
    from diffusers import StableDiffusionXLPipeline

    from latexblend.blend.processor import BlendProcessor

    calls = []
    stock_call = StableDiffusionXLPipeline.__call__

    def spy(pipe, *args, **kwargs):
        calls.append(any(isinstance(p, BlendProcessor) for p in pipe.unet.attn_processors.values()))
        return stock_call(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", spy)
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--concepts", "0,2", "--steps", "1",
                            "--repeats", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert calls == [False, True, False] * 2 * 3  # (stock, ours, stock) x 2 counts x (warm-up + 2 rounds)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "generate" and data["steps"] == 1 and data["size"] == 64
    assert [row["concepts"] for row in data["rows"]] == [0, 2]
    assert [int(row["concepts"]) for row in csv.DictReader(out.with_suffix(".csv").open())] == [0, 2]
    assert "| concepts |" in r.output


def test_bench_generate_rejects_bad_counts(tmp_path):
    r = runner.invoke(app, ["generate", "--concepts", "1,x", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    r = runner.invoke(app, ["generate", "--concepts", "9", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "between 0 and 8" in r.output


def _bench_train(tiny_dir, tmp_path, *extra):
    out = tmp_path / f"t{len(extra)}.json"
    r = runner.invoke(app, ["train", "--model", str(tiny_dir), "--steps", "1", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_bench_train_times_the_step_that_train_runs(tiny_dir, tmp_path):
    """Without the prior cache every step does the same work, so the benchmark's FLOPs per step equal those
    ``latexblend train`` counts on its first step; two micro-batches are twice the work and samples."""
    from latexblend.toy.synthetic import draw_concept

    draw_concept(tmp_path / "inst", "disc", num=2, size=96)
    draw_concept(tmp_path / "prior", "towers", num=2, size=96, seed=1)
    data = _bench_train(tiny_dir, tmp_path, "--no-cache-prior", "--checkpointing", "off")
    assert data["size"] == 64 and [row["gradient_checkpointing"] for row in data["rows"]] == [False]
    assert data["trainable_params"] == 2 * sum(c * 64 for c in (48,) * 3 + (64,) * 8) + 2 * 32  # K/V + 2 rows
    runs = tmp_path / "runs"
    args = ["train", "--images", str(tmp_path / "inst"), "--class-noun", "dog", "--name", "t", "--model", str(tiny_dir),
            "--prior", str(tmp_path / "prior"), "--steps", "1", "--runs-dir", str(runs), "--bank-dir",
            str(tmp_path / "banks"), "--set", "cache_prior=false", "--set", "peak_tflops=0.001"]
    r = runner.invoke(latexblend_app, args)
    assert r.exit_code == 0, r.output
    info = json.loads((runs / "t" / "run.json").read_text())
    row = data["rows"][0]
    assert row["tflop_per_step"] == pytest.approx(info["tflop_per_step"], rel=1e-4) and row["tflop_per_step"] > 0
    assert info["mfu"] > 0 and data["peak_tflops"] is None and row["mfu"] is None  # CPU: MFU only when given
    twice = _bench_train(tiny_dir, tmp_path, "--no-cache-prior", "--checkpointing", "on", "--grad-accum", "2")
    twice = twice["rows"][0]
    assert twice["gradient_checkpointing"] is True
    assert twice["tflop_per_step"] == pytest.approx(2 * row["tflop_per_step"], rel=1e-4)
    assert twice["samples_per_s"] == pytest.approx(4 * twice["steps_per_s"], rel=1e-3)


def test_flop_counter_counts_cpu_fused_attention_as_cuda_kernels_are_counted():
    """The CPU's fused SDPA kernels are counted: forward as its math decomposition, backward with torch's
    formula for the fused CUDA kernels (which recompute the scores: 2.5 times the forward); counting
    changes no result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from latexblend.device import count_tflop, flop_counter

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g, requires_grad=True) for _ in range(3))

    def attention(backward: bool):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if backward:
            out.sum().backward()
        return out.detach()

    forward = 2 * (2 * 2 * 3 * 16 * 16 * 8) / 1e12  # QK^T and PV of [2, 3, 16, 8]
    with sdpa_kernel(SDPBackend.MATH):
        assert count_tflop(lambda: attention(False)) == pytest.approx(forward)
    assert count_tflop(lambda: attention(False)) == pytest.approx(forward)
    assert count_tflop(lambda: attention(True)) == pytest.approx(3.5 * forward)
    plain = attention(False)
    with flop_counter():
        assert torch.equal(attention(False), plain)


def test_bench_extract_writes_the_bank_size(tiny_dir, tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["extract", "--model", str(tiny_dir), "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())["rows"][0]
    ideal = 2 * 2 * sum(c for c in (48,) * 3 + (64,) * 8) * 2  # L=2 rows of k and v, fp16
    assert row["extract_s"] > 0 and ideal < row["bank_bytes"] < 2 * ideal + 4096


def test_fidelity_help_names_every_variant():
    """The help lists the variants by hand (the CLI does not import the benchmark for --help)."""
    import typer
    from benchmarks.fidelity import VARIANTS

    option = next(p for p in typer.main.get_command(app).commands["fidelity"].params if p.name == "variants")
    assert [v for v in VARIANTS if v not in option.help] == []


def test_bench_modes_reports_time_and_guidance_memory(tiny_dir, tmp_path):
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["modes", "--model", str(tiny_dir), "--concepts", "2", "--steps", "5",
                            "--repeats", "1", "--out", str(out), "--profile", str(tmp_path / "prof")])
    assert r.exit_code == 0, r.output
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["stock (A/A)", "plain", "guidance", "guidance_ckpt", "rectify"]
    assert rows["guidance"]["guided_steps"] == 1 and rows["rectify"]["rectify_passes"] == 1  # t/T 0.801 only
    assert 0 < rows["guidance_ckpt"]["guidance_saved_mib"] < rows["guidance"]["guidance_saved_mib"]
    assert all(row["seconds"] > 0 and row["vs_plain"] > 0 for row in rows.values())
    # FLOPs: plain blending no more than stock (K/V projected once per prompt, not per step); guidance
    # adds a pass, checkpointing one more forward on top; rectification a capture pass
    assert 0 < rows["plain"]["tflop"] < rows["stock (A/A)"]["tflop"]
    assert 1.0 < rows["guidance"]["flop_vs_plain"] < rows["guidance_ckpt"]["flop_vs_plain"]
    assert rows["rectify"]["flop_vs_plain"] > 1.0
    tables = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert tables == [f"profile_{m}_2.txt" for m in ("guidance", "guidance_ckpt", "plain", "rectify")]
    assert "aten::" in (tmp_path / "prof" / "profile_guidance_2.txt").read_text()
    r = runner.invoke(app, ["modes", "--concepts", "1", "--out", str(out)])
    assert r.exit_code == 2 and "between 2 and 6" in r.output
