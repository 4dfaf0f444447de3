"""Stage 1 (METHOD.md section 2): the training loop, nanoGPT style. :func:`train` checks the inputs, builds
the run (:func:`~latexblend.train.setup.build_setup`), then loops over
:func:`~latexblend.train.step.train_step` with a log line every ``log_every`` steps (loss, steps/s, FLOP
utilisation, peak memory), checkpoints, and at the end writes the weights, ``run.json`` and the concept's
bank (Stage 2, no separate step). Every random draw of step ``s`` comes from a generator seeded by
``(seed, s, process)``, so resuming needs only the weights, the optimizer state and the step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from latexblend.bank.extract import bank_dtype, extract_bank
from latexblend.bank.format import SUFFIX, bank_dir, save_bank
from latexblend.console import Progress
from latexblend.device import device_name, environment, mfu, peak_memory, peak_tflops, resolve_mixed_precision
from latexblend.errors import LatexBlendError
from latexblend.settings import to_dict
from latexblend.text import concept_span, pipeline_text_side
from latexblend.tokens import token_ids
from latexblend.train.options import TrainConfig
from latexblend.train.runfolder import (
    NOT_HASHED,
    check_run_folder,
    prune_checkpoints,
    read_checkpoint,
    start_run_folder,
    write_checkpoint,
    write_run_info,
    write_weights,
)
from latexblend.train.runner import Runner
from latexblend.train.setup import Setup, build_setup, check_inputs, compile_unet, schedule
from latexblend.train.step import step_tflop


def accelerator(mixed_precision: str, device: str | None = None):
    """The ``accelerate.Accelerator`` of a training run (on CUDA when available, unless ``device`` is
    ``cpu``; ``auto`` precision: bf16 on CUDA when supported, else fp16; none on the CPU) and the compute
    dtype it implies."""
    cuda = torch.cuda.is_available() and device != "cpu"
    mixed_precision = resolve_mixed_precision(mixed_precision) if cuda or mixed_precision != "auto" else "no"
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=1, cpu=not cuda)
    return acc, {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], lr: float):
    """AdamW: the fused kernel on CUDA and CPU (a handful of ops for all tensors; on the CPU 3.7x faster than
    the default per-tensor loop and 7x the multi-tensor path, ``python -m benchmarks.adamw``), the
    multi-tensor (foreach) path on other devices; 8-bit AdamW with ``use_8bit_adam``."""
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # an optional dependency: only this setting needs it
        except ImportError as err:
            raise LatexBlendError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    if params and params[0].device.type in ("cuda", "cpu"):  # capturable: a CUDA graph may replay it (runner)
        return torch.optim.AdamW(params, fused=True, capturable=params[0].device.type == "cuda", **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


@dataclass
class Meter:
    """Steps/s over the last log window and FLOP utilisation (nanoGPT style): ``tflop`` per step is
    counted once, on the run's first step; ``peak`` is the device's TFLOP/s (``None``: MFU n/a)."""

    peak: float | None
    tflop: float | None = None
    last_step: int = 0
    last_time: float = field(default_factory=time.perf_counter)

    def tick(self, done: int) -> float:
        """Steps/s since the previous tick (the device synchronised by the caller's read of the loss)."""
        now = time.perf_counter()
        rate = (done - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = done, now
        return rate

    def mfu_text(self, rate: float) -> str:
        value = mfu(self.tflop, rate, self.peak)
        return "MFU n/a" if value is None else f"MFU {100 * value:.1f}%"


def train(cfg: TrainConfig, progress: bool = True, on_step=None) -> Path | None:
    """Train one concept; write ``runs/<name>/`` and ``concept_bank/<name>.safetensors``. Returns the run
    folder on the main process (``None`` on the others). ``progress``: a bar on a terminal (log lines either
    way).

    ``on_step(step, losses, setup)`` is called after every optimizer step on every process (``step`` counts
    from 1; ``losses`` as :func:`~latexblend.train.step.train_step` returns them, unread; ``setup.flow``
    holds the trainables). The loss is read (a device sync) only at log steps.
    """
    acc, dtype = accelerator(cfg.mixed_precision)
    images, prior = check_inputs(cfg)
    run, resume_from = check_run_folder(cfg)
    summary_writer = _tensorboard() if cfg.log_tensorboard else None
    plan = schedule(cfg, acc.num_processes, acc.mixed_precision)
    setup = build_setup(cfg, images, prior, acc.device, dtype, plan)
    check_extraction(setup)
    params = setup.flow.trainable()
    optimizer = acc.prepare(make_optimizer(cfg, params, plan.lr))
    start = load_checkpoint(setup, optimizer, resume_from) if resume_from else 0
    main = acc.is_main_process
    bar = Progress(plan.steps, cfg.name, "step", enabled=progress and main, initial=start, lines=False)
    if resume_from and main:
        bar.write(f"resuming from step {start} ({resume_from})")
    if main:
        start_run_folder(cfg, run, resume_from)
    writer = summary_writer(str(run / "tb")) if summary_writer and main else None
    meter = Meter(peak_tflops(device_name(setup.device), cfg.peak_tflops), last_step=start)
    runner = Runner(setup, optimizer, acc, params, log=bar.write if main else lambda line: None)
    t0, loss = time.perf_counter(), float("nan")
    with bar:
        for step in range(start, plan.steps):
            if step == start:
                meter.tflop = step_tflop(setup, acc, step)
                if cfg.compile_unet:
                    compile_unet(setup.pipe.unet, cfg.compile_backend)
            losses = runner.step(step)
            done = step + 1
            bar.update()
            if done % cfg.log_every == 0 or done == plan.steps:
                loss = _log(setup, acc, bar, writer, meter, losses, done)
            if main and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < plan.steps:
                save_checkpoint(setup, optimizer, run, done)
                prune_checkpoints(run, cfg.keep_checkpoints)
            if on_step:
                on_step(done, losses, setup)
    wall = time.perf_counter() - t0
    if main:
        _finish(setup, run, start, wall, loss, meter, runner)
    acc.wait_for_everyone()
    return run if main else None


def _log(setup: Setup, acc, bar: Progress, writer, meter: Meter, losses: torch.Tensor, done: int) -> float:
    """Read the step's losses (the one sync and collective of a log step), write the log line; the loss."""
    loss, inst, prior = acc.reduce(losses, reduction="mean").tolist()
    rate = meter.tick(done)
    bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
    if acc.is_main_process:
        bar.write(f"step {done}/{setup.plan.steps} | loss {loss:.4f} (instance {inst:.4f}, prior {prior:.4f}) | "
                  f"{rate:.2f} steps/s | {meter.mfu_text(rate)} | peak mem {peak_memory(setup.device) / 2**30:.2f} GiB")
        if writer:
            writer.add_scalar("loss", loss, done)
    return loss


def _tensorboard():
    """tensorboard's ``SummaryWriter`` class, or a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # an optional dependency: only this setting needs it
    except ImportError as err:
        raise LatexBlendError("--log-tensorboard needs tensorboard (pip install tensorboard)") from err
    return SummaryWriter


# --------------------------------------------------------------------------- run folder files


def training_summary(setup: Setup) -> dict:
    """How the weights and the bank were trained: every setting that changes what a step computes (those the
    resume check hashes, the instance folder resolved), the schedule and the resolution."""
    cfg, plan = setup.cfg, setup.plan
    settings = {k: v for k, v in to_dict(cfg).items() if k not in NOT_HASHED}
    return {**settings, "images": str(Path(cfg.images).resolve()), "steps": plan.steps, "lr": plan.lr,
            "base_lr": cfg.lr, "num_processes": plan.processes, "resolution": setup.size}


def save_trainables(setup: Setup, folder: Path) -> None:
    """``kv.safetensors`` (attn2 to_k/to_v weights or LoRA factors, fp32) and ``tokens.safetensors``."""
    flow = setup.flow
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in flow.names))
    kv_meta = {"kind": "lora" if flow.rank else "full", "rank": str(flow.rank), "layers": json.dumps(layers),
               "base_fingerprint": setup.fingerprint, "training": json.dumps(training_summary(setup))}
    rows_meta = {"token": setup.cfg.token, "init_token": setup.cfg.init_token, "token_id": str(flow.token_id)}
    write_weights(folder, flow.kv_parameters(), kv_meta, flow.row_tensors(), rows_meta)


def save_checkpoint(setup: Setup, optimizer, run: Path, step: int) -> Path:
    """``run/checkpoints/step_<step>/``: trainables, optimizer state (tensors and numbers only), state.json."""
    return write_checkpoint(run, step, lambda folder: save_trainables(setup, folder), optimizer.state_dict(),
                            setup.cfg)


def load_checkpoint(setup: Setup, optimizer, folder: Path) -> int:
    """Restore trainables and optimizer state from ``folder``; returns the step to continue from."""
    step, kv, rows, state = read_checkpoint(folder, setup.cfg)
    setup.flow.load(kv, rows)
    optimizer.load_state_dict(flat_optimizer_state(state, setup.flow))
    return step


def flat_optimizer_state(state: dict, flow) -> dict:
    """An optimizer state saved when each ``to_k``/``to_v`` weight was its own parameter (one entry per weight,
    then the rows), as the flat weight's one entry: each state tensor's rows concatenated in order. Any
    other state is returned as it is."""
    group = state["param_groups"][0]
    kv = len(flow.names)
    if flow.weight is None or len(state["param_groups"]) != 1 or len(group["params"]) != kv + len(flow.rows):
        return state
    per = [state["state"][i] for i in group["params"][:kv] if i in state["state"]]
    merged = {}
    if per:
        merged[0] = {k: (per[0][k] if per[0][k].dim() == 0 else torch.cat([p[k] for p in per])) for k in per[0]}
    for j, i in enumerate(group["params"][kv:], start=1):
        if i in state["state"]:
            merged[j] = state["state"][i]
    return {"state": merged, "param_groups": [{**group, "params": list(range(1 + len(flow.rows)))}]}


def _finish(setup: Setup, run: Path, start: int, wall: float, loss: float, meter: Meter, runner: Runner) -> None:
    """Final weights, the bank (Stage 2, no separate step), and ``run.json``: the run's schedule and measured
    numbers, its resolved settings under ``config``. Should the bank fail to be written (a full disk), the
    weights are kept and the error says how to write it from them."""
    cfg, plan = setup.cfg, setup.plan
    save_trainables(setup, run)
    rate = (plan.steps - start) / wall if wall > 0 else None
    measured = {"start_step": start, "steps_per_s": rate, "wall_s": wall, "tflop_per_step": meter.tflop,
                "mfu": mfu(meter.tflop, rate, meter.peak) if rate else None,
                "peak_memory_bytes": peak_memory(setup.device), "final_loss": loss, "step_path": runner.path,
                "step_path_note": runner.note, "capture_s": runner.capture_s}
    info = {"versions": environment(), "device": device_name(setup.device), "num_processes": plan.processes,
            "mixed_precision": plan.mixed_precision, "steps": plan.steps, "lr": plan.lr, **measured,
            "bank": None, "config": {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")}}
    try:
        info["bank"] = str(save_bank(_bank(setup, loss), bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}"))
    except (LatexBlendError, OSError) as err:
        write_run_info(run, info)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise LatexBlendError(f"trained '{cfg.name}' (its weights are in {run}/) but could not write its bank: "
                              f"{reason}; fix that, then run `latexblend extract --run {run}`") from err
    write_run_info(run, info)


def _bank(setup: Setup, loss: float):
    """The concept's bank, read from the trained weights (Stage 2)."""
    cfg, pipe = setup.cfg, setup.pipe
    toks, encs = pipeline_text_side(pipe)
    return extract_bank(toks, encs, setup.flow.weights(), name=cfg.name, class_noun=cfg.class_noun,
                        token_id=setup.flow.token_id, prompt=extraction_prompt(cfg), base_model=cfg.model,
                        fingerprint=setup.fingerprint, training={**training_summary(setup), "final_loss": loss},
                        dtype=bank_dtype(cfg.bank_dtype, pipe.device, setup.dtype))


def extraction_prompt(cfg: TrainConfig) -> str:
    return cfg.extract_prompt.format(token=cfg.token, noun=cfg.class_noun)


def check_extraction(setup: Setup) -> None:
    """The bank can be extracted from this run (its extraction prompt holds the identifier right before the
    class noun, and the bank dtype is known here): checked before step 0, not after the training."""
    cfg, pipe = setup.cfg, setup.pipe
    bank_dtype(cfg.bank_dtype, pipe.device, setup.dtype)
    noun_ids = token_ids(pipe.tokenizer, cfg.class_noun)
    try:
        concept_span(pipe.tokenizer, extraction_prompt(cfg), setup.flow.token_id, noun_ids)
    except LatexBlendError as err:
        raise LatexBlendError(f"extract_prompt {extraction_prompt(cfg)!r} cannot be used: {err}") from None
