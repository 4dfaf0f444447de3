"""Where a training step's work goes: ops dispatched, scalar reads (device syncs on a GPU) by caller, FLOPs,
and a torch.profiler operator table, for ``latexblend.train.step.train_step`` on any model and size.

Counts are free of timing noise, so the CPU can measure them on the full SDXL architecture at a small
size. A scalar read (``aten::_local_scalar_dense``: ``.item()``, ``float()``, ``.tolist()``) of a device
tensor makes the host wait for the device; reads of CPU tensors (the data draws, the optimizer's
step counters outside the fused kernel) cost no sync on a GPU: each read is listed with its caller.

    python -m benchmarks.train_profile --model sdxl-random --size 128 --steps 2 --out prof/
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.counters import OpCounter
from benchmarks.setups import train_setup
from latexblend.train.loop import make_optimizer
from latexblend.train.step import fill_prior_cache, step_tflop, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2, help="counted steps after one warm-up step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for the profiler table and the JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup, acc = train_setup(args.model, args.size, Path(tmp), grad_accum=args.grad_accum)
        params = setup.flow.trainable()
        optimizer = acc.prepare(make_optimizer(setup.cfg, params, setup.cfg.lr))
        with acc.autocast():
            fill_prior_cache(setup)
        tflop = step_tflop(setup, acc, 0)
        train_step(setup, optimizer, acc, 0, params)  # warm-up: optimizer state, lazy buffers
        counter = OpCounter()
        with counter:
            for step in range(1, 1 + args.steps):
                train_step(setup, optimizer, acc, step, params)
        result = {"model": args.model, "size": setup.size, "grad_accum": args.grad_accum, "tflop_per_step": tflop,
                  "ops_per_step": counter.count / args.steps,
                  "scalar_reads_per_step": {k: v / args.steps for k, v in sorted(counter.reads.items())}}
        print(json.dumps(result, indent=2))
        if args.out:
            from torch.profiler import ProfilerActivity, profile

            args.out.mkdir(parents=True, exist_ok=True)
            cuda = setup.device.type == "cuda"
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                train_step(setup, optimizer, acc, 1 + args.steps, params)
                if cuda:
                    torch.cuda.synchronize()
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            (args.out / "profile_train_step.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
            (args.out / "train_profile.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
