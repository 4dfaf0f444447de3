"""Benchmarks: ours against the stock diffusers pipeline, side by side in one process.

Timings are medians over repeats, stock and ours alternating, after one warm-up each. Results are
machine-readable (JSON + CSV); ``docs/BENCHMARKS.md`` holds measured tables with their commands.
"""

from __future__ import annotations

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
from latexblend.fileio import write_text_atomic

NOUNS = ["dog", "cat", "car", "tree", "house", "cup", "boat", "bird"]


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
    from latexblend.generate import apply

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


def bench_modes(model: str = "tiny", counts: Sequence[int] = (2, 4), steps: int = 20, repeats: int = 3,
                size: int | None = None, device: str | None = None, dtype: str = "auto", cfg: float = 6.0,
                modes: Sequence[str] = tuple(MODES)) -> dict:
    """Time and peak memory of plain blending, guidance and rectification against the stock pipeline,
    with N concepts, in one process (stock / each mode / stock again per round, after a warm-up round).

    ``guidance_saved_mib``: activations autograd keeps for the guidance pass's backward (weights
    excluded; any device), the part of its memory that checkpointing reduces.
    """
    from latexblend.generate import apply

    pipe = bench_pipeline(model, device, dtype)
    device = str(pipe.unet.device)
    size = size or pipe.default_sample_size * pipe.vae_scale_factor
    banks = random_banks(pipe, max(counts))

    def call(prompt):
        g = torch.Generator(device="cpu").manual_seed(0)
        pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, generator=g,
             output_type="latent")

    saved: dict[str, float] = {}

    def ours(n: int, mode: str, prompt: str):
        with apply(pipe, banks[:n], **MODES[mode]) as blender:
            result = _timed(lambda: call(prompt), device)
            if blender.steering is not None:
                saved[f"{mode}@{n}"] = dict(blender.steering.stats)
            return result

    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for rep in range(repeats + 1):  # repeat 0 is the warm-up
        for n in counts:
            prompt = " and ".join(f"a {noun}" for noun in NOUNS[:n])
            runs = [("stock", lambda p=prompt: _timed(lambda: call(p), device))]
            runs += [(m, lambda n=n, m=m, p=prompt: ours(n, m, p)) for m in modes]
            runs += [("stock_b", lambda p=prompt: _timed(lambda: call(p), device))]  # the A/A noise floor
            for mode, run in runs:
                seconds, peak = run()
                if rep:
                    times.setdefault(f"{mode}@{n}", []).append(seconds)
                    peaks[f"{mode}@{n}"] = max(peaks.get(f"{mode}@{n}", 0.0), peak)
    rows = []
    for n in counts:
        med = {m: statistics.median(times[f"{m}@{n}"]) for m in ("stock", "stock_b", *modes)}
        for m in ("stock_b", *modes):
            rows.append({"concepts": n, "mode": "stock (A/A)" if m == "stock_b" else m, "seconds": round(med[m], 4),
                         "vs_stock": round(med[m] / med["stock"], 4),
                         "vs_plain": round(med[m] / med["plain"], 4) if "plain" in med else None,
                         "peak_gib": round(peaks[f"{m}@{n}"], 3), "stock_peak_gib": round(peaks[f"stock@{n}"], 3),
                         **_steering_columns(saved.get(f"{m}@{n}"))})
    return {"benchmark": "modes", "model": model, "device": device, "device_name": _device_name(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": size, "steps": steps, "cfg": cfg,
            "repeats": repeats, "modes": {m: MODES[m] for m in modes}, "rows": rows, "env": _env()}
