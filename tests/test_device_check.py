"""scripts/device_check.sh, the GPU session's one measurement script, rehearsed on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def _run(tmp_path, *args, timeout=600):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_device_check_refuses_an_unknown_model(tmp_path):
    r = _run(tmp_path, "--model", "sdxl")
    assert r.returncode == 2 and r.stderr.startswith("error: --model must be")
    assert not (tmp_path / "device_check").exists()


@pytest.mark.slow
def test_device_check_runs_every_step_on_the_tiny_model(tmp_path):
    """Every step succeeds and leaves its results (about 90 s on 2 CPU cores): a GPU session only measures."""
    r = _run(tmp_path, "--model", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "device_check"
    lines = (out / "summary.txt").read_text().splitlines()
    steps = [line.split(":")[0] for line in lines if "rc=" in line]
    assert steps == ["train", "train_profile", "modes", "generate", "extract", "train_batch4", "train_compiled"]
    assert all("rc=0," in line for line in lines if "rc=" in line), lines
    for name, bench in [("bench_train", "train"), ("bench_train_batch", "train"), ("bench_train_compiled", "train"),
                        ("bench_modes", "modes"), ("bench_generate", "generate"), ("bench_extract", "extract")]:
        assert json.loads((out / f"{name}.json").read_text())["benchmark"] == bench
    assert json.loads((out / "bench_train_compiled.json").read_text())["compile_unet"] is True
    assert [r["concepts"] for r in json.loads((out / "bench_generate.json").read_text())["rows"]] == [0, 1, 8]
    assert sorted(p.name for p in (out / "modes_profile").iterdir()) == [
        f"profile_{m}_2.txt" for m in ("guidance", "guidance_ckpt", "plain", "rectify")]
    assert "Self CPU" in (out / "train_profile" / "profile_train_step.txt").read_text()
    assert json.loads((out / "train_profile" / "train_profile.json").read_text())["ops_per_step"] > 1000
