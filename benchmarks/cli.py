"""``python -m benchmarks COMMAND``: the benchmarks the README's and docs/RESULTS.md's figures come from.

Run from the repository root (``benchmarks/`` is not installed with the package). Each command writes
machine-readable results (JSON, CSV beside it) and prints a table; bad options are one ``error:`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latexblend.cli import _quiet_libraries, friendly
from latexblend.errors import LatexBlendError

app = typer.Typer(name="benchmarks", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Benchmarks against the stock diffusers pipeline, and the toy fidelity "
                                              "benchmark.")


def _counts(concepts: str, lo: int, hi: int) -> list[int]:
    """``--concepts`` of a benchmark: comma-separated integers in ``[lo, hi]``."""
    try:
        counts = [int(c) for c in concepts.split(",") if c.strip()]
    except ValueError as err:
        raise LatexBlendError(f"--concepts takes comma-separated integers, got '{concepts}'") from err
    if not counts or min(counts) < lo or max(counts) > hi:
        raise LatexBlendError(f"--concepts counts must be between {lo} and {hi}")
    return counts


BenchModelOpt = Annotated[
    str, typer.Option(help="'tiny', 'sdxl-random' (full SDXL, random weights), a folder or hub id.")
]
BenchOutOpt = Annotated[Path, typer.Option(help="JSON output (CSV written beside it).")]
BenchSizeOpt = Annotated[int | None, typer.Option(help="Image side in px (default: the model's).")]


def _bench_report(result: dict, out: Path) -> None:
    """Write a benchmark's JSON and CSV, print its table and what it ran on."""
    from benchmarks.speed import format_table, write_results

    json_path, csv_path = write_results(result, out)
    typer.echo(format_table(result))
    units = (("dtype", ""), ("size", " px"), ("steps", " steps"))
    details = [f"{result[k]}{unit}" for k, unit in units if k in result]
    typer.echo(f"{', '.join([result['device_name'], *details])}; wrote {json_path} and {csv_path}")


@app.command("generate")
@friendly
def bench_generate_cmd(
    model: BenchModelOpt = "tiny",
    concepts: Annotated[str, typer.Option(help="Comma-separated concept counts.")] = "0,1,4,8",
    steps: int = 20,
    repeats: int = 3,
    size: BenchSizeOpt = None,
    device: str | None = None, dtype: str = "auto",
    out: BenchOutOpt = Path("bench_generate.json"),
) -> None:
    """Blended generation with N concepts vs the stock pipeline (same prompt, seed, settings)."""
    counts = _counts(concepts, 0, 8)
    _quiet_libraries()
    from benchmarks.speed import bench_generate

    _bench_report(bench_generate(model, counts, steps=steps, repeats=repeats, size=size, device=device, dtype=dtype),
                  out)


@app.command("train")
@friendly
def bench_train_cmd(
    model: BenchModelOpt = "tiny",
    steps: Annotated[int, typer.Option(help="Timed steps per setting.")] = 5,
    size: Annotated[int | None, typer.Option(help="Training resolution [512, tiny: 64].")] = None,
    device: str | None = None,
    no_cache_prior: Annotated[bool, typer.Option("--no-cache-prior", help="Encode prior data every step.")] = False,
    compile_unet: Annotated[bool, typer.Option("--compile-unet", help="torch.compile the UNet.")] = False,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend of --compile-unet.")] = "inductor",
    cuda_graph: Annotated[str, typer.Option(help="Each step as one CUDA graph: auto (on CUDA), on or off.")] = "auto",
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Instance (and prior) images per micro-batch.")] = 1,
    checkpointing: Annotated[str, typer.Option(
        help="Gradient checkpointing settings to time: off, on or both.")] = "both",
    peak_tflops: Annotated[float | None, typer.Option(
        help="The device's peak TFLOP/s for MFU [known GPUs: datasheet bf16; CPU: n/a].")] = None,
    out: BenchOutOpt = Path("bench_train.json"),
) -> None:
    """Training step vs a stock diffusers Custom-Diffusion step: time, operators, memory, FLOPs, utilisation."""
    settings = {"off": (False,), "on": (True,), "both": (False, True)}
    if steps < 1 or grad_accum < 1 or batch_size < 1:
        raise LatexBlendError("--steps, --grad-accum and --batch-size must be at least 1")
    if checkpointing not in settings:
        raise LatexBlendError(f"--checkpointing must be off, on or both, got '{checkpointing}'")
    _quiet_libraries()
    from benchmarks.train_bench import bench_train

    _bench_report(bench_train(model, steps=steps, size=size, device=device, cache_prior=not no_cache_prior,
                              compile_unet=compile_unet, compile_backend=compile_backend, cuda_graph=cuda_graph,
                              grad_accum=grad_accum,
                              batch_size=batch_size,
                              checkpointing=settings[checkpointing], peak=peak_tflops,
                              progress=lambda line: typer.echo(line, err=True)), out)


@app.command("fidelity")
@friendly
def bench_fidelity_cmd(
    model: Annotated[str, typer.Option(help="Only 'toy' (its exact detectors score the images).")] = "toy",
    concepts: Annotated[str, typer.Option(help="Comma-separated toy concepts.")] = "patchdog,stripecar",
    variants: Annotated[str, typer.Option(help="Method variants (no bank and the concept in words always "
                                               "run): full, no-base-flow, fixed-template, release-loss-weights, "
                                               "fixed-time-ids, bind-always, no-bind, enlarge, guidance, rectify, "
                                               "guidance-rectify (blending-only variants also get a two-concept "
                                               "row).")
                        ] = "full,no-base-flow,fixed-template",
    steps: Annotated[int | None, typer.Option(help="Training steps per concept [toy recipe].")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate before batch scaling [toy recipe].")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Base seed: draws the concept and prior images, seeds training, and "
                                            "image j uses seed + j.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder (fidelity.json, grid-<variant>.png).")
                   ] = Path("out/fidelity"),
) -> None:
    """Concept-present % and prompt fidelity % on new-scene toy prompts, per method variant."""
    from benchmarks.fidelity import TOY_RECIPE, VARIANTS, FidelitySettings, run_fidelity, table
    from latexblend.toy import world as toy

    if model != "toy":
        raise LatexBlendError("bench fidelity needs --model toy (its scenes have exact detectors)")
    if seeds < 1:
        raise LatexBlendError(f"--seeds must be at least 1, got {seeds}")
    names = [c.strip() for c in concepts.split(",") if c.strip()]
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [c for c in names if c not in toy.CONCEPTS] + [v for v in chosen if v not in VARIANTS]
    if bad or not names:
        raise LatexBlendError(f"unknown concept/variant {', '.join(bad) or '(none given)'}; concepts: "
                              f"{', '.join(toy.CONCEPTS)}; variants: {', '.join(VARIANTS)}")
    _quiet_libraries()
    settings = FidelitySettings(concepts=names, variants=chosen, steps=steps or TOY_RECIPE["steps"],
                                lr=lr if lr is not None else TOY_RECIPE["lr"], seeds=seeds, seed=seed)
    result = run_fidelity(out, settings, progress=typer.echo)
    typer.echo(table(result))
    typer.echo(f"wrote {out / 'fidelity.json'} and grids in {out}/ ({result['wall_s']:.0f} s)")


@app.command("extract")
@friendly
def bench_extract_cmd(
    model: BenchModelOpt = "tiny",
    device: str | None = None,
    repeats: int = 3,
    out: BenchOutOpt = Path("bench_extract.json"),
) -> None:
    """Stage 2: wall time of one extraction (text side only) and the bank file's size."""
    _quiet_libraries()
    from benchmarks.speed import bench_extract

    _bench_report(bench_extract(model, device=device, repeats=repeats), out)


@app.command("modes")
@friendly
def bench_modes_cmd(
    model: BenchModelOpt = "tiny",
    concepts: Annotated[str, typer.Option(help="Comma-separated concept counts (2-6).")] = "2,4",
    steps: int = 20,
    repeats: int = 3,
    size: BenchSizeOpt = None,
    device: str | None = None, dtype: str = "auto",
    out: BenchOutOpt = Path("bench_modes.json"),
    profile: Annotated[Path | None, typer.Option(
        help="Also write a torch.profiler operator table per mode (profile_<mode>_<n>.txt) into this folder.")] = None,
    modes: Annotated[str, typer.Option(help="Comma-separated modes: plain, guidance, guidance_ckpt, rectify, "
                                            "plain_graphs, guidance_eager, rectify_eager.")
                     ] = "plain,guidance,guidance_ckpt,rectify",
    profile_modes: Annotated[str | None, typer.Option(help="The modes --profile profiles [all].")] = None,
) -> None:
    """Plain blending, blending guidance and rectification vs the stock pipeline (time, peak memory, FLOPs)."""
    counts = _counts(concepts, 2, 6)
    _quiet_libraries()
    from benchmarks.speed import bench_modes

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    _bench_report(bench_modes(model, counts, steps=steps, repeats=repeats, size=size, device=device, dtype=dtype,
                              modes=chosen, profile_dir=profile, progress=lambda line: typer.echo(line, err=True),
                              profile_modes=profile_modes.split(",") if profile_modes else None),
                  out)
