"""scripts/device_check.sh, the GPU session's one measurement script, rehearsed on the CPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def _run(tmp_path, *args, timeout=900):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_device_check_refuses_an_unknown_model(tmp_path):
    r = _run(tmp_path, "--model", "sdxl")
    assert r.returncode == 2 and r.stderr.startswith("error: --model must be")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_device_check_runs_every_step_on_the_tiny_model_and_leaves_two_files(tmp_path):
    """Every step succeeds (about 3 minutes on 2 CPU cores); $OUT holds summary.txt and one archive of
    everything else: a GPU session only measures, and brings back two files."""
    r = _run(tmp_path, "--model", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz", "summary.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("device_check.")] == []  # work folder removed
    lines = (out / "summary.txt").read_text().splitlines()
    steps = [line.split(":")[0] for line in lines if "rc=" in line]
    assert steps == ["train", "modes", "train_1024", "train_compiled", "train_batch4", "train_profile", "generate"]
    assert all("rc=0," in line for line in lines if "rc=" in line), lines
    assert "--- key figures" in lines and any(line.startswith("  ours/stock: time") for line in lines)
    with tarfile.open(out / "device_check.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    folder = tmp_path / "x" / "device_check"
    for name, bench in [("bench_train", "train"), ("bench_train_batch", "train"), ("bench_train_compiled", "train"),
                        ("bench_train_1024", "train"),
                        ("bench_modes", "modes"), ("bench_generate", "generate")]:
        assert json.loads((folder / f"{name}.json").read_text())["benchmark"] == bench
    train = json.loads((folder / "bench_train.json").read_text())
    assert [row["gradient_checkpointing"] for row in train["rows"]] == [False, True]
    assert all(row["stock_ops_per_step"] > row["ops_per_step"] > 1000 for row in train["rows"])
    assert json.loads((folder / "bench_train_compiled.json").read_text())["compile_s"] > 0
    modes = [r["mode"] for r in json.loads((folder / "bench_modes.json").read_text())["rows"]]
    assert modes == ["stock (A/A)", "plain", "guidance", "rectify", "plain_graphs", "guidance_eager", "rectify_eager"]
    assert sorted(p.name for p in (folder / "modes_profile").iterdir()) == [
        f"profile_{m}_2.txt" for m in ("guidance", "guidance_eager", "plain")]
    assert "Self CPU" in (folder / "train_profile" / "profile_train_step.txt").read_text()
    assert (folder / "summary.txt").read_text() == (out / "summary.txt").read_text()
