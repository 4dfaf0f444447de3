"""Benchmarks: ours against the stock diffusers pipeline, side by side in one process.

Timings are medians over repeats, stock and ours alternating, after one warm-up each. Results are
machine-readable (JSON + CSV); ``docs/BENCHMARKS.md`` holds measured tables with their commands.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from latexblend import __version__
from latexblend.bank import ConceptBank
from latexblend.errors import LatexBlendError
from latexblend.fileio import write_text_atomic

NOUNS = ["dog", "cat", "car", "tree", "house", "cup", "boat", "bird"]


def check_counts(**counts: int) -> None:
    """Steps and repeats of a benchmark: each at least 1 (one clear error before anything is loaded)."""
    for key, value in counts.items():
        if value < 1:
            raise LatexBlendError(f"--{key} must be at least 1, got {value}")


def bench_pipeline(model: str, device: str | None, dtype: str):
    """``sdxl-random`` (full SDXL architecture, random weights, built on the device) or any ``--model``."""
    from latexblend.models import load_pipeline

    return load_pipeline(model, device=device, dtype=dtype)


def random_banks(pipe, count: int, seed: int = 0) -> list[ConceptBank]:
    """``count`` banks with random rows (std of the model's own K rows) for the first nouns of :data:`NOUNS`."""
    from latexblend.models import attn2_shapes, fingerprint
    from latexblend.tokens import token_ids

    g = torch.Generator().manual_seed(seed)
    fp = fingerprint(pipe.unet).to_json()
    banks = []
    for i, noun in enumerate(NOUNS[:count]):
        ids = token_ids(pipe.tokenizer, noun)
        shapes = attn2_shapes(pipe.unet)
        k = {n: torch.randn(1 + len(ids), c, generator=g) for n, c in shapes.items()}
        v = {n: torch.randn(1 + len(ids), c, generator=g) for n, c in shapes.items()}
        banks.append(ConceptBank(name=f"bench{i}", class_noun=noun, noun_ids=ids, k=k, v=v, fingerprint=fp))
    return banks


def _timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(seconds, peak GiB on CUDA or 0) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30
    return time.perf_counter() - start, 0.0


def bench_generate(model: str = "tiny", counts: Sequence[int] = (0, 1, 4, 8), steps: int = 20, repeats: int = 3,
                   size: int | None = None, device: str | None = None, dtype: str = "auto", cfg: float = 6.0) -> dict:
    """Time blended generation with N concepts against the stock pipeline on the same prompt and seed."""
    from latexblend.blend import apply

    check_counts(steps=steps, repeats=repeats)
    pipe = bench_pipeline(model, device, dtype)
    device = str(pipe.unet.device)
    size = size or pipe.default_sample_size * pipe.vae_scale_factor
    prompt = ", ".join(f"a {noun}" for noun in NOUNS)
    banks = random_banks(pipe, max(counts))

    def call():
        g = torch.Generator(device="cpu").manual_seed(0)
        pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, generator=g,
             output_type="latent")

    def ours(n: int):
        with apply(pipe, banks[:n]):
            return _timed(call, device)

    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for rep in range(repeats + 1):  # repeat 0 is the warm-up
        for n in counts:
            runs = ((f"stock@{n}", lambda: _timed(call, device)), (f"ours@{n}", lambda n=n: ours(n)),
                    (f"stock_b@{n}", lambda: _timed(call, device)))  # stock again: the A/A noise floor
            for key, run in runs:
                seconds, peak = run()
                if rep:
                    times.setdefault(key, []).append(seconds)
                    peaks[key] = max(peaks.get(key, 0.0), peak)
    rows = []
    for n in counts:
        stock_s, ours_s = statistics.median(times[f"stock@{n}"]), statistics.median(times[f"ours@{n}"])
        stock_b = statistics.median(times[f"stock_b@{n}"])
        rows.append({
            "concepts": n, "stock_s": round(stock_s, 6), "ours_s": round(ours_s, 6),
            "ratio": round(ours_s / stock_s, 4), "stock_aa_ratio": round(stock_b / stock_s, 4),
            "ours_it_s": round(steps / ours_s, 2), "stock_peak_gib": round(peaks[f"stock@{n}"], 3),
            "ours_peak_gib": round(peaks[f"ours@{n}"], 3),
        })
    base = next((r["ours_s"] for r in rows if r["concepts"] == 1), None)
    for r in rows:
        r["vs_1_concept"] = round(r["ours_s"] / base, 4) if base else None
    return {"benchmark": "generate", "model": model, "device": device, "device_name": _device_name(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": size, "steps": steps, "cfg": cfg,
            "repeats": repeats, "prompt": prompt, "rows": rows, "env": _env()}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _env() -> dict:
    import diffusers
    import transformers

    return {"latexblend": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def write_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``out`` (.json) and the same rows as CSV beside it."""
    out = Path(out)
    write_text_atomic(out, json.dumps(result, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result["rows"][0]))
    writer.writeheader()
    writer.writerows(result["rows"])
    csv_path = out.with_suffix(".csv")
    write_text_atomic(csv_path, buf.getvalue())
    return out, csv_path


def format_table(result: dict) -> str:
    """The rows as a Markdown table."""
    keys = list(result["rows"][0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in result["rows"]]
    return "\n".join(lines)


#: bench_modes: Blender keyword arguments per mode, at the release's settings (METHOD sections 5, 6).
MODES = {
    "plain": {},
    "guidance": {"guidance": {"window": 0.8, "step_size": 1.0, "layers": "all"}},
    "guidance_ckpt": {"guidance": {"window": 0.8, "step_size": 1.0, "layers": "all", "checkpointing": True}},
    "rectify": {"rectify": {"start": 0.8, "clusters": 8}},
}


def _steering_columns(stats: dict | None) -> dict:
    stats = stats or {}
    saved = stats.get("guidance_saved_bytes")
    return {"guided_steps": stats.get("guidance_passes"), "rectify_passes": stats.get("rectify_passes"),
            "guidance_saved_mib": round(saved / 2**20, 2) if saved else None}


def count_tflop(fn: Callable[[], object], device: str) -> float:
    """TFLOP of one call (``torch.utils.flop_counter``: matmuls, convolutions and attention, forward and
    backward); a measurement pass, slower than an uncounted call. On the CPU, SDPA runs as its math
    decomposition while counting: the counter has no formula for the CPU's fused attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math = sdpa_kernel(SDPBackend.MATH) if device.startswith("cpu") else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, math:
        fn()
    return counter.get_total_flops() / 1e12


def _profiled(fn: Callable[[], object], device: str, path: Path) -> None:
    """Write the torch.profiler operator table of one call to ``path`` (sorted by device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=60)
    write_text_atomic(path, table + "\n")


def bench_modes(model: str = "tiny", counts: Sequence[int] = (2, 4), steps: int = 20, repeats: int = 3,
                size: int | None = None, device: str | None = None, dtype: str = "auto", cfg: float = 6.0,
                modes: Sequence[str] = tuple(MODES), profile_dir: str | Path | None = None) -> dict:
    """Time and peak memory of plain blending, guidance and rectification against the stock pipeline,
    with N concepts, in one process (stock / each mode / stock again per round, after a warm-up round).

    The untimed warm-up round also counts each generation's FLOPs (``tflop``, ``flop_vs_plain``: what a
    mode costs in arithmetic, free of timing noise) and ``guidance_saved_mib``, the activations
    autograd keeps for the guidance pass's backward (weights excluded; any device), the part of its
    memory that checkpointing reduces. ``profile_dir``: also write one profiler table per mode there.
    """
    from latexblend.blend import apply

    check_counts(steps=steps, repeats=repeats)
    if profile_dir is not None and Path(profile_dir).exists() and not Path(profile_dir).is_dir():
        raise LatexBlendError(f"--profile {profile_dir} exists and is not a folder")
    pipe = bench_pipeline(model, device, dtype)
    device = str(pipe.unet.device)
    size = size or pipe.default_sample_size * pipe.vae_scale_factor
    banks = random_banks(pipe, max(counts))

    def call(prompt):
        g = torch.Generator(device="cpu").manual_seed(0)
        pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, generator=g,
             output_type="latent")

    stats: dict[str, dict] = {}

    def ours(n: int, mode: str, prompt: str, warm_up: bool):
        with apply(pipe, banks[:n], **MODES[mode]) as blender:
            if not warm_up:
                return _timed(lambda: call(prompt), device)
            if blender.steering is not None:  # the warm-up counts (untimed: the counting costs time)
                blender.steering.count_saved = True
            stats[f"{mode}@{n}"] = {"tflop": count_tflop(lambda: call(prompt), device),
                                    **(blender.steering.stats if blender.steering is not None else {})}
            if profile_dir is not None:
                _profiled(lambda: call(prompt), device, Path(profile_dir) / f"profile_{mode}_{n}.txt")
            return 0.0, 0.0

    def stock_b(n: int, prompt: str, warm_up: bool):
        if not warm_up:
            return _timed(lambda: call(prompt), device)
        stats[f"stock_b@{n}"] = {"tflop": count_tflop(lambda: call(prompt), device)}
        return 0.0, 0.0

    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for rep in range(repeats + 1):  # repeat 0 is the warm-up
        for n in counts:
            prompt = " and ".join(f"a {noun}" for noun in NOUNS[:n])
            runs = [("stock", lambda p=prompt: _timed(lambda: call(p), device))]
            runs += [(m, lambda n=n, m=m, p=prompt, w=rep == 0: ours(n, m, p, w)) for m in modes]
            runs += [("stock_b", lambda n=n, p=prompt, w=rep == 0: stock_b(n, p, w))]  # the A/A noise floor
            for mode, run in runs:
                seconds, peak = run()
                if rep:
                    times.setdefault(f"{mode}@{n}", []).append(seconds)
                    peaks[f"{mode}@{n}"] = max(peaks.get(f"{mode}@{n}", 0.0), peak)
    return {"benchmark": "modes", "model": model, "device": device, "device_name": _device_name(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": size, "steps": steps, "cfg": cfg,
            "repeats": repeats, "modes": {m: MODES[m] for m in modes},
            "rows": _mode_rows(counts, modes, times, peaks, stats), "env": _env()}


def _mode_rows(counts, modes, times, peaks, stats) -> list[dict]:
    rows = []
    for n in counts:
        med = {m: statistics.median(times[f"{m}@{n}"]) for m in ("stock", "stock_b", *modes)}
        plain_tflop = stats.get(f"plain@{n}", {}).get("tflop")
        for m in ("stock_b", *modes):
            tflop = stats.get(f"{m}@{n}", {}).get("tflop")
            rows.append({"concepts": n, "mode": "stock (A/A)" if m == "stock_b" else m, "seconds": round(med[m], 4),
                         "vs_stock": round(med[m] / med["stock"], 4),
                         "vs_plain": round(med[m] / med["plain"], 4) if "plain" in med else None,
                         "peak_gib": round(peaks[f"{m}@{n}"], 3), "stock_peak_gib": round(peaks[f"stock@{n}"], 3),
                         "tflop": round(tflop, 6) if tflop is not None else None,
                         "flop_vs_plain": round(tflop / plain_tflop, 4) if tflop and plain_tflop else None,
                         **_steering_columns(stats.get(f"{m}@{n}"))})
    return rows


# --------------------------------------------------------------------------- training and extraction

#: dense bf16 peak of the datasheet, TFLOP/s, for FLOP utilisation (MFU)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def _peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def _train_setup(model: str, size: int | None, device: str, tmp: Path, **overrides):
    """A training :class:`~latexblend.train.Setup` on procedural images (instance: disc, prior: towers)."""
    from latexblend.config import TrainConfig
    from latexblend.data import load_prior
    from latexblend.synthetic import draw_concept
    from latexblend.train import build_setup, check_inputs

    draw_concept(tmp / "inst", "disc", num=4, size=256)
    draw_concept(tmp / "prior", "towers", num=4, size=256, seed=1)
    cfg = TrainConfig(name="bench", images=str(tmp / "inst"), class_noun="dog", prior=str(tmp / "prior"),
                      model=model, resolution=size, **overrides)
    images, _ = check_inputs(cfg)
    prior = load_prior(tmp / "prior", "dog")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return build_setup(cfg, images, prior, device, dtype), dtype


def _train_rows(setup, dtype: torch.dtype, device: str, steps: int, compile_unet: bool = False) -> list[dict]:
    """A row per gradient-checkpointing setting (FLOPs counted once, on the first step, uncompiled), in the
    steady state of a long run: the prior cache filled first. ``warmup_s``: the untimed first step of a
    setting (with ``compile_unet``, the compilation)."""
    from torch.utils.flop_counter import FlopCounterMode

    from latexblend import train

    optimizer = torch.optim.AdamW(setup.parameters(), lr=1e-5)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        train.fill_prior_cache(setup)

    def one(step: int) -> None:
        with autocast:
            loss = train.step_loss(setup, step)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        one(0)
    flops = counter.get_total_flops()
    if compile_unet:
        train.compile_unet(setup.pipe.unet)
    rows, peak_tflops = [], _peak_tflops(_device_name(device))
    for checkpointing in (False, True):
        unet = setup.pipe.unet
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        warmup, _ = _timed(lambda: one(1), device)
        seconds, peak = _timed(lambda: [one(s) for s in range(2, 2 + steps)], device)
        per_step = seconds / steps
        rows.append({"gradient_checkpointing": checkpointing, "steps_per_s": round(1 / per_step, 3),
                     "samples_per_s": round(2 * setup.cfg.batch_size / per_step, 3),
                     "peak_gib": round(peak, 3), "tflop_per_step": float(f"{flops / 1e12:.4g}"),
                     "mfu": round(flops / per_step / (peak_tflops * 1e12), 4) if peak_tflops else None,
                     "warmup_s": round(warmup, 2)})
    return rows


def bench_train(model: str = "tiny", steps: int = 5, size: int | None = None, device: str | None = None,
                cache_prior: bool = True, compile_unet: bool = False) -> dict:
    """Steps/s, samples/s, peak memory and FLOP utilisation of the dual-flow training step,
    without and with gradient checkpointing (one setup; FLOPs from ``torch.utils.flop_counter``)."""
    import tempfile

    from latexblend.models import resolve_device

    check_counts(steps=steps)
    device = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:  # prior images are read on every cache miss
        setup, dtype = _train_setup(model, size, device, Path(tmp), cache_prior=cache_prior)
        rows = _train_rows(setup, dtype, device, steps, compile_unet)
    trainable = sum(p.numel() for p in setup.parameters())
    return {"benchmark": "train", "model": model, "device": device, "device_name": _device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "size": setup.size, "steps": steps,
            "batch": "1 instance + 1 prior", "cache_prior": cache_prior, "compile_unet": compile_unet,
            "trainable_params": trainable, "rows": rows, "env": _env()}


def bench_extract(model: str = "tiny", device: str | None = None, repeats: int = 3) -> dict:
    """Wall time of Stage 2 (one text-side pass: encode, project, keep the span) and the bank's size."""
    import tempfile

    from latexblend.bank import save_bank
    from latexblend.extract import extract_bank
    from latexblend.models import resolve_device

    check_counts(repeats=repeats)
    device = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        setup, _ = _train_setup(model, None, device, Path(tmp))
        pipe = setup.pipe
        toks, encs = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
        weights = setup.weights()

        def extract():
            return extract_bank(toks, encs, weights, name="bench", class_noun="dog", token_id=setup.rows.token_id,
                                prompt="photo of <new1> dog", base_model=model, fingerprint=setup.fingerprint,
                                training={}, dtype=torch.float16)

        extract()  # warm-up
        times = [_timed(extract, device)[0] for _ in range(repeats)]
        path = save_bank(extract(), Path(tmp) / "bench.safetensors")
        size = path.stat().st_size
    return {"benchmark": "extract", "model": model, "device": device, "device_name": _device_name(device),
            "rows": [{"extract_s": round(statistics.median(times), 4), "bank_bytes": size,
                      "bank_mb": round(size / 1e6, 4), "bank_dtype": "float16"}], "env": _env()}
