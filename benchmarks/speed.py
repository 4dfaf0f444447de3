"""Benchmarks: ours against the stock diffusers pipeline, side by side in one process.

Timings are medians over repeats, stock and ours alternating, after one warm-up each. Results are
machine-readable (JSON + CSV); ``docs/RESULTS.md`` holds measured tables with their commands.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import slim
from benchmarks.counters import SavedBytes
from latexblend.bank.format import ConceptBank
from latexblend.device import (
    count_tflop,
    device_name,
    environment,
    resolve_device,
    synchronize,
    timed,
)
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

    return load_pipeline(slim.resolve(model), device=device, dtype=dtype)


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


def rounds(repeats: int, runs: Callable[[bool], list[tuple[str, Callable[[], tuple[float, float]]]]]
           ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The timing loop of every comparison: ``repeats + 1`` rounds of ``runs(warm_up)`` (named calls
    returning ``(seconds, peak GiB)``) in the order given, round 0 the untimed warm-up. Returns the
    seconds of the timed rounds and the largest peak, per name."""
    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for rep in range(repeats + 1):
        for key, run in runs(rep == 0):
            seconds, peak = run()
            if rep:
                times.setdefault(key, []).append(seconds)
                peaks[key] = max(peaks.get(key, 0.0), peak)
    return times, peaks


def bench_generate(model: str = "tiny", counts: Sequence[int] = (0, 1, 4, 8), steps: int = 20, repeats: int = 3,
                   size: int | None = None, device: str | None = None, dtype: str = "auto", cfg: float = 6.0) -> dict:
    """Time blended generation with N concepts against the stock pipeline on the same prompt and seed."""
    from latexblend.blend.blender import apply

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
            return timed(call, device)

    def runs(warm_up: bool):  # stock, ours, stock again (the A/A noise floor) per count
        return [run for n in counts for run in ((f"stock@{n}", lambda: timed(call, device)),
                                                (f"ours@{n}", lambda n=n: ours(n)),
                                                (f"stock_b@{n}", lambda: timed(call, device)))]

    times, peaks = rounds(repeats, runs)
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
    return {"benchmark": "generate", "model": model, "device": device, "device_name": device_name(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": size, "steps": steps, "cfg": cfg,
            "repeats": repeats, "prompt": prompt, "rows": rows, "env": environment()}


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


_GUIDANCE = {"window": 0.8, "step_size": 1.0, "layers": "all"}
_RECTIFY = {"start": 0.8, "clusters": 8}
#: bench_modes: Blender keyword arguments per mode, at the release's settings (METHOD sections 5, 6), with the
#: default CUDA graphs (``auto``: the guidance passes and the rectified steps), all steps graphed, or none.
MODES = {
    "plain": {},
    "guidance": {"guidance": _GUIDANCE},
    "guidance_ckpt": {"guidance": {**_GUIDANCE, "checkpointing": True}},
    "rectify": {"rectify": _RECTIFY},
    "plain_graphs": {"graphs": "all"},
    "guidance_eager": {"guidance": _GUIDANCE, "graphs": "off"},
    "rectify_eager": {"rectify": _RECTIFY, "graphs": "off"},
}
#: The modes measured by default (the last three differ from others only in their CUDA graphs: on a GPU).
DEFAULT_MODES = ("plain", "guidance", "guidance_ckpt", "rectify")
#: Modes whose arithmetic is another mode's (only their CUDA graphs differ): FLOPs counted once.
SAME_FLOPS = {"plain_graphs": "plain", "guidance_eager": "guidance", "rectify_eager": "rectify"}


def _steering_columns(stats: dict | None) -> dict:
    stats = stats or {}
    saved = stats.get("guidance_saved_bytes")
    return {"guided_steps": stats.get("guidance_passes"), "rectify_passes": stats.get("rectify_passes"),
            "guidance_saved_mib": round(saved / 2**20, 2) if saved else None,
            "graphs": "{graphs} used, {refused} refused".format(**stats["graphs"]) if stats.get("graphs") else None}


def _profiled(fn: Callable[[], object], device: str, path: Path) -> None:
    """Write the torch.profiler operator table of one call to ``path`` (sorted by device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=60)
    write_text_atomic(path, table + "\n")


def timed_memory(fn: Callable[[], object], device: str) -> dict:
    """Seconds of one call and its peak memory (GiB) allocated and reserved (CUDA; 0 elsewhere): a CUDA
    graph's memory is reserved for it, not allocated again at each replay."""
    seconds, alloc = timed(fn, device)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.startswith("cuda") else 0.0
    return {"s": seconds, "alloc": alloc, "reserved": reserved}


def _mode_warm_up(blender, call: Callable[[], object], device: str, profile: Path | None,
                  counted: dict | None = None) -> dict:
    """The untimed calls of one mode: the first counts FLOPs and saved activations with graphs off (their
    replays would escape the counting; ``counted``: the same mode's counts, taken instead), the next two
    let the graphs warm up and be captured."""
    mode = blender.graph_mode
    blender.use_graphs("off")
    if counted is None:
        with SavedBytes(blender.pipe.unet) as saved:
            tflop = count_tflop(call)
        counted = {"tflop": tflop, "guidance_saved_bytes": saved.nbytes}
    else:
        call()
    stats = {**{k: counted[k] for k in ("tflop", "guidance_saved_bytes")},
             **(dict(blender.steering.stats) if blender.steering is not None else {})}
    blender.use_graphs(mode)
    if blender.graphs is not None:
        call()
        call()
        stats["graphs"] = {**blender.graphs.stats(), "events": list(blender.graphs.events)}
    if profile is not None:
        _profiled(call, device, profile)
    return stats


def bench_modes(model: str = "tiny", counts: Sequence[int] = (2, 4), steps: int = 20, repeats: int = 3,
                size: int | None = None, device: str | None = None, dtype: str = "auto", cfg: float = 6.0,
                modes: Sequence[str] = DEFAULT_MODES, profile_dir: str | Path | None = None,
                progress: Callable[[str], None] = lambda line: None,
                profile_modes: Sequence[str] | None = None) -> dict:
    """Time and peak memory of plain blending, guidance and rectification (:data:`MODES`) against the stock
    pipeline with N concepts, in one process: per count, stock, then each mode (one Blender per mode, so its
    CUDA graphs serve every call), then stock again (the A/A noise floor), each timed ``repeats`` times after
    untimed warm-up calls.

    The warm-up also counts each generation's FLOPs (``tflop``, ``flop_vs_plain``: what a mode costs in
    arithmetic, free of timing noise) and ``guidance_saved_mib``, the activations autograd keeps for the
    guidance pass's backward (weights excluded; any device), the part of its memory that checkpointing
    reduces. ``profile_dir``: also write one profiler table per mode (of ``profile_modes``, default all) there.
    ``progress``: a line per mode.
    """
    from latexblend.blend.blender import apply

    check_counts(steps=steps, repeats=repeats)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise LatexBlendError(f"unknown mode {', '.join(unknown) or '(none given)'}; modes: {', '.join(MODES)}")
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
    times: dict[str, list[dict]] = {}
    for n in counts:
        prompt = " and ".join(f"a {noun}" for noun in NOUNS[:n])
        stats[f"stock_b@{n}"] = {"tflop": count_tflop(lambda p=prompt: call(p))}
        times[f"stock@{n}"] = [timed_memory(lambda p=prompt: call(p), device) for _ in range(repeats)]
        for mode in modes:
            with apply(pipe, banks[:n], **MODES[mode]) as blender:
                profile = Path(profile_dir) / f"profile_{mode}_{n}.txt" if profile_dir is not None and (
                    profile_modes is None or mode in profile_modes) else None
                stats[f"{mode}@{n}"] = _mode_warm_up(blender, lambda p=prompt: call(p), device, profile,
                                                     stats.get(f"{SAME_FLOPS.get(mode)}@{n}"))
                times[f"{mode}@{n}"] = [timed_memory(lambda p=prompt: call(p), device) for _ in range(repeats)]
            seconds = statistics.median(t["s"] for t in times[f"{mode}@{n}"])
            progress(f"modes: {mode} with {n} concepts done, {seconds:.3f} s per call")
        times[f"stock_b@{n}"] = [timed_memory(lambda p=prompt: call(p), device) for _ in range(repeats)]
    return {"benchmark": "modes", "model": model, "device": device, "device_name": device_name(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": size, "steps": steps, "cfg": cfg,
            "repeats": repeats, "modes": {m: MODES[m] for m in modes},
            "graph_events": {k: v["graphs"]["events"] for k, v in stats.items() if v.get("graphs")},
            "rows": _mode_rows(counts, modes, times, stats), "env": environment()}


def _mode_rows(counts, modes, times, stats) -> list[dict]:
    rows = []
    for n in counts:
        med = {m: statistics.median(t["s"] for t in times[f"{m}@{n}"]) for m in ("stock", "stock_b", *modes)}
        peak = {m: max(t["alloc"] for t in times[f"{m}@{n}"]) for m in ("stock", "stock_b", *modes)}
        reserved = {m: max(t["reserved"] for t in times[f"{m}@{n}"]) for m in ("stock", "stock_b", *modes)}
        plain_tflop = stats.get(f"plain@{n}", {}).get("tflop")
        for m in ("stock_b", *modes):
            tflop = stats.get(f"{m}@{n}", {}).get("tflop")
            rows.append({"concepts": n, "mode": "stock (A/A)" if m == "stock_b" else m, "seconds": round(med[m], 4),
                         "vs_stock": round(med[m] / med["stock"], 4),
                         "vs_plain": round(med[m] / med["plain"], 4) if "plain" in med else None,
                         "peak_gib": round(peak[m], 3), "reserved_gib": round(reserved[m], 3),
                         "stock_peak_gib": round(peak["stock"], 3),
                         "tflop": round(tflop, 6) if tflop is not None else None,
                         "flop_vs_plain": round(tflop / plain_tflop, 4) if tflop and plain_tflop else None,
                         **_steering_columns(stats.get(f"{m}@{n}"))})
    return rows


# --------------------------------------------------------------------------- extraction


def bench_extract(model: str = "tiny", device: str | None = None, repeats: int = 3) -> dict:
    """Wall time of Stage 2 (one text-side pass: encode, project, keep the span) and the bank's size."""
    import tempfile

    from benchmarks.setups import train_setup
    from latexblend.bank.extract import extract_bank
    from latexblend.bank.format import save_bank
    from latexblend.text import pipeline_text_side

    check_counts(repeats=repeats)
    device = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        setup, _ = train_setup(model, None, Path(tmp), device)
        device = str(setup.device)
        toks, encs = pipeline_text_side(setup.pipe)
        weights = setup.flow.weights()

        def extract():
            return extract_bank(toks, encs, weights, name="bench", class_noun="dog", token_id=setup.flow.token_id,
                                prompt="photo of <new1> dog", base_model=model, fingerprint=setup.fingerprint,
                                training={}, dtype=torch.float16)

        extract()  # warm-up
        times = [timed(extract, device)[0] for _ in range(repeats)]
        path = save_bank(extract(), Path(tmp) / "bench.safetensors")
        size = path.stat().st_size
    return {"benchmark": "extract", "model": model, "device": device, "device_name": device_name(device),
            "rows": [{"extract_s": round(statistics.median(times), 4), "bank_bytes": size,
                      "bank_mb": round(size / 1e6, 4), "bank_dtype": "float16"}], "env": environment()}
