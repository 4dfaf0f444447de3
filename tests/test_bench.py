import csv
import json

import pytest
from typer.testing import CliRunner

from latexblend.cli import app

runner = CliRunner()


def test_bench_generate_writes_well_formed_results(tiny_dir, tmp_path):
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "generate", "--model", str(tiny_dir), "--concepts", "0,2", "--steps", "1",
                            "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "generate" and data["steps"] == 1 and data["size"] == 64
    assert [row["concepts"] for row in data["rows"]] == [0, 2]
    for row in data["rows"]:
        assert row["stock_s"] > 0 and row["ours_s"] > 0
        # ratio comes from unrounded times; the stored times are rounded to 1e-4 s
        slack = row["ratio"] * (5e-5 / row["ours_s"] + 5e-5 / row["stock_s"]) + 5e-5
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["stock_s"], abs=slack)
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [int(row["concepts"]) for row in rows] == [0, 2]
    assert "| concepts |" in r.output


def test_bench_generate_rejects_bad_counts(tmp_path):
    r = runner.invoke(app, ["bench", "generate", "--concepts", "1,x", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    r = runner.invoke(app, ["bench", "generate", "--concepts", "9", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "between 0 and 8" in r.output


def test_bench_train_and_extract_write_well_formed_results(tiny_dir, tmp_path):
    out = tmp_path / "t.json"
    r = runner.invoke(app, ["bench", "train", "--model", str(tiny_dir), "--steps", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["size"] == 64 and [row["gradient_checkpointing"] for row in data["rows"]] == [False, True]
    assert data["trainable_params"] == 2 * sum(c * 64 for c in (48,) * 3 + (64,) * 8) + 2 * 32  # K/V + 2 rows
    assert all(row["tflop_per_step"] > 0 and row["steps_per_s"] > 0 for row in data["rows"])
    assert data["rows"][0]["tflop_per_step"] == data["rows"][1]["tflop_per_step"]
    assert data["cache_prior"] is True and data["compile_unet"] is False
    assert all(row["warmup_s"] >= 0 for row in data["rows"])
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["bench", "extract", "--model", str(tiny_dir), "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())["rows"][0]
    ideal = 2 * 2 * sum(c for c in (48,) * 3 + (64,) * 8) * 2  # L=2 rows of k and v, fp16
    assert row["extract_s"] > 0 and ideal < row["bank_bytes"] < 2 * ideal + 4096
