"""Stage 3 as a command: prompts and settings in, an output folder (docs/OUTPUT_FORMAT.md) out.

The method itself (:class:`~latexblend.blend.blender.Blender`, :func:`~latexblend.blend.blender.apply`) is in
``blender.py``; the output folder is written by ``samples.py``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import PartialState

from latexblend.blend import samples
from latexblend.blend.blender import Blender, load_banks
from latexblend.blend.options import SCHEDULERS, GenerateConfig
from latexblend.console import Progress
from latexblend.device import resolve_device
from latexblend.errors import LatexBlendError
from latexblend.fileio import write_text_atomic
from latexblend.models import load_pipeline
from latexblend.settings import flat
from latexblend.tokens import MAX_TOKENS, placeholder_names

OTHER_FAILED = ("stopped: another process failed while sampling (see its error line); run the same command again "
                "to continue the folder")


def set_scheduler(pipe, name: str) -> None:
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise LatexBlendError(f"unknown scheduler '{name}'; choose default, {', '.join(SCHEDULERS)}")

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def work_units(cfg: GenerateConfig, rank: int = 0, world: int = 1) -> dict[int, list[int]]:
    """Prompt index -> image indices that process ``rank`` of ``world`` makes: the (prompt, image) pairs
    dealt round-robin, so every image is made exactly once and image ``j`` always has seed ``seed + j``."""
    units: dict[int, list[int]] = {}
    for u in range(rank, len(cfg.prompts) * cfg.num_images, world):
        p, j = divmod(u, cfg.num_images)
        units.setdefault(p, []).append(j)
    return units


def run_prompts(pipe, cfg: GenerateConfig, blender: Blender | None, on_image=None,
                units: dict[int, list[int]] | None = None) -> list[dict]:
    """Generate the images of ``units`` (default: ``cfg.num_images`` per prompt); image ``j`` of every
    prompt uses seed ``cfg.seed + j``.

    ``on_image(record, pil_image, array, maps)`` is called for each image (``array`` is the float
    ``[H, W, 3]`` output in [0, 1]; ``maps`` its ``{concept: [h, w] array}`` cross-attention maps when the
    blender saves maps, else ``None``). Returns one record per image.
    """

    units = work_units(cfg) if units is None else units
    records = []
    total = sum(len(js) for js in units.values())
    with Progress(total, "generate", "img", enabled=total > 1) as bar:
        for p, js in units.items():
            prompt = cfg.prompts[p]
            for first in range(0, len(js), cfg.batch_size):
                seeds = [cfg.seed + j for j in js[first : first + cfg.batch_size]]
                gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
                arrays = pipe(
                    prompt=prompt, negative_prompt=cfg.negative_prompt or None, num_inference_steps=cfg.steps,
                    guidance_scale=cfg.cfg, height=cfg.height, width=cfg.width, num_images_per_prompt=len(seeds),
                    generator=gens, output_type="np",
                ).images
                _check_finite(arrays, p, seeds)
                maps = _call_maps(blender, len(seeds))
                for seed, array, image_maps in zip(seeds, arrays, maps, strict=True):
                    expanded = blender.call.prompts[0] if blender is not None else prompt
                    record = {"file": samples.image_file(p, seed), "prompt_index": p, "prompt": prompt,
                              "expanded_prompt": expanded,
                              "concepts": blender.concepts_for(prompt) if blender is not None else [],
                              "seed": seed}
                    pil = pipe.numpy_to_pil(np.asarray(array)[None])[0]
                    if on_image:
                        on_image(record, pil, array, image_maps)
                    records.append(record)
                    bar.update(1)
    return records


def _check_negative(tokenizer, text: str) -> None:
    """The negative prompt fits CLIP's 77 tokens (the pipeline would cut it silently)."""
    if text and len(tokenizer(text).input_ids) > MAX_TOKENS:
        raise LatexBlendError(f"negative prompt is {len(tokenizer(text).input_ids)} tokens, over CLIP's limit of "
                              f"{MAX_TOKENS}: shorten it")


def _check_finite(arrays, prompt_index: int, seeds: list[int]) -> None:
    """Refuse images holding NaN or infinite values (they would be saved as black): nothing is reported as done."""
    for seed, array in zip(seeds, arrays, strict=True):
        if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
            raise LatexBlendError(f"image {samples.image_file(prompt_index, seed)} came out holding NaN or infinite "
                                  "values (an overflow, e.g. in fp16, or a damaged model or bank); it was not saved "
                                  "and the output folder is not marked finished; try --dtype fp32 or bf16")


def _call_maps(blender: Blender | None, n: int) -> list:
    """The per-image maps of the blender's last call (``None`` each when it does not save maps)."""
    steering = blender.steering if blender is not None else None
    return steering.image_maps() if steering is not None and steering.save_maps else [None] * n


class Processes:
    """This process's place among ``accelerate launch`` / ``torchrun`` workers (one process: rank 0 of 1)."""

    def __init__(self):
        self.state = None
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:

            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def any_failed(self, error: BaseException | None) -> bool:
        """Whether this or any other process failed. Every process calls it (a collective), so a process whose
        sampling raised does not leave the others waiting for it at the next barrier; should the collective
        itself fail (a timeout, a broken device), this process's own ``error`` is raised, not the collective's."""
        if self.state is None:
            return error is not None
        try:
            flag = torch.tensor([int(error is not None)], device=self.state.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        except Exception:
            if error is not None:
                raise error from None
            raise


def generate(cfg: GenerateConfig, pipe=None) -> Path:
    """Run Stage 3 as configured and write the output folder of ``docs/OUTPUT_FORMAT.md``.

    Under ``accelerate launch --num_processes K`` (or torchrun) the images are shared among the
    processes, each on its own device, into one folder; the main process merges the records into one
    ``metadata.json``. Seeds do not depend on the process, so the images are a single-process run's up
    to float rounding (batch composition and kernels differ; tested: at most 1/255 in a few pixels).
    Inputs (banks, device, then the prompts) are checked before sampling; the output folder is held by
    one run at a time (:func:`~latexblend.blend.samples.claim_out`) and removed again if a check fails in it
    while it is still empty.
    """

    start = time.perf_counter()
    procs = Processes()
    named = {n for p in cfg.prompts for n in placeholder_names(p)}  # a placeholder typo: before any file is read
    banks = load_banks(cfg.concepts, cfg.bank_dir)
    extra = load_banks(sorted(named - set(banks)), cfg.bank_dir)
    if procs.world > 1 and not cfg.out:
        raise LatexBlendError("give --out when generating with several processes (they share one folder)")
    device = None if pipe is not None else resolve_device(cfg.device or (str(procs.device) if procs.device else None))
    with samples.claim_out(cfg.out, procs.rank, run_identity(cfg)) as out:
        _generate_into(out, cfg, pipe or _load(cfg, device), procs, {**extra, **banks}, list(banks), start)
    return out


def run_identity(cfg: GenerateConfig) -> dict:
    """The settings that decide a generation's images (an unfinished output folder is continued only by the same)."""
    return {k: v for k, v in flat(cfg).items() if k not in ("out", "device", "batch_size", "bank_dir", "grid")}


def _load(cfg: GenerateConfig, device: str):
    return load_pipeline(cfg.model, device=device, dtype=cfg.dtype)


def _generate_into(out: Path, cfg: GenerateConfig, pipe, procs: Processes, banks: dict, required: list[str],
                   start: float) -> None:
    """The body of :func:`generate` once the output folder is held."""
    set_scheduler(pipe, cfg.scheduler)
    default_size = pipe.default_sample_size * pipe.vae_scale_factor
    cfg = dataclasses.replace(cfg, height=cfg.height or default_size, width=cfg.width or default_size)
    rectify = dataclasses.replace(cfg.rectify, seed=cfg.seed) if cfg.rectify else None  # clustering: the run's seed
    blender = Blender(pipe, banks, required=required, options=cfg.blend, guidance=cfg.guidance, rectify=rectify,
                      save_maps=cfg.save_maps)
    try:
        for prompt in cfg.prompts:  # every process checks every prompt: all fail together, before sampling
            blender.prepare(prompt)
        _check_negative(pipe.tokenizer, cfg.negative_prompt)
    except LatexBlendError:
        blender.remove()
        raise
    settings = {k: v for k, v in flat(cfg).items() if k not in ("prompts", "concepts", "out", "bank_dir")}
    settings.update(dtype=str(pipe.unet.dtype).replace("torch.", ""), device=str(pipe.unet.device),
                    num_processes=procs.world)

    def save(record, pil, _array, maps):
        if procs.world > 1 and (out / samples.STOPPED).exists():  # another process failed: stop now, not at the end
            raise LatexBlendError(OTHER_FAILED)
        if maps is not None:
            record["maps"] = samples.save_heatmaps(out, record, pil, maps)
        samples.save_image(out, record, pil, settings)

    if procs.main:
        (out / samples.STOPPED).unlink(missing_ok=True)  # an earlier failed run's, in a folder being continued
    procs.wait()
    error = None
    try:
        images = run_prompts(pipe, cfg, blender, on_image=save, units=work_units(cfg, procs.rank, procs.world))
    except Exception as err:  # noqa: BLE001 - raised again below, once every process knows
        error = err
        if procs.world > 1:
            write_text_atomic(out / samples.STOPPED, f"{procs.rank}\n")
    finally:
        blender.remove()
    if procs.any_failed(error):
        if procs.main:  # every process has stopped sampling: the marker has done its work
            (out / samples.STOPPED).unlink(missing_ok=True)
        raise error or LatexBlendError(OTHER_FAILED)
    samples.write_records(out, procs.rank, images)
    procs.wait()
    if procs.main:
        concepts = {name: {"class_noun": b.class_noun, "fingerprint": b.fingerprint_digest,
                           "bank": b.source, "references": b.training.get("images")} for name, b in banks.items()}
        samples.finish(out, model=cfg.model, prompts=cfg.prompts, settings=settings, concepts=concepts,
                       grid=cfg.grid, world=procs.world, elapsed=time.perf_counter() - start)
    procs.wait()
