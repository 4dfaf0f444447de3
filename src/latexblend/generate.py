"""Stage 3: blended multi-concept generation on the stock ``StableDiffusionXLPipeline`` (METHOD section 4).

The pipeline is extended, never forked: :func:`apply` installs :class:`~latexblend.attention.BlendProcessor`
on every ``attn2`` layer, a UNet pre-forward hook that records ``t / T``, and a wrapper around
``pipe.encode_prompt`` that expands ``<name>`` placeholders and locates each concept's span.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from latexblend import __version__
from latexblend.attention import BlendProcessor, BlendState, install_processors
from latexblend.bank import ConceptBank, bank_dir, bank_path, load_bank, verify_bank
from latexblend.config import GenerateConfig, to_dict
from latexblend.errors import LatexBlendError
from latexblend.fileio import atomic_path, write_text_atomic
from latexblend.guidance import GuidanceOptions
from latexblend.models import fingerprint
from latexblend.rectify import RectifyOptions
from latexblend.tokens import Span, locate_spans, placeholder_names


def _options(cls, value):
    """``None``/``False`` -> off; ``True`` -> defaults; a mapping -> ``cls(**value)``; an instance as is."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


class Blender:
    """Concept banks applied to a pipeline; use :func:`apply` to make one, :meth:`remove` to undo.

    ``required`` concepts must appear in every prompt (by noun or placeholder); any other loaded
    concept is blended where a prompt names it as ``<name>``.
    """

    def __init__(self, pipe, banks: dict[str, ConceptBank], required: Sequence[str] = (),
                 blend_start: float = 0.9, bind: bool = True, guidance=None, rectify=None, save_maps: bool = False):
        if not 0.0 <= blend_start <= 1.0:
            raise LatexBlendError(f"blend_start must be in [0, 1], got {blend_start}")
        if getattr(pipe, "_latexblend", None) is not None:
            raise LatexBlendError("latexblend is already applied to this pipeline; remove() it first")
        self.pipe, self.banks, self.required = pipe, dict(banks), list(required)
        for name in self.required:
            if name not in self.banks:
                raise LatexBlendError(f"concept '{name}' is required but was not loaded")
        device, dtype = pipe.unet.device, pipe.unet.dtype
        model_fp = fingerprint(pipe.unet) if self.banks else None
        for bank in self.banks.values():
            verify_bank(bank, pipe.unet, pipe.tokenizer, model_fingerprint=model_fp)
        self.state = BlendState(blend_start=blend_start, bind=bind)
        self.state.rows = {
            name: ({k: t.to(device, dtype) for k, t in b.k.items()}, {k: t.to(device, dtype) for k, t in b.v.items()})
            for name, b in self.banks.items()
        }
        self.last_prompts: list[str] = []
        self.last_spans: list[list[Span]] = []
        num_train = int(pipe.scheduler.config.num_train_timesteps)
        self._restore = install_processors(pipe.unet, lambda layer: BlendProcessor(layer, self.state))
        self._hook = pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        self._num_train = num_train
        self._schedule: tuple = (None, [])
        self._encode = pipe.encode_prompt
        self._signature = inspect.signature(self._encode)
        pipe.encode_prompt = self._encode_prompt
        pipe._latexblend = self
        self.steering = None  # guidance / rectification / map saving (latexblend.steering)
        guidance, rectify = _options(GuidanceOptions, guidance), _options(RectifyOptions, rectify)
        if guidance or rectify or save_maps:
            from latexblend.steering import Steering

            try:
                self.steering = Steering(self, guidance, rectify, save_maps)
            except Exception:
                self.remove()
                raise

    def _on_unet(self, module, args, kwargs):
        """Record ``t / T`` before every UNet call, without a device sync where the scheduler allows."""
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.t_frac = self._host_timestep(t) / self._num_train

    def _host_timestep(self, t) -> float:
        if not isinstance(t, torch.Tensor):
            return float(t)
        scheduler = self.pipe.scheduler
        index = getattr(scheduler, "step_index", None)
        schedule = getattr(scheduler, "timesteps", None)
        if isinstance(index, int) and isinstance(schedule, torch.Tensor):
            key = (schedule.data_ptr(), schedule.numel())
            if self._schedule[0] != key:  # once per generation: copy the schedule to the host
                self._schedule = (key, schedule.detach().float().cpu().tolist())
            if index < len(self._schedule[1]):
                return self._schedule[1][index]
        return float(t.flatten()[0])  # schedulers without step_index pay one device sync per step

    def concepts_for(self, prompt: str) -> list[str]:
        """Names blended into ``prompt``: the required ones, then its placeholders."""
        names = list(self.required)
        for name in placeholder_names(prompt):
            if name in self.banks and name not in names:
                names.append(name)
        return names

    def prepare(self, prompt: str) -> tuple[str, list[Span]]:
        """Expanded prompt and spans for ``prompt`` (errors are :class:`LatexBlendError`)."""
        concepts = [(n, self.banks[n].class_noun, self.banks[n].noun_ids) for n in self.concepts_for(prompt)]
        return locate_spans(self.pipe.tokenizer, prompt, concepts)

    def _encode_prompt(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        prompt, copies = call.get("prompt"), int(call.get("num_images_per_prompt") or 1)
        if prompt is None:
            if self.required:
                raise LatexBlendError("latexblend needs the prompt text (not prompt_embeds) to find concept spans")
            self.state.reset([])
            return self._encode(**call)
        if call.get("prompt_2") is not None:
            raise LatexBlendError("prompt_2 is not supported with blended concepts: give one prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prepared = [self.prepare(p) for p in prompts]
        self.last_prompts = [text for text, _ in prepared]
        self.last_spans = [spans for _, spans in prepared]
        self.state.reset([spans for spans in self.last_spans for _ in range(copies)])
        call["prompt"] = self.last_prompts[0] if isinstance(prompt, str) else self.last_prompts
        return self._encode(**call)

    def remove(self) -> None:
        """Restore the pipeline's processors and ``encode_prompt``."""
        if self.steering is not None:
            self.steering.remove()
            self.steering = None
        self._restore()
        self._hook.remove()
        self.pipe.__dict__.pop("encode_prompt", None)
        self.pipe.__dict__.pop("_latexblend", None)

    def __enter__(self) -> Blender:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def load_banks(names: Sequence[str | Path | ConceptBank],
               directory: str | Path | None = None) -> dict[str, ConceptBank]:
    """Banks by name (``concept_bank/<name>.safetensors``), path, or already loaded; names must be unique."""
    banks: dict[str, ConceptBank] = {}
    for item in names:
        bank = item if isinstance(item, ConceptBank) else load_bank(bank_path(str(item), directory))
        if bank.name in banks:
            raise LatexBlendError(f"concept '{bank.name}' given twice")
        banks[bank.name] = bank
    return banks


def apply(pipe, concepts: Sequence[str | Path | ConceptBank], blend_start: float = 0.9, bind: bool = True,
          bank_dir: str | Path | None = None, optional: Sequence[str | Path | ConceptBank] = (),
          guidance: GuidanceOptions | dict | bool | None = None, rectify: RectifyOptions | dict | bool | None = None,
          save_maps: bool = False) -> Blender:
    """Blend concept banks into an existing SDXL pipeline; call it as usual afterwards.

    >>> blender = latexblend.apply(pipe, ["corgi", "castle"])   # doctest: +SKIP
    >>> pipe("a dog in front of a castle").images[0]            # doctest: +SKIP
    >>> blender.remove()                                         # doctest: +SKIP

    ``concepts`` must appear in every prompt (by class noun, or as ``<name>``); ``optional`` ones only
    where a prompt writes ``<name>``. ``guidance`` (blending guidance, METHOD section 5) and ``rectify``
    (self-attention rectification, section 6) take ``True`` for the defaults, a dict of
    :class:`~latexblend.guidance.GuidanceOptions` / :class:`~latexblend.rectify.RectifyOptions` fields,
    or an instance; ``save_maps`` keeps per-concept cross-attention maps (``blender.steering``).
    """
    required = load_banks(concepts, bank_dir)
    extra = load_banks(optional, bank_dir)
    return Blender(pipe, {**extra, **required}, required=list(required), blend_start=blend_start, bind=bind,
                   guidance=guidance, rectify=rectify, save_maps=save_maps)


# --------------------------------------------------------------------------- the generate stage


SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise LatexBlendError(f"unknown scheduler '{name}'; choose default, {', '.join(SCHEDULERS)}")
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def prepare_out(out: str | Path | None, rank: int = 0) -> Path:
    """Create (or accept an empty) output folder; refuse one that already holds a run. Every process
    checks the same things, so all of them stop on a bad folder (none waits for the others forever)."""
    path = Path(out or f"out/generate-{time.strftime('%Y%m%d-%H%M%S')}")
    if (path / "metadata.json").exists():
        raise LatexBlendError(f"{path} already holds a generation (metadata.json); choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / f".write-test-{rank}", "")
        (path / f".write-test-{rank}").unlink()
    except (OSError, LatexBlendError) as err:
        raise LatexBlendError(f"cannot write to output folder {path}: {getattr(err, 'strerror', None) or err}") from err
    return path


def make_grid(images: Sequence, cols: int | None = None):
    """PIL images of one size -> one PIL grid image."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def _save_png(image, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


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

    ``on_image(record, pil_image, array)`` is called for each image (``array`` is the float
    ``[H, W, 3]`` output in [0, 1]). Returns one record per image.
    """
    import numpy as np
    from tqdm.auto import tqdm

    units = work_units(cfg) if units is None else units
    records = []
    total = sum(len(js) for js in units.values())
    with tqdm(total=total, desc="generate", unit="img", disable=total < 2) as bar:
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
                for seed, array in zip(seeds, arrays, strict=True):
                    expanded = blender.last_prompts[0] if blender is not None else prompt
                    record = {"file": f"p{p:03d}_s{seed:07d}.png", "prompt_index": p, "prompt": prompt,
                              "expanded_prompt": expanded,
                              "concepts": blender.concepts_for(prompt) if blender is not None else [],
                              "seed": seed}
                    pil = pipe.numpy_to_pil(np.asarray(array)[None])[0]
                    if on_image:
                        on_image(record, pil, array)
                    records.append(record)
                    bar.update(1)
    return records


def steering_options(cfg: GenerateConfig) -> dict:
    """``guidance`` / ``rectify`` / ``save_maps`` keyword arguments of :class:`Blender` from ``cfg``."""
    guidance = GuidanceOptions(cfg.guidance_window, cfg.guidance_step_size, cfg.guidance_layers,
                               cfg.guidance_checkpointing) if cfg.guidance else None
    rectify = RectifyOptions(cfg.rectify_start, cfg.rectify_clusters, cfg.seed) if cfg.rectify else None
    return {"guidance": guidance, "rectify": rectify, "save_maps": cfg.save_maps}


def heatmap(values, size: tuple[int, int], under=None):
    """A ``[h, w]`` map as an RGB heatmap (black-red-yellow-white) of ``size`` (w, h), min-max scaled,
    laid half-transparent over ``under`` (a PIL image) when given."""
    import numpy as np
    from PIL import Image

    v = np.asarray(values, dtype=np.float64)
    v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return Image.blend(under.convert("RGB"), img, 0.6) if under is not None else img


def save_heatmaps(out: Path, record: dict, pil, maps: dict) -> dict[str, str]:
    """Write ``<image stem>_map_<concept>.png`` per concept beside the image; returns {concept: file}."""
    files = {}
    for name, values in maps.items():
        files[name] = f"{Path(record['file']).stem}_map_{name}.png"
        _save_png(heatmap(values, pil.size, pil), out / files[name], {"concept": name})
    return files


class Processes:
    """This process's place among ``accelerate launch`` / ``torchrun`` workers (one process: rank 0 of 1)."""

    def __init__(self):
        import os

        self.state = None
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def generate(cfg: GenerateConfig, pipe=None) -> Path:
    """Run Stage 3 as configured and write the output folder of ``docs/OUTPUT_FORMAT.md``.

    Under ``accelerate launch --num_processes K`` (or torchrun) the images are shared among the
    processes, each on its own device, into one folder; the main process merges the records into one
    ``metadata.json``. Seeds do not depend on the process, so the images are a single-process run's up
    to float rounding (batch composition and kernels differ; tested: at most 1/255 in a few pixels).
    """
    from latexblend.models import load_pipeline

    start = time.perf_counter()
    procs = Processes()
    banks = load_banks(cfg.concepts, cfg.bank_dir)
    placeholders = {n for p in cfg.prompts for n in placeholder_names(p)} - set(banks)
    extra = load_banks(sorted(placeholders), cfg.bank_dir)
    if procs.world > 1 and not cfg.out:
        raise LatexBlendError("give --out when generating with several processes (they share one folder)")
    out = prepare_out(cfg.out, procs.rank)
    pipe = pipe or load_pipeline(cfg.model, device=cfg.device or (str(procs.device) if procs.device else None),
                                 dtype=cfg.dtype)
    set_scheduler(pipe, cfg.scheduler)
    default_size = pipe.default_sample_size * pipe.vae_scale_factor
    cfg.height, cfg.width = cfg.height or default_size, cfg.width or default_size
    blender = Blender(pipe, {**extra, **banks}, required=list(banks), blend_start=cfg.blend_start, bind=cfg.bind,
                      **steering_options(cfg))
    try:
        for prompt in cfg.prompts:  # every process checks every prompt: all fail together, before sampling
            blender.prepare(prompt)
    except LatexBlendError:
        blender.remove()
        raise
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("prompts", "concepts", "out", "bank_dir")}
    settings.update(dtype=str(pipe.unet.dtype).replace("torch.", ""), device=str(pipe.unet.device),
                    num_processes=procs.world)

    def save(record, pil, _array):
        if cfg.save_maps:
            record["maps"] = save_heatmaps(out, record, pil, blender.steering.pop_image_maps())
        text = {"latexblend": json.dumps({**settings, **record}), "parameters": record["expanded_prompt"]}
        _save_png(pil, out / record["file"], text)

    try:
        images = run_prompts(pipe, cfg, blender, on_image=save, units=work_units(cfg, procs.rank, procs.world))
    finally:
        blender.remove()
    write_text_atomic(out / f".records-{procs.rank}.json", json.dumps(images))
    procs.wait()
    if procs.main:
        concepts = {name: {"class_noun": b.class_noun, "fingerprint": b.fingerprint_digest,
                           "bank": b.source, "references": b.training.get("images")}
                    for name, b in {**extra, **banks}.items()}
        _finish(out, cfg, settings, concepts, procs.world, time.perf_counter() - start)
    procs.wait()
    return out


def _finish(out: Path, cfg: GenerateConfig, settings: dict, concepts: dict, world: int, elapsed: float) -> None:
    """Merge the processes' records into ``metadata.json`` and draw one grid per prompt from the PNGs."""
    from PIL import Image

    images = []
    for rank in range(world):
        part = out / f".records-{rank}.json"
        images += json.loads(part.read_text(encoding="utf-8"))
    images.sort(key=lambda r: (r["prompt_index"], r["seed"]))
    grids = {}
    if cfg.grid:
        for p in sorted({r["prompt_index"] for r in images}):
            pils = [Image.open(out / r["file"]).convert("RGB") for r in images if r["prompt_index"] == p]
            grids[str(p)] = f"p{p:03d}_grid.png"
            _save_png(make_grid(pils), out / grids[str(p)], {"parameters": cfg.prompts[p]})
    meta = {"format": "latexblend-samples", "format_version": 1, "latexblend_version": __version__,
            "model": cfg.model, "settings": settings, "concepts": concepts, "images": images, "grids": grids,
            "timings": {"total_s": round(elapsed, 3), "per_image_s": round(elapsed / max(len(images), 1), 3)}}
    write_text_atomic(out / "metadata.json", json.dumps(meta, indent=2))
    for rank in range(world):
        (out / f".records-{rank}.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the authors' inference JSON


def release_config(path: str | Path, directory: str | Path | None = None) -> dict:
    """Settings from the authors' ``inference.json`` (its first element), with banks converted by
    ``latexblend bank import`` (``concept_bank/n_2_dog_1500.pt`` -> ``<bank dir>/n_2_dog_1500.safetensors``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LatexBlendError(f"cannot read release config {path}: {err}") from err
    entry = data[0] if isinstance(data, list) and data else data
    if not isinstance(entry, dict) or "prompt" not in entry:
        raise LatexBlendError(f"{path}: expected a list whose first element has a 'prompt'")
    concepts = []
    for i in range(1, int(entry.get("concept_num", 0)) + 1):
        spec = entry.get(f"concept{i}") or {}
        if "concept_bank" not in spec or "class_noun" not in spec:
            raise LatexBlendError(f"{path}: concept{i} needs 'concept_bank' and 'class_noun'")
        stem = Path(spec["concept_bank"]).stem
        found = [p for p in (Path(spec["concept_bank"]).with_suffix(".safetensors"),
                             bank_dir(directory) / f"{stem}.safetensors") if p.is_file()]
        if not found:
            raise LatexBlendError(
                f"{path}: concept{i} bank {spec['concept_bank']} has no converted bank; run `latexblend bank "
                f"import {spec['concept_bank']} --class-noun {spec['class_noun']} --name {stem}`"
            )
        bank = load_bank(found[0])
        if bank.class_noun != spec["class_noun"]:
            raise LatexBlendError(f"{path}: concept{i} class noun '{spec['class_noun']}' but its bank's is "
                                  f"'{bank.class_noun}'")
        concepts.append(str(found[0]))
    out = {"prompts": [entry["prompt"]], "concepts": concepts, "num_images": entry.get("batch_size"),
           "steps": entry.get("num_inference_steps"), "blend_start": entry.get("blending_start"),
           **_release_steering(entry)}
    return {k: v for k, v in out.items() if v is not None}


def _release_steering(entry: dict) -> dict:
    """The release's guidance/rectification keys in our units: its ``guidance_steps`` first steps of
    ``num_inference_steps`` become ``guidance_window = 1 - guidance_steps / num_inference_steps`` (exact
    for the default leading timestep spacing: 20 of 100 -> 0.8)."""
    out = {"guidance": bool(entry.get("blending_guidance")) or None,
           "guidance_step_size": entry.get("guidance_stepsize"),
           "rectify": bool(entry.get("self_rectification")) or None,
           "rectify_start": entry.get("rectification_start")}
    if entry.get("guidance_steps") is not None:
        total = entry.get("num_inference_steps") or 100
        out["guidance_window"] = round(1 - float(entry["guidance_steps"]) / float(total), 6)
    return out
