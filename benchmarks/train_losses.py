"""Losses of the first N training steps from the run's seed (fp32 on the CPU by default), as JSON: what two
revisions compare when a change reorders the step's arithmetic.

    PYTHONPATH=<revision>/src:. python -m benchmarks.train_losses --model sdxl-slim --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.setups import train_setup
from latexblend.train.loop import make_optimizer
from latexblend.train.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup, acc = train_setup(args.model, args.size, Path(tmp), args.device)
        params = setup.flow.trainable()
        optimizer = acc.prepare(make_optimizer(setup.cfg, params, 1e-4))
        losses = [train_step(setup, optimizer, acc, s, params).tolist() for s in range(args.steps)]
        norm = float(torch.sqrt(sum(p.detach().double().square().sum() for p in params)))
    print(json.dumps({"model": args.model, "losses": [round(x[0], 7) for x in losses], "trainables_norm": norm}))


if __name__ == "__main__":
    main()
