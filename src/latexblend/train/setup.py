"""Building a training run (METHOD.md section 2): check the inputs, load and freeze the base model, add the
identifier token, cache the frozen base flow of every replace template, make the trainable
:class:`~latexblend.train.model.ConceptFlow` and install the splice. The result is one :class:`Setup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from latexblend.attention import fuse_self_attention, install_processors, project_kv
from latexblend.device import gradient_checkpointing
from latexblend.errors import LatexBlendError
from latexblend.fileio import list_images, open_image
from latexblend.models import attn2_modules, fingerprint, load_pipeline
from latexblend.text import concept_span, encode_prompts, pipeline_text_side
from latexblend.tokens import MAX_TOKENS, Span, add_identifier_token, token_ids
from latexblend.train.data import MAX_INSTANCE_IMAGES, load_prior, prior_dir, template_pool
from latexblend.train.model import ConceptFlow
from latexblend.train.options import TrainConfig
from latexblend.train.splice import SpliceProcessor, SpliceState, SpliceTables


@dataclass
class Template:
    """One template of the pool: the instance prompt, its token ids (both tokenizers) and span; the replace
    prompt's span, pooled embedding [P] and frozen base-flow ``(k, v)`` [77, C] per layer (views of the
    run's :attr:`SpliceTables.base`)."""

    instance: str
    concept_span: Span
    replace_span: Span
    pooled: torch.Tensor
    base_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ids: tuple[list[int], list[int]] = ((), ())


class PriorCache:
    """What the fixed prior data costs every step, kept after its first use (``cache_prior``): per prior
    image and flip its VAE moments (mean and log-variance), per caption its text features.

    Exact: the VAE and the text encoders are frozen, captions never hold the identifier (checked in
    :func:`check_inputs`), and each step still draws the latent from the moments with its own
    generator. Disabled, every value is computed again at every use, in the same way.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.store: dict = {}

    def get(self, key, compute):
        """The value kept for ``key``, else ``compute()`` (kept when enabled)."""
        if key in self.store:
            return self.store[key]
        value = compute()
        if self.enabled:
            self.store[key] = value
        return value


@dataclass(frozen=True)
class Schedule:
    """What a run does, derived once from its config and its processes (:func:`schedule`)."""

    steps: int
    lr: float  # the base lr scaled by the effective batch (``scale_lr``)
    processes: int = 1
    mixed_precision: str = "no"


@dataclass
class Setup:
    """Everything one training run holds once built (:func:`build_setup`). Only the splice state changes
    during training: each step sets its spans and base flow."""

    cfg: TrainConfig
    pipe: StableDiffusionXLPipeline  # the frozen base model, splice processors installed
    flow: ConceptFlow  # the trainables
    images: list  # instance images (PIL)
    prior: list  # prior (path, caption) pairs
    templates: list[Template]
    splice: SpliceState
    tables: SpliceTables
    scheduler: DDPMScheduler  # the training noising (DDPM forward process)
    fingerprint: str  # the base model's to_k fingerprint (JSON)
    size: int  # the training resolution
    dtype: torch.dtype  # the compute dtype
    # the pipeline's device and the UNet's and VAE's weight dtypes, read once: diffusers walks every
    # module for ``pipe.device`` and ``model.dtype``, which cost milliseconds per call
    device: torch.device
    unet_dtype: torch.dtype
    vae_dtype: torch.dtype
    prior_cache: PriorCache
    plan: Schedule
    noise_scales: tuple[torch.Tensor, torch.Tensor]  # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) per timestep


def check_inputs(cfg: TrainConfig) -> tuple[list, list]:
    """Instance images (loaded) and prior ``(path, caption)`` pairs; clear errors before any work."""
    images = [open_image(p) for p in list_images(cfg.images, "instance image", limit=MAX_INSTANCE_IMAGES)]
    if not cfg.use_prior:
        return images, []
    folder = Path(cfg.prior) if cfg.prior else prior_dir(cfg.class_noun)
    if not folder.exists():
        raise LatexBlendError(f"no prior data: {folder} does not exist; generate it with `latexblend prior "
                              f"--class-noun '{cfg.class_noun}'`, pass --prior DIR, or train with --no-prior")
    prior = load_prior(folder, cfg.class_noun, cfg.prior_captions)
    bad = next((caption for _, caption in prior if cfg.token in caption), None)
    if bad is not None:
        raise LatexBlendError(f"prior caption '{bad}' holds the identifier {cfg.token}: prior captions describe the "
                              f"class, never the concept")
    return images, prior


def _check_resolution(pipe, size: int) -> None:
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if size % factor:
        raise LatexBlendError(f"resolution {size} must be a multiple of {factor} for this model (VAE x UNet "
                              f"downsampling)")


def _templates(pipe, cfg: TrainConfig, token_id: int, noun_ids: list[int]) -> tuple[list[Template], SpliceTables]:
    """The pool's prompts with token ids and spans, and the frozen base flow of each replace prompt
    (pretrained weights, all layers side by side: :class:`SpliceTables`)."""

    templates, bases = [], []
    toks, encs = pipeline_text_side(pipe)
    layers = attn2_modules(pipe.unet)
    for template in template_pool(cfg.fixed_template):
        instance, replace = template.format(f"{cfg.token} {cfg.class_noun}"), template.format(f"a {cfg.class_noun}")
        with torch.no_grad():
            context, pooled = encode_prompts(toks, encs, [replace], pipe.device)
            bases.append(torch.cat([t[0] for attn in layers.values() for t in project_kv(attn, context)], dim=-1))
        ids = tuple(tok(instance, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
                    for tok in toks)
        templates.append(Template(instance, concept_span(toks[0], instance, token_id, noun_ids),
                                  concept_span(toks[0], replace, "a", noun_ids), pooled[0], {}, ids))
    sizes = [int(getattr(attn, proj).weight.shape[0]) for attn in layers.values() for proj in ("to_k", "to_v")]
    base = torch.stack(bases) if cfg.base_flow else None
    pooled = torch.stack([t.pooled for t in templates]) if cfg.base_flow else None
    for i, template in enumerate(templates if base is not None else []):
        parts = base[i].split(sizes, dim=-1)
        template.base_kv = {layer: (parts[2 * j], parts[2 * j + 1]) for j, layer in enumerate(layers)}
    rows, take = SpliceTables.pairs([t.concept_span for t in templates], [t.replace_span for t in templates])
    return templates, SpliceTables(list(layers), sizes, base, pooled, rows, take)


def schedule(cfg: TrainConfig, processes: int = 1, mixed_precision: str = "no") -> Schedule:
    """Steps (3000 samples per image slot by default) and the lr scaled by the effective batch."""
    steps = cfg.steps or max(1, 3000 // (processes * cfg.grad_accum))
    batch = cfg.batch_size * (2 if cfg.use_prior else 1) * processes * cfg.grad_accum
    return Schedule(steps, cfg.lr * (batch if cfg.scale_lr else 1), processes, mixed_precision)


def build_setup(cfg: TrainConfig, images: list, prior: list, device, dtype: torch.dtype,
                plan: Schedule | None = None) -> Setup:
    """Load the base model, freeze it, add the identifier, cache the base flow, make the concept flow
    (``plan``: the run's schedule, one process by default)."""
    pipe = load_pipeline(cfg.model, device=str(device), dtype={torch.float32: "fp32", torch.bfloat16: "bf16",
                                                               torch.float16: "fp16"}[dtype])
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)
    size = cfg.resolution or min(512, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    _check_resolution(pipe, size)
    toks, encs = pipeline_text_side(pipe)
    token_id = add_identifier_token(toks, encs, cfg.token, init_token=cfg.init_token)
    templates, tables = _templates(pipe, cfg, token_id, token_ids(pipe.tokenizer, cfg.class_noun))
    fp = fingerprint(pipe.unet).to_json()
    torch.manual_seed(cfg.seed)  # LoRA initialisation, identical on every process
    flow = ConceptFlow(pipe.unet, encs, token_id, cfg.kv_rank)
    fuse_self_attention(pipe.unet)  # frozen attn1: q, k, v in one matmul
    splice = SpliceState(attn2_modules(pipe.unet))
    processor = SpliceProcessor()
    install_processors(pipe.unet, lambda layer: processor)
    if cfg.gradient_checkpointing:
        gradient_checkpointing(pipe.unet, True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Setup(cfg, pipe, flow, images, prior, templates, splice, tables, scheduler, fp, size, dtype, pipe.device,
                 pipe.unet.dtype, pipe.vae.dtype, PriorCache(cfg.cache_prior), plan or schedule(cfg),
                 noise_scales(scheduler, pipe.device))


def noise_scales(scheduler: DDPMScheduler, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(alpha_bar), sqrt(1 - alpha_bar))`` of every training timestep on ``device``: computed as
    ``scheduler.add_noise`` computes them, once instead of every step."""
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    return alphas**0.5, (1 - alphas) ** 0.5


def compile_unet(unet, backend: str = "inductor") -> None:
    """Regional compilation: ``torch.compile`` each of the UNet's repeated transformer blocks in place with
    ``backend`` (diffusers' ``compile_repeated_blocks``), compiled at their first call (``train`` does it
    after counting the first step's FLOPs). The 70 blocks share their code: SDXL compiles 3 graphs (with
    and without gradient at the input, then one with dynamic sizes), not one per layer, because the one
    splice processor reads each layer's K/V from its module; and one graph serves every template pair."""
    import torch._dynamo  # only with compile_unet: its import alone takes about a second

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise LatexBlendError(f"unknown compile backend '{backend}' (known: "
                              f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
    unet.compile_repeated_blocks(backend=backend)
