"""``python -m benchmarks train``: our training step against a stock diffusers Custom-Diffusion step.

Ours is the step ``latexblend train`` runs (:class:`~latexblend.train.runner.Runner`: on CUDA one CUDA graph
per step when it checks out, else eager). The stock step is what a diffusers training script does with the
same trainables (every attn2 ``to_k``/``to_v`` in fp32 and the identifier rows), on the same batch: diffusers'
own attention processors, the instance prompt's K/V everywhere (no base flow, no splice), the same loss,
clipping and AdamW, autocast as ``accelerate`` applies it. Each is timed in the steady state (prior cache
filled, warmed up), its operators counted on one eager step (:class:`~benchmarks.counters.OpCounter`: about
the kernels a GPU launches), and its peak memory taken (allocated, and reserved: a CUDA graph's memory is
reserved, not allocated). Ours runs first; its optimizer state and graph are freed before the stock step.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from benchmarks.counters import OpCounter
from benchmarks.setups import train_setup
from benchmarks.speed import check_counts
from latexblend.device import (
    device_name,
    environment,
    gradient_checkpointing,
    mfu,
    peak_tflops,
    resolve_device,
    synchronize,
)
from latexblend.text import encode_prompts, pipeline_text_side
from latexblend.train.loop import make_optimizer
from latexblend.train.runner import WARMUP, Runner
from latexblend.train.setup import compile_unet
from latexblend.train.step import batch_latents, fill_prior_cache, micro_batches, step_tflop, train_step

# --------------------------------------------------------------------------- the stock step


def stock_step(setup, optimizer, acc, step: int, params: list) -> torch.Tensor:
    """A diffusers Custom-Diffusion step on our batch of ``step``: the instance prompts tokenized and encoded
    (their own pooled embedding), the UNet with diffusers' attn2 processors on that context, our loss
    (masked instance term + prior term), backward, clipping, AdamW. Returns the losses (unread)."""
    toks, encs = pipeline_text_side(setup.pipe)
    batches = micro_batches(setup, acc, step)
    total = None
    for batch in batches:
        n, dtype = batch.n_instance, setup.unet_dtype
        with acc.autocast():
            context, pooled = encode_prompts(toks, encs, batch.prompts[:n], setup.device)
            if batch.prior_context is not None:
                context = torch.cat([context, batch.prior_context])
                pooled = torch.cat([pooled, batch.prior_pooled])
            latents = batch_latents(setup, batch)
            noisy = setup.scheduler.add_noise(latents, batch.noise, batch.timesteps)
            pred = setup.pipe.unet(noisy.to(dtype), batch.timesteps, context.to(dtype), added_cond_kwargs={
                "text_embeds": pooled.to(dtype), "time_ids": batch.time_ids}).sample
            err = (pred.float() - batch.noise.float()).pow(2)
            inst = (err[:n] * batch.masks).sum() / (batch.masks.sum() * err.shape[1])
            prior = err[n:].mean() if err.shape[0] > n else err.new_zeros(())
            loss = inst + setup.cfg.prior_loss_weight * prior
        acc.backward(loss / len(batches))
        total = loss.detach() if total is None else total + loss.detach()
    if setup.cfg.max_grad_norm:
        acc.clip_grad_norm_(params, setup.cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class StockMode:
    """Within the block the pipeline trains as stock diffusers would: diffusers' attention processors, the
    ``to_k``/``to_v`` weights themselves trainable (views of our flat weight), with their own optimizer."""

    def __init__(self, setup, acc):
        self.setup, self.acc = setup, acc

    def __enter__(self):
        flow = self.setup.flow
        self.weights = [mod.weight for mod in flow.projections] if flow.weight is not None else []
        for w in self.weights:
            w.requires_grad_(True)
        self.params = [*self.weights, *flow.rows] if self.weights else flow.trainable()
        self.optimizer = self.acc.prepare(make_optimizer(self.setup.cfg, self.params, self.setup.plan.lr))
        unet = self.setup.pipe.unet
        old = dict(unet.attn_processors)
        unet.set_attn_processor(AttnProcessor2_0())  # diffusers' own, attn1 and attn2
        self.restore = lambda: unet.set_attn_processor(old)
        return self

    def __exit__(self, *exc):
        self.restore()
        for w in self.weights:
            w.requires_grad_(False)
            w.grad = None
        self.optimizer = None


# --------------------------------------------------------------------------- measuring


def measure(fn: Callable[[int], object], first: int, steps: int, device: str) -> dict:
    """Seconds per step over ``steps`` calls ``fn(first)``, ``fn(first + 1)``...; peak memory (GiB) allocated
    and reserved during them (CUDA; 0 elsewhere)."""
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for s in range(first, first + steps):
        fn(s)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    alloc = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0
    return {"s": seconds, "alloc": alloc, "reserved": reserved}


def count_ops(fn: Callable[[], object]) -> int:
    """Operators dispatched by one call (on a GPU, about the kernels launched)."""
    with OpCounter() as ops:
        fn()
    return ops.count


def free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _ours(setup, acc, steps: int, device: str, params: list, optimizer, progress: Callable[[str], None]) -> dict:
    """Our step at one checkpointing setting: warm-up (and the graph's capture), one counted eager step,
    then ``steps`` timed runner steps and as many eager ones."""
    notes: list[str] = []
    runner = Runner(setup, optimizer, acc, params, log=notes.append)
    start = time.perf_counter()
    for s in range(WARMUP + 1):
        runner.step(s)
        synchronize(device)
        progress(f"train: warm-up step {s + 1} of {WARMUP + 1} done at {time.perf_counter() - start:.1f} s "
                 f"({runner.path})")
    warmup = time.perf_counter() - start
    ops = count_ops(lambda: train_step(setup, optimizer, acc, WARMUP + 1, params))
    free(device)  # the eager steps' cached blocks: a graph's memory is its pool, reserved apart
    timed = measure(runner.step, WARMUP + 2, steps, device)
    eager = measure(lambda s: train_step(setup, optimizer, acc, s, params), WARMUP + 2 + steps, steps, device) \
        if runner.path != "eager" else timed
    out = {"path": runner.path, "path_note": runner.note, "capture_s": runner.capture_s, "check": runner.check,
           "warmup_s": warmup, "ops": ops, "timed": timed, "eager": eager, "log": notes}
    del runner
    free(device)
    return out


def _stock(setup, acc, steps: int, device: str) -> dict:
    with StockMode(setup, acc) as stock:
        def step(s):
            return stock_step(setup, stock.optimizer, acc, s, stock.params)

        step(0)
        ops = count_ops(lambda: step(1))
        free(device)
        timed = measure(step, 2, steps, device)
    free(device)
    return {"ops": ops, "timed": timed}


def _row(on: bool, ours: dict, stock: dict, tflop: float, samples: int, peak: float | None) -> dict:
    t, e, s = ours["timed"], ours["eager"], stock["timed"]
    rate = 1 / t["s"]
    use_reserved = ours["path"] != "eager"  # a graph's activations are reserved, never allocated again

    def mem(m):
        return m["reserved"] if use_reserved else m["alloc"]

    def ratio(a, b):
        return round(a / b, 4) if b else None

    return {"gradient_checkpointing": on, "path": ours["path"], "steps_per_s": round(rate, 4),
            "samples_per_s": round(samples * rate, 4), "peak_gib": round(t["alloc"], 3),
            "reserved_gib": round(t["reserved"], 3), "tflop_per_step": float(f"{tflop:.5g}"),
            "tflop_per_s": round(tflop * rate, 4), "mfu": round(mfu(tflop, rate, peak), 4) if peak else None,
            "warmup_s": round(ours["warmup_s"], 2),
            "capture_s": round(ours["capture_s"], 2) if ours["capture_s"] is not None else None,
            "ops_per_step": ours["ops"], "eager_steps_per_s": round(1 / e["s"], 4),
            "stock_steps_per_s": round(1 / s["s"], 4), "stock_ops_per_step": stock["ops"],
            "stock_peak_gib": round(s["alloc"], 3), "stock_reserved_gib": round(s["reserved"], 3),
            "ours_vs_stock_time": ratio(t["s"], s["s"]), "ours_vs_stock_ops": ratio(ours["ops"], stock["ops"]),
            "ours_vs_stock_peak": ratio(mem(t), mem(s)), "eager_vs_stock_time": ratio(e["s"], s["s"])}


def _rows(setup, acc, steps: int, checkpointing: Sequence[bool], peak: float | None,
          progress: Callable[[str], None]) -> tuple[list[dict], dict]:
    """A row per gradient-checkpointing setting: ours (the runner's path, and eager) and the stock step."""
    params = setup.flow.trainable()
    optimizer = acc.prepare(make_optimizer(setup.cfg, params, setup.plan.lr))
    with acc.autocast():
        fill_prior_cache(setup)
    tflop = step_tflop(setup, acc, 0)
    compile_s = None
    if setup.cfg.compile_unet:
        compile_s = time.perf_counter()
        compile_unet(setup.pipe.unet, setup.cfg.compile_backend)
    device, unet = str(setup.device), setup.pipe.unet
    ours = {}
    for on in checkpointing:
        gradient_checkpointing(unet, on)
        ours[on] = _ours(setup, acc, steps, device, params, optimizer, progress)
        if compile_s is not None and on == checkpointing[0]:
            compile_s = ours[on]["warmup_s"]  # the first steps compile the blocks
        progress(f"train: ours, checkpointing {'on' if on else 'off'}: {ours[on]['path']} "
                 f"{1 / ours[on]['timed']['s']:.2f} steps/s, eager {1 / ours[on]['eager']['s']:.2f} steps/s")
    optimizer.state.clear()  # ours is done: its AdamW state must not weigh on the stock step's memory
    del optimizer
    free(device)
    stock = {}
    for on in checkpointing:
        gradient_checkpointing(unet, on)
        stock[on] = _stock(setup, acc, steps, device)
        progress(f"train: stock, checkpointing {'on' if on else 'off'}: {1 / stock[on]['timed']['s']:.2f} steps/s")
    samples = setup.cfg.batch_size * setup.cfg.grad_accum * (2 if setup.prior else 1)
    rows = [_row(on, ours[on], stock[on], tflop, samples, peak) for on in checkpointing]
    return rows, {"compile_s": compile_s, "graph": {on: {k: ours[on][k] for k in ("path_note", "check", "log")}
                                                     for on in checkpointing}}


def bench_train(model: str = "tiny", steps: int = 5, size: int | None = None, device: str | None = None,
                checkpointing: Sequence[bool] = (False, True), peak: float | None = None,
                progress: Callable[[str], None] = lambda line: None, **settings) -> dict:
    """Steps/s, samples/s, peak memory, FLOP utilisation and operators per step of our training step and of a
    stock diffusers Custom-Diffusion step on the same batches, per gradient-checkpointing setting, and their
    ratios. ``settings``: training settings (:class:`~latexblend.train.options.TrainConfig`: ``cache_prior``,
    ``compile_unet``, ``cuda_graph``, ``grad_accum``, ``batch_size``...). ``peak``: the device's TFLOP/s for
    MFU [default: the datasheet figure of known GPUs; none on the CPU]. ``progress``: a line per part done."""
    check_counts(steps=steps)
    device = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:  # prior images are read on every cache miss
        setup, acc = train_setup(model, size, Path(tmp), device, **settings)
        device = str(setup.device)
        peak = peak_tflops(device_name(device), peak)
        progress(f"train: set up {model} at {setup.size} px on {device}")
        rows, extra = _rows(setup, acc, steps, checkpointing, peak, progress)
    cfg = setup.cfg
    return {"benchmark": "train", "model": model, "device": device, "device_name": device_name(device),
            "dtype": str(setup.dtype).replace("torch.", ""), "size": setup.size, "steps": steps,
            "batch": f"{cfg.batch_size} instance + {cfg.batch_size} prior", "grad_accum": cfg.grad_accum,
            "cache_prior": cfg.cache_prior, "compile_unet": cfg.compile_unet, "cuda_graph": cfg.cuda_graph,
            "peak_tflops": peak, "trainable_params": sum(p.numel() for p in setup.flow.trainable()),
            **extra, "rows": rows, "env": environment()}
