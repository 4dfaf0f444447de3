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
from latexblend.blend.options import BlendOptions, GenerateConfig, GuidanceOptions, RectifyOptions
from latexblend.errors import LatexBlendError
from latexblend.evaluate import DEFAULT_CLIP, DEFAULT_DINO
from latexblend.train.options import RECIPES, TrainConfig

app = typer.Typer(
    name="latexblend", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Multi-concept customized generation by latent textual blending (LatexBlend, CVPR 2025).",
)
bank_app = typer.Typer(no_args_is_help=True, help="List, inspect, verify and import concept banks.")
app.add_typer(bank_app, name="bank")

ModelOpt = Annotated[str, typer.Option("--model", help="'tiny', 'toy', 'sdxl', a diffusers folder, or a hub id.")]
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
               seed: Annotated[int, typer.Option(help="Seed of the random weights (UNet, VAE and text encoders: "
                                                      "seed + 0..3).")] = 0) -> None:
    """Write the embedded tiny SDXL-architecture model as a diffusers folder."""
    from latexblend.settings import check_seed

    check_seed("--seed", seed, 4, "component")  # UNet, VAE and the text encoders take seed + 0..3
    _quiet_libraries()
    from latexblend.models import save_tiny_model

    path = save_tiny_model(out_dir, seed=seed)
    typer.echo(f"wrote tiny SDXL model to {path}")


@app.command("toy-model")
@friendly
def toy_model(out_dir: Annotated[Path, typer.Argument(help="Folder to write (must not exist or be empty).")]) -> None:
    """Write the embedded trained toy-world model (32 px) as a diffusers folder."""
    _quiet_libraries()
    from latexblend.toy.model import save_toy_model

    path = save_toy_model(out_dir)
    typer.echo(f"wrote toy SDXL model to {path}")


# --------------------------------------------------------------------------- bank


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


@bank_app.command("ls")
@friendly
def bank_ls(directory: BankDirOpt = None) -> None:
    """List the banks in the bank folder."""
    from latexblend.bank.format import bank_dir, list_banks

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
    from latexblend.bank.format import bank_path, describe_bank

    info = describe_bank(bank_path(name, directory))
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
    from latexblend.bank.format import bank_path, load_bank, verify_bank

    bank = load_bank(bank_path(name, directory))
    _quiet_libraries()
    from latexblend.models import fingerprint, load_unet_and_tokenizer
    from latexblend.text import load_text_side

    unet, tokenizer = load_unet_and_tokenizer(model)
    verify_bank(bank, unet, tokenizer, text_side=load_text_side(model))
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
    from latexblend.bank.format import bank_file, save_bank, verify_bank
    from latexblend.bank.release import import_release_bank
    from latexblend.fileio import check_output_folder

    out = bank_file(name or file.stem, directory)
    name = out.stem
    if out.exists() and not force:
        raise LatexBlendError(f"{out} exists; pass --force to overwrite or --name to choose another name")
    if out.is_dir():
        raise LatexBlendError(f"{out} is a folder; choose another --name")
    check_output_folder(out.parent, "bank folder")
    _quiet_libraries()
    from latexblend.models import fingerprint, load_unet_and_tokenizer, shipped_tokenizer
    from latexblend.text import load_text_side

    unet, tokenizer = load_unet_and_tokenizer(model) if model else (None, shipped_tokenizer())
    fp = fingerprint(unet).to_json() if unet is not None else None
    bank = import_release_bank(file, class_noun, name, tokenizer, base_model=model or "unknown", fingerprint=fp)
    if unet is not None:
        verify_bank(bank, unet, tokenizer, text_side=load_text_side(model))
    save_bank(bank, out)
    size = _size(out.stat().st_size)
    typer.echo(f"imported {file} -> {out} ({len(bank.layers)} layers, L={bank.num_tokens}, {size})")


# ---- generate


G, B, GO, RO = GenerateConfig, BlendOptions, GuidanceOptions, RectifyOptions  # help defaults come from these
PromptOpt = Annotated[list[str] | None,
    typer.Option("--prompt", "-p", help="Prompt (repeatable). <name> places a concept.")]
ConceptsOpt = Annotated[str | None, typer.Option(help="Comma-separated bank names or paths, each in every prompt.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Settings file (YAML/JSON), or the authors' inference JSON.")]
GuidanceOpt = Annotated[bool | None,
    typer.Option("--guidance/--no-guidance", help="Blending guidance (METHOD 5) [off].")]
GuidanceLayersOpt = Annotated[str | None,
    typer.Option(help=f"all, down/mid/up, inner dims, block prefixes (comma-separated) [{GO.layers}].")]
GuidanceCheckpointingOpt = Annotated[bool | None,
    typer.Option("--guidance-checkpointing", help="Gradient checkpointing in the guidance pass.")]
RectifyOpt = Annotated[bool | None,
    typer.Option("--rectify/--no-rectify", help="Self-attention rectification (METHOD 6) [off].")]
SaveMapsOpt = Annotated[bool | None, typer.Option("--save-maps", help="Write per-concept cross-attention heatmaps.")]


def _names(text: str | None) -> list[str] | None:
    """``"a, b,"`` -> ``["a", "b"]`` (``None`` stays ``None``: the option was not given). Given but naming no
    concept (``""``, an unset shell variable, or ``",,,"``) is an error, not a run without concepts."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise LatexBlendError(f"--concepts '{text[:40]}' names no concept; leave the option out to generate "
                              "without concepts")
    return names


@app.command("generate")
@friendly
def generate_cmd(
    prompt: PromptOpt = None,
    prompts_file: Annotated[Path | None, typer.Option(help="One prompt per line ('#' lines skipped).")] = None,
    concepts: ConceptsOpt = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    num_images: Annotated[int | None, typer.Option(help=f"Images per prompt [{G.num_images}].")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Images per pipeline call [{G.batch_size}].")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed of image 0; image j uses seed+j [{G.seed}].")] = None,
    steps: Annotated[int | None, typer.Option(help=f"Denoising steps [{G.steps}].")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help=f"Classifier-free guidance scale [{G.cfg}].")] = None,
    height: Annotated[int | None, typer.Option(help="Image height [model default].")] = None,
    width: Annotated[int | None, typer.Option(help="Image width [model default].")] = None,
    scheduler: Annotated[str | None, typer.Option(help="default, euler, euler_a, ddim, dpmpp_2m, unipc.")] = None,
    blend_start: Annotated[float | None, typer.Option(help=f"Replace rows while t/T < this [{B.start}].")] = None,
    bind: Annotated[bool | None, typer.Option("--bind/--no-bind", help="Slot K row := noun K row [on].")] = None,
    model: Annotated[str | None, typer.Option(help=f"'tiny', 'toy', 'sdxl', a diffusers folder, or a hub id "
                                                   f"[{G.model}].")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... [cuda if available].")] = None,
    dtype: Annotated[str | None, typer.Option(help=f"auto, fp32, fp16, bf16 [{G.dtype}].")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder [out/generate-<time>].")] = None,
    directory: BankDirOpt = None,
    config: ConfigOpt = None,
    guidance: GuidanceOpt = None,
    guidance_window: Annotated[float | None, typer.Option(help=f"Guide while t/T >= this [{GO.window}].")] = None,
    guidance_step_size: Annotated[float | None, typer.Option(help=f"Latent update scale [{GO.step_size}].")] = None,
    guidance_layers: GuidanceLayersOpt = None,
    guidance_checkpointing: GuidanceCheckpointingOpt = None,
    rectify: RectifyOpt = None,
    rectify_start: Annotated[float | None, typer.Option(help=f"Capture masks once t/T < this [{RO.start}].")] = None,
    rectify_clusters: Annotated[int | None, typer.Option(help=f"Spectral clusters [{RO.clusters}].")] = None,
    save_maps: SaveMapsOpt = None,
) -> None:
    """Generate images with any combination of banked concepts blended in."""
    flags = {  # option -> setting (GenerateConfig.FLAT_KEYS); None: not given, the file or default holds
        "prompts": prompt or None, "concepts": _names(concepts), "negative_prompt": negative_prompt,
        "num_images": num_images, "batch_size": batch_size, "seed": seed, "steps": steps, "cfg": cfg,
        "height": height, "width": width, "scheduler": scheduler, "blend_start": blend_start, "bind": bind,
        "model": model, "device": device, "dtype": dtype, "out": out,
        "bank_dir": str(directory) if directory else None, "guidance": guidance, "guidance_window": guidance_window,
        "guidance_step_size": guidance_step_size, "guidance_layers": guidance_layers,
        "guidance_checkpointing": guidance_checkpointing, "rectify": rectify, "rectify_start": rectify_start,
        "rectify_clusters": rectify_clusters, "save_maps": save_maps}
    from latexblend.config import generate_settings

    settings = generate_settings(config, flags, prompts_file)
    _quiet_libraries()
    from latexblend.blend.generate import generate

    path = generate(settings)
    typer.echo(f"wrote {len(settings.prompts) * settings.num_images} image(s) to {path}/ (metadata.json)")


# ---- evaluate

cc101_app = typer.Typer(no_args_is_help=True, help="CustomConcept101 protocol: benchmark -> jobs -> one table.")
app.add_typer(cc101_app, name="cc101")

ClipOpt = Annotated[str, typer.Option("--clip-model", help="CLIP ViT-B/32: a local folder or hub id.")]
DinoOpt = Annotated[str, typer.Option("--dino-model", help="DINO ViT-S/16: a local folder or hub id.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda, cpu, ... [default: cuda if available].")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Images per forward pass (1-4096).")]


@app.command("evaluate")
@friendly
def evaluate_cmd(
    samples: Annotated[Path, typer.Option("--samples", help="A `latexblend generate` output folder.")],
    references: Annotated[list[str] | None, typer.Option(
        "--references", help="NAME=DIR (repeatable), or DIR if there is one concept; overrides metadata.json.")
    ] = None,
    clip_model: ClipOpt = DEFAULT_CLIP,
    dino_model: DinoOpt = DEFAULT_DINO,
    text_policy: Annotated[str, typer.Option(
        "--text-policy", help="CLIP-T text: 'expanded' (placeholders -> 'a <noun>') or 'raw' (as written).")
    ] = "expanded",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (reported) instead of failing.")
    ] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html.")] = True,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = None,
    detector: Annotated[str, typer.Option(
        "--detector", help="'clip' (CLIP/DINO) or 'toy' (exact toy-world detectors: writes toy_metrics.json).")
    ] = "clip",
) -> None:
    """CLIP-T (cosine and CLIPScore), CLIP-I and DINO per image and per concept; metrics.json/.csv, report.html."""
    from latexblend.evaluate import metrics as ev
    from latexblend.evaluate import report as outputs
    from latexblend.fileio import check_output_folder

    if detector not in ("clip", "toy"):
        raise LatexBlendError(f"--detector must be 'clip' or 'toy', not '{detector}'")
    if detector == "toy":
        _evaluate_toy(samples)
        return
    ev.check_text_policy(text_policy)
    parsed = ev.read_samples(samples)  # check the folder and the references before loading any model
    overrides = ev.parse_reference_flags(references or [], sorted(parsed.concepts))
    ev.resolve_references(parsed, overrides)
    check_output_folder(samples, "samples folder")  # metrics.json goes there: checked before the models load
    _quiet_libraries()
    models = ev.load_models(clip_model, dino_model, device)
    metrics = ev.evaluate_samples(samples, models, overrides, text_policy, skip_bad, batch_size)
    written = outputs.write_outputs(metrics, samples, report=report)
    typer.echo("\n".join(outputs.table_lines(metrics)))
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def _evaluate_toy(samples: Path) -> None:
    from latexblend.fileio import write_text_atomic
    from latexblend.toy.detect import score_samples

    metrics = score_samples(samples)
    path = write_text_atomic(samples / "toy_metrics.json", json.dumps(metrics, indent=2) + "\n")
    typer.echo(" ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics["overall"].items()))
    typer.echo(f"wrote {path}")


@cc101_app.command("jobs")
@friendly
def cc101_jobs(
    root: Annotated[Path, typer.Option("--root", help="The customconcept101 folder (dataset.json, prompts/).")],
    out: Annotated[Path, typer.Option("--out", help="Jobs file to write (JSON).")],
    concepts: Annotated[str, typer.Option("--concepts", help="Comma-separated concept names, or 'all'.")] = "",
    pairs: Annotated[str, typer.Option("--pairs", help="Comma-separated pairs 'a+b', or 'all'.")] = "",
    samples_root: Annotated[Path, typer.Option("--samples-root", help="Where the jobs' output folders go.")
    ] = Path("cc101_samples"),
) -> None:
    """Turn a selection of CustomConcept101 concepts and pairs into generate jobs."""
    from latexblend.evaluate.cc101 import make_jobs, write_jobs

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    jobs = make_jobs(root, split(concepts), split(pairs), samples_root)
    write_jobs(jobs, out)
    prompts = sum(len(j["prompts"]) for j in jobs)
    typer.echo(f"wrote {len(jobs)} jobs ({prompts} prompts) to {out}")


@cc101_app.command("run")
@friendly
def cc101_run(
    jobs_file: Annotated[Path, typer.Option("--jobs", help="A jobs file from `latexblend cc101 jobs`.")],
    generate_cmd: Annotated[str, typer.Option(
        "--generate-cmd", help="Command per job; {prompts_file}, {concepts}, {out}, {name} are filled in.")
    ] = "latexblend generate --prompts-file {prompts_file} --concepts {concepts} --out {out}",
    results: Annotated[Path | None, typer.Option(
        "--results", help="Folder for cc101_results.csv/.json [default: the jobs file's folder].")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate each job.")] = True,
    clip_model: ClipOpt = DEFAULT_CLIP,
    dino_model: DinoOpt = DEFAULT_DINO,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = None,
) -> None:
    """Run the jobs (resumable: complete outputs and fresh metrics are kept) and write one table."""
    from latexblend.evaluate.cc101 import (
        command_runner,
        job_evaluator,
        read_jobs,
        results_table,
        run_jobs,
        write_results,
    )
    from latexblend.fileio import check_output_folder

    jobs = read_jobs(jobs_file)
    if evaluate:
        check_output_folder(results or jobs_file.parent, "results folder")  # before any job runs
    evaluator = job_evaluator(clip_model, dino_model, device, batch_size, _quiet_libraries) if evaluate else None
    rows = run_jobs(jobs, command_runner(generate_cmd), evaluator, log=typer.echo)
    if evaluate:
        table = results_table(rows)
        written = write_results(table, results or jobs_file.parent)
        for row in table:
            typer.echo(f"{row['name'][:40]:<40} CLIP-T {_num(row['clip_t'])}  CLIP-I {_num(row['clip_i'])}  "
                       f"DINO {_num(row['dino'])}")
        typer.echo("wrote " + ", ".join(str(p) for p in written))


def _num(value: float | None) -> str:
    return "n/a   " if value is None else f"{value:.4f}"


# ---- train / extract / prior

Opt = typer.Option


T, TOY = TrainConfig, RECIPES["toy"]  # help defaults come from these
IndexOpt = Annotated[int | None, Opt(help="Farm: train the INDEX-th concept of --concepts-dir (sorted; default "
                                          "$SLURM_ARRAY_TASK_ID); a complete bank is skipped.")]
TrainModelOpt = Annotated[str | None, Opt(help=f"'tiny', 'toy', 'sdxl', a diffusers folder, or a hub id [default: "
                                               f"{T.model}].")]
StepsOpt = Annotated[int | None, Opt(help=f"Optimizer steps [default: 3000 / (processes x grad_accum); toy: "
                                          f"{TOY['steps']}].")]
LrOpt = Annotated[float | None, Opt(help=f"Base learning rate [default: {T.lr:g}; toy: {TOY['lr']:g}].")]
ScaleLrOpt = Annotated[bool | None, Opt("--scale-lr/--no-scale-lr", help="Scale lr by the effective batch [on].")]
TrainBatchOpt = Annotated[int | None, Opt(help=f"Instance (and prior) images per process [default: {T.batch_size}].")]
AccumOpt = Annotated[int | None, Opt(help=f"Micro-batches per optimizer step [default: {T.grad_accum}].")]
ResolutionOpt = Annotated[int | None, Opt(help="Training resolution [default: 512, or the model's size if smaller].")]
BaseFlowOpt = Annotated[bool | None, Opt("--base-flow/--no-base-flow",
                                         help="Dual flow [on]; off: plain Custom-Diffusion training.")]
FixedOpt = Annotated[bool | None, Opt("--fixed-template", help="Ablation: 'photo of {}' for both flows.")]
RankOpt = Annotated[int | None, Opt(help=f"LoRA rank on to_k/to_v (0: full weights) [default: {T.kv_rank}].")]
CompileOpt = Annotated[bool | None, Opt("--compile-unet", help="torch.compile the UNet (first step compiles).")]
AdamOpt = Annotated[bool | None, Opt("--use-8bit-adam", help="8-bit AdamW (needs bitsandbytes).")]
PrecisionOpt = Annotated[str | None, Opt(help=f"auto, no, bf16 or fp16 [default: {T.mixed_precision}].")]
CkptEveryOpt = Annotated[int | None, Opt(help=f"Checkpoint period in steps, 0: off [default: {T.checkpoint_every}].")]
KeepOpt = Annotated[int | None, Opt(help=f"Keep the newest K checkpoints, 0: all [default: {T.keep_checkpoints}].")]
ResumeOpt = Annotated[str | None, Opt(help="'latest' or a checkpoint folder (none yet: start from step 0).")]
OverwriteOpt = Annotated[bool | None, Opt("--overwrite", help="Replace an existing run and bank of this name.")]
SetOpt = Annotated[list[str] | None, Opt("--set", help="Any training setting, KEY=VALUE (repeatable).")]


@app.command("train")
@friendly
def train_cmd(
    concept: Annotated[str | None, Opt(help="Concept name: reads <concepts-dir>/<name>.yaml.")] = None,
    concepts_dir: Annotated[Path, Opt(help="Folder of concept YAML files.")] = Path("configs/concepts"),
    index: IndexOpt = None,
    images: Annotated[str | None, Opt(help="Folder of instance images.")] = None,
    class_noun: Annotated[str | None, Opt(help="The concept's class noun, e.g. dog.")] = None,
    name: Annotated[str | None, Opt(help="Concept (bank and run) name.")] = None,
    model: TrainModelOpt = None,
    prior: Annotated[str | None, Opt(help="Prior images folder [default: reg_data/<class noun>].")] = None,
    use_prior: Annotated[bool | None, Opt("--use-prior/--no-prior", help="Prior preservation [on].")] = None,
    steps: StepsOpt = None, lr: LrOpt = None, scale_lr: ScaleLrOpt = None, batch_size: TrainBatchOpt = None,
    grad_accum: AccumOpt = None, resolution: ResolutionOpt = None,
    seed: Annotated[int | None, Opt(help=f"Seed [default: {T.seed}].")] = None,
    base_flow: BaseFlowOpt = None, fixed_template: FixedOpt = None, kv_rank: RankOpt = None,
    gradient_checkpointing: Annotated[bool | None, Opt("--gradient-checkpointing")] = None,
    compile_unet: CompileOpt = None, use_8bit_adam: AdamOpt = None, mixed_precision: PrecisionOpt = None,
    checkpoint_every: CkptEveryOpt = None, keep_checkpoints: KeepOpt = None, resume: ResumeOpt = None,
    log_tensorboard: Annotated[bool | None, Opt("--log-tensorboard", help="Write tensorboard logs.")] = None,
    runs_dir: Annotated[str | None, Opt(help=f"Folder of run folders [default: {T.runs_dir}].")] = None,
    bank_dir: Annotated[str | None, Opt(help="Bank folder [default: $LATEXBLEND_BANK or ./concept_bank].")] = None,
    overwrite: OverwriteOpt = None,
    sets: SetOpt = None,
) -> None:
    """Stage 1: train one concept (dual flow), then write its bank (Stage 2)."""
    flags = {  # option -> TrainConfig field; None: not given, the YAML, --set or default holds
        "images": images, "class_noun": class_noun, "name": name, "model": model, "prior": prior,
        "use_prior": use_prior, "steps": steps, "lr": lr, "scale_lr": scale_lr, "batch_size": batch_size,
        "grad_accum": grad_accum, "resolution": resolution, "seed": seed, "base_flow": base_flow,
        "fixed_template": fixed_template, "kv_rank": kv_rank, "gradient_checkpointing": gradient_checkpointing,
        "compile_unet": compile_unet, "use_8bit_adam": use_8bit_adam, "mixed_precision": mixed_precision,
        "checkpoint_every": checkpoint_every, "keep_checkpoints": keep_checkpoints, "resume": resume,
        "log_tensorboard": log_tensorboard, "runs_dir": runs_dir, "bank_dir": bank_dir, "overwrite": overwrite}
    from latexblend.config import farm_concept, farm_index, finished_bank, train_settings

    farm = farm_index(index, concept, images)
    if farm is not None:
        concept = farm_concept(concepts_dir, farm)
    cfg = train_settings(concept, concepts_dir, flags, sets)
    if farm is not None and not cfg.overwrite and (bank := finished_bank(cfg)) is not None:
        typer.echo(f"skip: concept {farm} '{cfg.name}' already has a complete bank ({bank})")
        return
    _quiet_libraries()
    from latexblend.train.loop import train

    run = train(cfg)
    if run is None:  # not the main process
        return
    info = json.loads((run / "run.json").read_text())
    typer.echo(f"trained '{cfg.name}': {run}/ ({info['steps_per_s']:.2f} steps/s), bank {info['bank']}")


@app.command("extract")
@friendly
def extract_cmd(
    run: Annotated[Path, Opt("--run", help="A training run folder, runs/<name>.")],
    checkpoint: Annotated[int | None, Opt(help="Use checkpoints/step_<N> instead of the final weights.")] = None,
    prompt: Annotated[str | None, Opt(help="Extraction prompt [default: 'photo of <new1> <noun>'].")] = None,
    out: Annotated[Path | None, Opt(help="Bank file to write [default: the bank folder/<name>.safetensors].")] = None,
    device: Annotated[str | None, Opt(help="cpu or cuda [default: cuda if available].")] = None,
    dtype: Annotated[str, Opt(help="Bank dtype: auto (fp16 on CUDA, else fp32), fp32, fp16, bf16.")] = "auto",
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an existing bank file.")] = False,
) -> None:
    """Stage 2: re-extract a trained run into the concept bank (one text-side pass, no UNet)."""
    _quiet_libraries()
    from latexblend.train.runfolder import extract_run

    bank, path = extract_run(run, checkpoint=checkpoint, prompt=prompt, out=out, device=device, dtype=dtype,
                             overwrite=overwrite)
    typer.echo(f"extracted '{bank.name}' ({bank.extraction_prompt!r}, {len(bank.layers)} layers, "
               f"L={bank.num_tokens}, {bank.dtype}) -> {path}")


@app.command("prior")
@friendly
def prior_cmd(
    class_noun: Annotated[str, Opt("--class-noun", help="Class to generate, e.g. dog (also the caption).")],
    num: Annotated[int, Opt(help="Number of images.")] = 200,
    model: ModelOpt = "tiny",
    out: Annotated[Path | None, Opt(help="Output folder [default: reg_data/<class noun>].")] = None,
    seed: Annotated[int, Opt(help="Image i uses seed + i.")] = 0,
    steps: Annotated[int, Opt(help="Denoising steps.")] = 50,
    cfg: Annotated[float, Opt(help="Guidance scale.")] = 6.0,
    device: Annotated[str | None, Opt(help="cpu or cuda [default: cuda if available].")] = None,
) -> None:
    """Generate prior-preservation images of a class with the base model (resumable)."""
    from latexblend.fileio import check_output_folder
    from latexblend.train.data import (
        check_prior_folder,
        check_prior_request,
        generate_prior,
        prior_dir,
        prior_done,
        prior_settings,
    )

    check_prior_request(class_noun, num, steps, cfg, seed)
    out = out or prior_dir(class_noun)
    settings = prior_settings(class_noun, model, seed, steps, cfg)
    if prior_done(out, num, settings):
        typer.echo(f"{out}: all {num} prior images exist; nothing to do")
        return
    check_prior_folder(out, settings)  # before the model loads
    check_output_folder(out, "prior folder")
    _quiet_libraries()
    from latexblend.models import load_pipeline

    made, _ = generate_prior(load_pipeline(model, device=device), class_noun, num, out, seed=seed, steps=steps,
                             cfg=cfg, model=model)
    typer.echo(f"generated {made} prior images of '{class_noun}' in {out}/ ({num} in all)")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # pragma: no cover - e.g. `latexblend bank ls | head`
        sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
