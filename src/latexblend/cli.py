"""The ``latexblend`` command: thin Typer commands over the library.

Heavy imports (torch, diffusers) happen inside commands, so ``--help`` and ``--version`` are quick.
Every :class:`LatexBlendError` becomes one ``error: ...`` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from latexblend import __version__
from latexblend.errors import LatexBlendError

app = typer.Typer(
    name="latexblend", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Multi-concept customized generation by latent textual blending (LatexBlend, CVPR 2025).",
)
bank_app = typer.Typer(no_args_is_help=True, help="List, inspect, verify and import concept banks.")
app.add_typer(bank_app, name="bank")

ModelOpt = Annotated[str, typer.Option("--model", help="'tiny', 'sdxl', a diffusers folder, or a hub id.")]
BankDirOpt = Annotated[
    Path | None, typer.Option("--dir", help="Bank folder [default: $LATEXBLEND_BANK or ./concept_bank].")
]


def _quiet_libraries() -> None:
    """Keep third-party progress bars and advice out of our output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def friendly(fn):
    """Turn a :class:`LatexBlendError` (and Ctrl-C) into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LatexBlendError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"latexblend {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Train one concept, extract it into the concept bank, generate with several."""


@app.command("tiny-model")
@friendly
def tiny_model(out_dir: Annotated[Path, typer.Argument(help="Folder to write (must not exist or be empty).")],
               seed: int = 0) -> None:
    """Write the embedded tiny SDXL-architecture model as a diffusers folder."""
    _quiet_libraries()
    from latexblend.models import save_tiny_model

    path = save_tiny_model(out_dir, seed=seed)
    typer.echo(f"wrote tiny SDXL model to {path}")


# --------------------------------------------------------------------------- bank


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


@bank_app.command("ls")
@friendly
def bank_ls(directory: BankDirOpt = None) -> None:
    """List the banks in the bank folder."""
    from latexblend.bank import bank_dir, list_banks

    rows = list_banks(directory)
    if not rows:
        typer.echo(f"no banks in {bank_dir(directory)}/")
        return
    typer.echo(f"{'name':<20} {'noun':<16} {'L':>2} {'layers':>6} {'dtype':<9} {'size':>9}  base model")
    for path, bank in rows:
        if isinstance(bank, LatexBlendError):
            typer.echo(f"{path.stem:<20} unreadable: {bank}")
            continue
        typer.echo(f"{bank.name:<20} {bank.class_noun:<16} {bank.num_tokens:>2} {len(bank.layers):>6} "
                   f"{bank.dtype:<9} {_size(bank.nbytes):>9}  {bank.base_model} ({bank.fingerprint_digest})")


@bank_app.command("inspect")
@friendly
def bank_inspect(name: Annotated[str, typer.Argument(help="Bank name or path.")], directory: BankDirOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show a bank's metadata, layers and size."""
    from latexblend.bank import bank_path, load_bank

    path = bank_path(name, directory)
    bank = load_bank(path)
    widths: dict[int, int] = {}
    for t in bank.k.values():
        widths[int(t.shape[1])] = widths.get(int(t.shape[1]), 0) + 1
    info = {**bank.metadata(), "path": str(path), "file_bytes": path.stat().st_size, "tensor_bytes": bank.nbytes,
            "layers_by_width": {str(w): n for w, n in sorted(widths.items())}}
    info.pop("base_fingerprint_norms")
    info["training"] = bank.training
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>20}: {value}")


@bank_app.command("verify")
@friendly
def bank_verify(name: Annotated[str, typer.Argument(help="Bank name or path.")], model: ModelOpt = "tiny",
                directory: BankDirOpt = None) -> None:
    """Check that a bank fits a model (layer names, shapes, to_k fingerprint, noun tokens). Exit 2 if not."""
    from latexblend.bank import bank_path, load_bank, verify_bank

    bank = load_bank(bank_path(name, directory))
    _quiet_libraries()
    from latexblend.models import fingerprint, load_unet_and_tokenizer

    unet, tokenizer = load_unet_and_tokenizer(model)
    verify_bank(bank, unet, tokenizer)
    typer.echo(f"ok: '{bank.name}' fits {model} ({len(bank.layers)} attn2 layers, fingerprint "
               f"{fingerprint(unet).digest})")


@bank_app.command("import")
@friendly
def bank_import(
    file: Annotated[Path, typer.Argument(help="A .pt bank saved by the authors' release.")],
    class_noun: Annotated[str, typer.Option("--class-noun", help="The concept's class noun, e.g. dog.")],
    name: Annotated[str | None, typer.Option(help="Bank name [default: the file's stem].")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Check against this model and record its fingerprint.")
    ] = None,
    directory: BankDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bank of that name.")] = False,
) -> None:
    """Convert a release bank (torch.save dict of attn2 k/v) into a latexblend bank."""
    from latexblend.bank import SUFFIX, bank_dir, check_name, import_release_bank, save_bank, verify_bank

    name = check_name(name or file.stem)
    out = bank_dir(directory) / f"{name}{SUFFIX}"
    if out.exists() and not force:
        raise LatexBlendError(f"{out} exists; pass --force to overwrite or --name to choose another name")
    _quiet_libraries()
    from latexblend.models import fingerprint, load_unet_and_tokenizer, shipped_tokenizer

    unet, tokenizer = load_unet_and_tokenizer(model) if model else (None, shipped_tokenizer())
    fp = fingerprint(unet).to_json() if unet is not None else None
    bank = import_release_bank(file, class_noun, name, tokenizer, base_model=model or "unknown", fingerprint=fp)
    if unet is not None:
        verify_bank(bank, unet, tokenizer)
    save_bank(bank, out)
    size = _size(out.stat().st_size)
    typer.echo(f"imported {file} -> {out} ({len(bank.layers)} layers, L={bank.num_tokens}, {size})")


# ---- generate


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise LatexBlendError(f"cannot read prompts file {path}: {err.strerror or err}") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LatexBlendError(f"prompts file {path} has no prompts")
    return prompts


def _generate_settings(config: Path | None, flags: dict) -> dict:
    """Layer the --config file (ours, YAML/JSON mapping; or the authors' inference JSON list) under flags."""
    from latexblend.config import load_mapping

    if config is None:
        return {}
    if config.suffix == ".json" and config.is_file() and config.read_text(encoding="utf-8").lstrip().startswith("["):
        from latexblend.generate import release_config

        return release_config(config, flags.get("bank_dir"))
    return load_mapping(config)


@app.command("generate")
@friendly
def generate_cmd(
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt (repeatable). <name> places a concept.")
    ] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="One prompt per line ('#' lines skipped).")] = None,
    concepts: Annotated[
        str | None, typer.Option(help="Comma-separated bank names or paths, each in every prompt.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    num_images: Annotated[int | None, typer.Option(help="Images per prompt [1].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per pipeline call [4].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of image 0; image j uses seed+j [0].")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [100].")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance scale [6.0].")] = None,
    height: Annotated[int | None, typer.Option(help="Image height [model default].")] = None,
    width: Annotated[int | None, typer.Option(help="Image width [model default].")] = None,
    scheduler: Annotated[str | None, typer.Option(help="default, euler, euler_a, ddim, dpmpp_2m, unipc.")] = None,
    blend_start: Annotated[float | None, typer.Option(help="Replace rows while t/T < this [0.9].")] = None,
    bind: Annotated[bool | None, typer.Option("--bind/--no-bind", help="Slot K row := noun K row [on].")] = None,
    model: Annotated[str | None, typer.Option(help="'tiny', 'sdxl', a diffusers folder, or a hub id [tiny].")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... [cuda if available].")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, fp32, fp16, bf16 [auto].")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder [out/generate-<time>].")] = None,
    directory: BankDirOpt = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (YAML/JSON), or the authors' inference JSON.")
    ] = None,
    guidance: Annotated[
        bool | None, typer.Option("--guidance/--no-guidance", help="Blending guidance (METHOD 5) [off].")
    ] = None,
    guidance_window: Annotated[float | None, typer.Option(help="Guide while t/T >= this [0.8].")] = None,
    guidance_step_size: Annotated[float | None, typer.Option(help="Latent update scale [1.0].")] = None,
    guidance_layers: Annotated[
        str | None, typer.Option(help="all, down/mid/up, inner dims, block prefixes (comma-separated) [all].")
    ] = None,
    guidance_checkpointing: Annotated[
        bool | None, typer.Option("--guidance-checkpointing", help="Gradient checkpointing in the guidance pass.")
    ] = None,
    rectify: Annotated[
        bool | None, typer.Option("--rectify/--no-rectify", help="Self-attention rectification (METHOD 6) [off].")
    ] = None,
    rectify_start: Annotated[float | None, typer.Option(help="Capture masks once t/T < this [0.8].")] = None,
    rectify_clusters: Annotated[int | None, typer.Option(help="Spectral clusters [8].")] = None,
    save_maps: Annotated[
        bool | None, typer.Option("--save-maps", help="Write per-concept cross-attention heatmaps.")
    ] = None,
) -> None:
    """Generate images with any combination of banked concepts blended in."""
    from latexblend.config import GenerateConfig, merge

    flags = dict(guidance=guidance, guidance_window=guidance_window, guidance_step_size=guidance_step_size,
                 guidance_layers=guidance_layers, guidance_checkpointing=guidance_checkpointing, rectify=rectify,
                 rectify_start=rectify_start, rectify_clusters=rectify_clusters, save_maps=save_maps)
    flags |= dict(prompts=(prompt or None), negative_prompt=negative_prompt, num_images=num_images,
                 batch_size=batch_size, seed=seed, steps=steps, cfg=cfg, height=height, width=width,
                 scheduler=scheduler, blend_start=blend_start, bind=bind, model=model, device=device, dtype=dtype,
                 out=out, bank_dir=str(directory) if directory else None,
                 concepts=[c.strip() for c in concepts.split(",") if c.strip()] if concepts else None)
    if prompts_file is not None:
        flags["prompts"] = (flags["prompts"] or []) + _read_prompts(prompts_file)
    settings = merge(GenerateConfig, _generate_settings(config, flags), flags, source="generate setting")
    _quiet_libraries()
    from latexblend.generate import generate

    path = generate(settings)
    typer.echo(f"wrote {len(settings.prompts) * settings.num_images} image(s) to {path}/ (metadata.json)")


# ---- bench

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against the stock diffusers pipeline.")
app.add_typer(bench_app, name="bench")


def _counts(concepts: str, lo: int, hi: int) -> list[int]:
    """``--concepts`` of a benchmark: comma-separated integers in ``[lo, hi]``."""
    try:
        counts = [int(c) for c in concepts.split(",") if c.strip()]
    except ValueError as err:
        raise LatexBlendError(f"--concepts takes comma-separated integers, got '{concepts}'") from err
    if not counts or min(counts) < lo or max(counts) > hi:
        raise LatexBlendError(f"--concepts counts must be between {lo} and {hi}")
    return counts


@bench_app.command("generate")
@friendly
def bench_generate_cmd(
    model: Annotated[
        str, typer.Option(help="'tiny', 'sdxl-random' (full SDXL, random weights), a folder or hub id.")
    ] = "tiny",
    concepts: Annotated[str, typer.Option(help="Comma-separated concept counts.")] = "0,1,4,8",
    steps: int = 20,
    repeats: int = 3,
    size: Annotated[int | None, typer.Option(help="Image side [model default].")] = None,
    device: str | None = None, dtype: str = "auto",
    out: Annotated[Path, typer.Option(help="JSON output (CSV written beside it).")] = Path("bench_generate.json"),
) -> None:
    """Blended generation with N concepts vs the stock pipeline (same prompt, seed, settings)."""
    counts = _counts(concepts, 0, 8)
    _quiet_libraries()
    from latexblend.bench import bench_generate, format_table, write_results

    result = bench_generate(model, counts, steps=steps, repeats=repeats, size=size, device=device, dtype=dtype)
    json_path, csv_path = write_results(result, out)
    typer.echo(format_table(result))
    typer.echo(f"{result['device_name']}, {result['dtype']}, {result['size']} px, {steps} steps; "
               f"wrote {json_path} and {csv_path}")


@bench_app.command("modes")
@friendly
def bench_modes_cmd(
    model: Annotated[
        str, typer.Option(help="'tiny', 'sdxl-random' (full SDXL, random weights), a folder or hub id.")
    ] = "tiny",
    concepts: Annotated[str, typer.Option(help="Comma-separated concept counts (2-6).")] = "2,4",
    steps: int = 20,
    repeats: int = 3,
    size: Annotated[int | None, typer.Option(help="Image side [model default].")] = None,
    device: str | None = None, dtype: str = "auto",
    out: Annotated[Path, typer.Option(help="JSON output (CSV written beside it).")] = Path("bench_modes.json"),
) -> None:
    """Plain blending, blending guidance and rectification vs the stock pipeline (time, peak memory)."""
    counts = _counts(concepts, 2, 6)
    _quiet_libraries()
    from latexblend.bench import bench_modes, format_table, write_results

    result = bench_modes(model, counts, steps=steps, repeats=repeats, size=size, device=device, dtype=dtype)
    json_path, csv_path = write_results(result, out)
    typer.echo(format_table(result))
    typer.echo(f"{result['device_name']}, {result['dtype']}, {result['size']} px, {steps} steps; "
               f"wrote {json_path} and {csv_path}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # pragma: no cover - e.g. `latexblend bank ls | head`
        sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
