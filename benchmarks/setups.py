"""The training run every training benchmark measures: procedural images, the device and precision as
``latexblend train`` picks them. Only library calls that every revision since the restructure has, so that
``benchmarks.train_losses`` can compare revisions."""

from __future__ import annotations

from pathlib import Path

from benchmarks import slim
from latexblend.train.loop import accelerator
from latexblend.train.setup import build_setup, check_inputs


def train_setup(model: str, size: int | None, tmp: Path, device: str | None = None, **overrides):
    """``(Setup, Accelerator)`` of a training run on procedural images (instance: disc, prior: towers), the
    device and precision as ``latexblend train`` picks them."""
    from latexblend.toy.synthetic import draw_concept
    from latexblend.train.data import load_prior
    from latexblend.train.options import TrainConfig

    draw_concept(tmp / "inst", "disc", num=4, size=256)
    draw_concept(tmp / "prior", "towers", num=4, size=256, seed=1)
    cfg = TrainConfig(name="bench", images=str(tmp / "inst"), class_noun="dog", prior=str(tmp / "prior"),
                      model=slim.resolve(model), resolution=size, **overrides)
    acc, dtype = accelerator(cfg.mixed_precision, device)
    images, _ = check_inputs(cfg)
    return build_setup(cfg, images, load_prior(tmp / "prior", "dog"), acc.device, dtype), acc
