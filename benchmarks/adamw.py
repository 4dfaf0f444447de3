"""Time one AdamW step over SDXL's trainable tensors (the 140 attn2 ``to_k``/``to_v`` weights, 340.8 M fp32
parameters, random gradients) for torch's three implementations: the per-tensor loop, ``foreach`` and
``fused``; seconds per step (median of 3 after one warm-up) and aten ops dispatched per step. Needs
about 7 GB of memory on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.adamw [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.counters import OpCounter
from latexblend.device import synchronize
from latexblend.models import attn2_shapes, build_sdxl_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    dims = [c for c in attn2_shapes(build_sdxl_random("meta", "fp32").unet).values() for _ in ("to_k", "to_v")]
    print(f"{len(dims)} tensors, {sum(c * 2048 for c in dims) / 1e6:.1f} M parameters")
    for name, kwargs in [("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(c, 2048, generator=g) * 0.02).to(device)) for c in dims]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **kwargs)
        optimizer.step()  # warm-up: the state tensors
        times = []
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        counter = OpCounter()
        with counter:
            optimizer.step()
        print(f"{name}: {statistics.median(times):.3f} s per step, {counter.count} aten ops")
        del params, optimizer


if __name__ == "__main__":
    main()
