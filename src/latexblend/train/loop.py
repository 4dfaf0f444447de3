"""Stage 1 (METHOD section 2): single-concept fine-tuning with a frozen base flow.

Trainable: ``to_k``/``to_v`` of every attn2 layer (the concept flow; fp32 master weights, or LoRA
factors) and the identifier row of both text encoders (a separate fp32 parameter injected by a
hook, so no other embedding row can change). In every attn2 layer the instance sample attends to
the base flow's K/V of a *replace* prompt (``a dog``, cached per template before training) with the
span rows overwritten by the concept flow's rows at ``<new1> dog`` (:class:`~latexblend.attention.
SpliceState`). Every random draw of step ``s`` comes from a generator seeded by ``(seed, s, process)``,
so resuming needs only the weights, the optimizer state and the step.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latexblend.attention import SpliceProcessor, SpliceState, install_processors, project_kv
from latexblend.bank.extract import bank_dtype, extract_bank
from latexblend.config import TrainConfig
from latexblend.device import (
    device_name,
    environment,
    flop_counter,
    mfu,
    peak_memory,
    peak_tflops,
    resolve_mixed_precision,
)
from latexblend.errors import LatexBlendError
from latexblend.text import ENCODERS, concept_span, encode_prompts, pipeline_text_side
from latexblend.tokens import Span, token_ids
from latexblend.train.data import (
    augment,
    draw,
    draw_flip,
    list_images,
    load_prior,
    open_image,
    prior_dir,
    prior_sample,
    template_pool,
)
from latexblend.train.runfolder import (
    check_run_folder,
    config_hash,
    merge_lora,
    prune_checkpoints,
    read_checkpoint,
    start_run_folder,
    write_checkpoint,
    write_run_info,
    write_weights,
)

# --------------------------------------------------------------------------- trainable pieces


class LowRankLinear(nn.Module):
    """``W0 x + B (A x)`` with ``W0`` frozen and ``B`` initialised to zero (``--kv-rank``)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        return merge_lora(self.base.weight, self.lora_A, self.lora_B)


class IdentifierRows:
    """One fp32 parameter per text encoder for the identifier's embedding row, put in place of the
    frozen row by a forward hook on the input embedding (``[B, 77] ids -> [B, 77, D]``)."""

    def __init__(self, encoders, token_id: int):
        self.token_id = token_id
        self.rows = []
        for encoder in encoders:
            emb = encoder.get_input_embeddings()
            row = nn.Parameter(emb.weight[token_id].detach().float().clone())
            emb.register_forward_hook(self._hook(row))
            self.rows.append(row)

    def _hook(self, row: nn.Parameter):
        def hook(module, inputs, output):
            hit = (inputs[0] == self.token_id).unsqueeze(-1)
            return torch.where(hit, row.to(output.dtype), output)

        return hook

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: row.detach().cpu().contiguous() for name, row in zip(ENCODERS, self.rows, strict=True)}


@dataclass
class Template:
    """One template of the pool: the instance prompt and its span; the replace prompt's span, pooled
    embedding [P] and frozen base-flow ``(k, v)`` [77, C] per layer."""

    instance: str
    concept_span: Span
    replace_span: Span
    pooled: torch.Tensor
    base_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]


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


@dataclass
class Setup:
    cfg: TrainConfig
    pipe: object
    images: list
    prior: list
    templates: list[Template]
    rows: IdentifierRows
    kv: dict[str, nn.Module]  # "<layer>.to_k" -> the trainable projection
    state: SpliceState
    scheduler: object
    fingerprint: str
    size: int
    dtype: torch.dtype
    # the pipeline's device and the UNet's and VAE's weight dtypes, read once: diffusers walks every
    # module for ``pipe.device`` and ``model.dtype``, which cost milliseconds per call
    device: torch.device
    unet_dtype: torch.dtype
    vae_dtype: torch.dtype
    prior_cache: PriorCache
    extra: dict = field(default_factory=dict)

    def kv_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("rows.")}

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for name, mod in self.kv.items():
            for pname, p in mod.named_parameters():
                if p.requires_grad:
                    out.append((f"{name}.{pname}", p))
        return out + [(f"rows.{e}", r) for e, r in zip(ENCODERS, self.rows.rows, strict=True)]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Effective fine-tuned ``(W_k, W_v)`` per attn2 layer (fp32)."""
        def w(mod):
            return mod.merged_weight() if isinstance(mod, LowRankLinear) else mod.weight.float()

        layers = dict.fromkeys(name.rsplit(".", 1)[0] for name in self.kv)
        return {layer: (w(self.kv[f"{layer}.to_k"]).detach(), w(self.kv[f"{layer}.to_v"]).detach()) for layer in layers}


# --------------------------------------------------------------------------- building


def check_inputs(cfg: TrainConfig) -> tuple[list, list]:
    """Instance images (loaded) and prior ``(path, caption)`` pairs; clear errors before any work."""
    images = [open_image(p) for p in list_images(cfg.images, "instance image")]
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


def _trainable_kv(unet, rank: int) -> dict[str, nn.Module]:
    from latexblend.models import attn2_modules

    out = {}
    for layer, attn in attn2_modules(unet).items():
        if attn.norm_cross:
            raise LatexBlendError(f"{layer} normalises its text context; only SDXL-style attn2 is supported")
        for proj in ("to_k", "to_v"):
            mod = getattr(attn, proj)
            if rank:
                mod = LowRankLinear(mod, rank)
                setattr(attn, proj, mod)
            else:
                mod.to(torch.float32).weight.requires_grad_(True)
            out[f"{layer}.{proj}"] = mod
    return out


def _templates(pipe, cfg: TrainConfig, token_id: int, noun_ids: list[int]) -> list[Template]:
    """The pool's prompts with spans, and the frozen base flow of each replace prompt (pretrained weights)."""
    from latexblend.models import attn2_modules

    out = []
    toks, encs = pipeline_text_side(pipe)
    for template in template_pool(cfg.fixed_template):
        instance, replace = template.format(f"{cfg.token} {cfg.class_noun}"), template.format(f"a {cfg.class_noun}")
        with torch.no_grad():
            context, pooled = encode_prompts(toks, encs, [replace], pipe.device)
            base = {layer: tuple(t[0] for t in project_kv(attn, context)) for layer, attn in
                    attn2_modules(pipe.unet).items()}
        out.append(Template(instance, concept_span(toks[0], instance, token_id, noun_ids),
                            concept_span(toks[0], replace, "a", noun_ids), pooled[0], base))
    return out


def build_setup(cfg: TrainConfig, images: list, prior: list, device, dtype: torch.dtype) -> Setup:
    """Load the base model, freeze it, add the identifier, cache the base flow, make the concept flow."""
    from diffusers import DDPMScheduler

    from latexblend.models import fingerprint, load_pipeline
    from latexblend.tokens import add_identifier_token

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
    noun_ids = token_ids(pipe.tokenizer, cfg.class_noun)
    templates = _templates(pipe, cfg, token_id, noun_ids)
    fp = fingerprint(pipe.unet).to_json()
    torch.manual_seed(cfg.seed)  # LoRA initialisation, identical on every process
    kv = _trainable_kv(pipe.unet, cfg.kv_rank)
    rows = IdentifierRows(encs, token_id)
    state = SpliceState()
    install_processors(pipe.unet, lambda layer: SpliceProcessor(layer, state))
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Setup(cfg, pipe, images, prior, templates, rows, kv, state, scheduler, fp, size, dtype, pipe.device,
                 pipe.unet.dtype, pipe.vae.dtype, PriorCache(cfg.cache_prior))


def compile_unet(unet, backend: str = "inductor") -> None:
    """``torch.compile`` the UNet's forward in place with ``backend``; compiled at its first call (``train``
    does it after counting the first step's FLOPs). One graph serves every template pair: the splice
    reads span positions from a tensor."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise LatexBlendError(f"unknown compile backend '{backend}' (known: "
                              f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
    unet.compile(backend=backend)


# --------------------------------------------------------------------------- one step


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of every random draw of ``step`` on process ``rank``."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Batch:
    """``[instance..., prior...]``: latents/noise [B, 4, h, w], timesteps [B], masks [n, 1, h, w],
    time_ids [B, 6], prompts [B], the replace template of each instance sample."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    masks: torch.Tensor
    time_ids: torch.Tensor
    prompts: list[str]
    replace: list[Template]
    n_instance: int


def make_batch(setup: Setup, g: torch.Generator) -> Batch:
    """Draw images, templates (independently for the two flows), augmentation, noise and timesteps.
    Each latent is drawn with ``g`` from its VAE distribution (a prior image's from the prior cache)."""
    cfg, factor, device = setup.cfg, setup.pipe.vae_scale_factor, setup.device
    samples, prompts, replace = [], [], []
    for _ in range(cfg.batch_size):
        image = draw(g, setup.images)
        prompts.append(draw(g, setup.templates).instance)
        replace.append(draw(g, setup.templates))
        samples.append(augment(image, setup.size, factor, g, cfg.augment_shrink, cfg.augment_enlarge))
    moments, time_ids = [_vae_moments(setup, torch.stack([s.pixels for s in samples]))], [s.time_ids for s in samples]
    for _ in range(cfg.batch_size if setup.prior else 0):
        path, caption = draw(g, setup.prior)
        prior_moments, ids = prior_latent(setup, path, draw_flip(g))
        moments.append(prior_moments)
        time_ids.append(ids)
        prompts.append(caption)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(torch.cat(moments)).sample(generator=g).float()
    latents = latents * setup.pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.randint(0, setup.scheduler.config.num_train_timesteps, (len(time_ids),), generator=g).to(device)
    masks = torch.stack([s.mask for s in samples]).to(device)
    if not cfg.crop_time_ids:  # what inference passes
        time_ids = [(setup.size, setup.size, 0, 0, setup.size, setup.size)] * len(time_ids)
    time_ids = torch.tensor(time_ids, dtype=torch.float32, device=device)
    return Batch(latents, noise, t, masks, time_ids, prompts, replace, cfg.batch_size)


def _vae_moments(setup: Setup, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean, log-variance) [B, 8, h, w] of ``pixels`` [B, 3, H, W]."""
    with torch.no_grad():
        return setup.pipe.vae.encode(pixels.to(setup.device, setup.vae_dtype)).latent_dist.parameters


def prior_latent(setup: Setup, path, flip: bool) -> tuple[torch.Tensor, tuple]:
    """``(VAE moments [1, 8, h, w], time_ids)`` of prior image ``path`` (hflipped when ``flip``), cached."""
    def compute():
        sample = prior_sample(open_image(path), setup.size, setup.pipe.vae_scale_factor, flip)
        return _vae_moments(setup, sample.pixels[None]), sample.time_ids

    return setup.prior_cache.get(("latent", str(path), flip), compute)


def _encode(setup: Setup, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(*pipeline_text_side(setup.pipe), prompts, setup.device)


def prior_text(setup: Setup, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [1, 77, D], pooled [1, P])`` of a prior caption: frozen (no identifier), so no gradient; cached."""
    def compute():
        with torch.no_grad():
            return _encode(setup, [caption])

    return setup.prior_cache.get(("text", caption), compute)


def fill_prior_cache(setup: Setup) -> None:
    """Encode every prior image (both flips) and caption now: the steady state of a long run (benchmarks)."""
    if not setup.prior_cache.enabled:
        return
    for path, caption in setup.prior:
        for flip in (False, True):
            prior_latent(setup, path, flip)
        prior_text(setup, caption)


def encode_batch(setup: Setup, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [B, 77, D], pooled [B, P])`` with the learned identifier rows; with the base flow the
    instance samples' pooled embedding is the replace prompt's (METHOD section 2, item 6). Prior
    captions come from :func:`prior_text`."""
    n = batch.n_instance
    context, pooled = _encode(setup, batch.prompts[:n])
    if setup.cfg.base_flow:
        pooled = torch.stack([t.pooled for t in batch.replace]).to(pooled.dtype)
    prior = [prior_text(setup, caption) for caption in batch.prompts[n:]]
    return torch.cat([context, *(c for c, _ in prior)]), torch.cat([pooled, *(p for _, p in prior)])


def unet_loss(setup: Setup, batch: Batch, context: torch.Tensor, pooled: torch.Tensor) -> tuple:
    """``(instance loss, prior loss)``: epsilon MSE, the instance term inside the augmentation mask."""
    n, state, sched = batch.n_instance, setup.state, setup.scheduler
    by_prompt = {t.instance: t.concept_span for t in setup.templates}
    state.base_kv = [t.base_kv for t in batch.replace] if setup.cfg.base_flow else []
    state.set_spans([by_prompt[p] for p in batch.prompts[:n]], [t.replace_span for t in batch.replace],
                    setup.device)
    noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
    dtype = setup.unet_dtype
    pred = setup.pipe.unet(noisy.to(dtype), batch.timesteps, context.to(dtype),
                           added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": batch.time_ids}).sample
    target = batch.noise
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(batch.latents, batch.noise, batch.timesteps)
    err = (pred.float() - target.float()).pow(2)
    inst = (err[:n] * batch.masks).sum() / (batch.masks.sum() * err.shape[1])
    prior = err[n:].mean() if err.shape[0] > n else err.new_zeros(())
    return inst, prior


def step_loss(setup: Setup, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, instance loss, prior loss)`` of training step ``step`` on process ``rank``."""
    batch = make_batch(setup, step_generator(setup.cfg.seed, step, rank))
    context, pooled = encode_batch(setup, batch)
    inst, prior = unet_loss(setup, batch, context, pooled)
    return inst + setup.cfg.prior_loss_weight * prior, inst, prior


# --------------------------------------------------------------------------- one optimizer step

#: Largest flat gradient buffer of one collective (bytes): 341 M fp32 SDXL K/V values take 6 buckets.
BUCKET_BYTES = 256 * 2**20


def grad_buckets(params: list[nn.Parameter], cap: int = BUCKET_BYTES) -> list[list[nn.Parameter]]:
    """``params`` in order, cut into runs of one dtype and device of at most ``cap`` bytes (or one tensor)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or (last.dtype, last.device) != (p.dtype, p.device) or size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def average_gradients(params: list[nn.Parameter], reduce, cap: int = BUCKET_BYTES) -> None:
    """Average every gradient across processes with one collective per bucket (:func:`grad_buckets`).

    ``reduce(flat) -> flat`` is the cross-process mean of a 1-D tensor (the identity on one process).
    A missing gradient counts as zeros; afterwards each ``p.grad`` is a view of its bucket's reduced
    buffer. One code path for 1 and N processes; per element the same sum and division as reducing
    each gradient on its own.
    """
    for bucket in grad_buckets(params, cap):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        flat = reduce(flat)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad = g.view_as(p)


def train_step(setup: Setup, optimizer, acc, step: int, params: list[nn.Parameter]) -> torch.Tensor:
    """One optimizer step of ``train`` and ``bench train``: ``grad_accum`` micro-batches, gradients averaged
    across processes, clipped, the update. Returns ``[loss, instance loss, prior loss]`` of this process
    (mean over its micro-batches), detached and on the device: reading it is the caller's sync.

    Micro-batch ``m`` of process ``r`` draws its data as process ``r * grad_accum + m`` would with one
    micro-batch, so ``k`` micro-batches on one process train exactly as ``k`` processes do. ``acc``: the
    ``accelerate.Accelerator`` (autocast, backward with fp16 loss scaling, collectives, clipping).
    """
    accum = setup.cfg.grad_accum
    total = None
    for micro in range(accum):
        with acc.autocast():
            loss, inst, prior = step_loss(setup, step, acc.process_index * accum + micro)
        acc.backward(loss / accum)
        parts = torch.stack([loss.detach(), inst.detach(), prior.detach()])
        total = parts if total is None else total + parts
    if acc.num_processes > 1:  # one process: the identity, skipping two copies of every gradient
        average_gradients(params, lambda flat: acc.reduce(flat, reduction="mean"))
    if setup.cfg.max_grad_norm:
        acc.clip_grad_norm_(params, setup.cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum


def step_tflop(setup: Setup, acc, step: int) -> float:
    """TFLOP of training step ``step`` (forward and backward of its micro-batches: matmuls, convolutions,
    attention), counted on a separate pass whose gradients are dropped: the counter's dispatch mode can
    change the last bits of a backward, and the real step must not depend on whether it was counted."""
    accum = setup.cfg.grad_accum
    with flop_counter() as counter:
        for micro in range(accum):
            with acc.autocast():
                loss = step_loss(setup, step, acc.process_index * accum + micro)[0]
            loss.backward()
    for p in setup.parameters():
        p.grad = None
    return counter.tflop()


def accelerator(mixed_precision: str, device: str | None = None):
    """The ``accelerate.Accelerator`` of a training run (on CUDA when available, unless ``device`` is
    ``cpu``; ``auto`` precision: bf16 on CUDA when supported, else fp16; none on the CPU) and the compute
    dtype it implies."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and device != "cpu"
    mixed_precision = resolve_mixed_precision(mixed_precision) if cuda or mixed_precision != "auto" else "no"
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=1, cpu=not cuda)
    return acc, {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], lr: float):
    """AdamW: the fused kernel on CUDA and CPU (a handful of ops for all tensors; on the CPU 3.7x faster than
    the default per-tensor loop and 7x the multi-tensor path, docs/BENCHMARKS.md), the multi-tensor
    (foreach) path on other devices; 8-bit AdamW with ``use_8bit_adam``."""
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise LatexBlendError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    if params and params[0].device.type in ("cuda", "cpu"):
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


# --------------------------------------------------------------------------- the loop


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
    folder on the main process (``None`` on the others).

    ``on_step(step, losses, setup)`` is called after every optimizer step on every process (``step`` counts
    from 1; ``losses`` as :func:`train_step` returns them, unread; ``setup`` holds the trainables). The
    loss is read (a device sync) only at log steps.
    """
    from tqdm.auto import tqdm

    cfg.validate()  # also when called from Python with a config not built by config.merge
    acc, dtype = accelerator(cfg.mixed_precision)
    images, prior = check_inputs(cfg)
    run, resume_from = check_run_folder(cfg)
    summary_writer = _tensorboard() if cfg.log_tensorboard else None
    setup = build_setup(cfg, images, prior, acc.device, dtype)
    steps, lr = _schedule(cfg, acc.num_processes)
    setup.extra.update(steps=steps, lr=lr, num_processes=acc.num_processes, mixed_precision=acc.mixed_precision)
    params = setup.parameters()
    optimizer = acc.prepare(make_optimizer(cfg, params, lr))
    start = load_checkpoint(setup, optimizer, resume_from) if resume_from else 0
    if resume_from and acc.is_main_process:
        tqdm.write(f"resuming from step {start} ({resume_from})")
    if acc.is_main_process:
        start_run_folder(cfg, run, resume_from)
    writer = summary_writer(str(run / "tb")) if summary_writer and acc.is_main_process else None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=cfg.name,
               disable=not (progress and acc.is_main_process))
    meter = Meter(peak_tflops(device_name(setup.device), cfg.peak_tflops), last_step=start)
    t0, loss = time.perf_counter(), float("nan")
    for step in bar:
        if step == start:
            meter.tflop = step_tflop(setup, acc, step)
            if cfg.compile_unet:
                compile_unet(setup.pipe.unet, cfg.compile_backend)
        losses = train_step(setup, optimizer, acc, step, params)
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            loss = _log(setup, acc, bar, writer, meter, losses, done)
        if acc.is_main_process and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            save_checkpoint(setup, optimizer, run, done)
            prune_checkpoints(run, cfg.keep_checkpoints)
        if on_step:
            on_step(done, losses, setup)
    wall = time.perf_counter() - t0
    if acc.is_main_process:
        _finish(setup, run, start, wall, loss, meter)
    acc.wait_for_everyone()
    return run if acc.is_main_process else None


def _schedule(cfg: TrainConfig, processes: int) -> tuple[int, float]:
    """``(steps, lr)``: 3000 samples per image slot by default, lr scaled by the effective batch."""
    steps = cfg.steps or max(1, 3000 // (processes * cfg.grad_accum))
    batch = cfg.batch_size * (2 if cfg.use_prior else 1) * processes * cfg.grad_accum
    return steps, cfg.lr * (batch if cfg.scale_lr else 1)


def _log(setup: Setup, acc, bar, writer, meter: Meter, losses: torch.Tensor, done: int) -> float:
    """Read the step's losses (the one sync and collective of a log step), write the log line; the loss."""
    loss, inst, prior = acc.reduce(losses, reduction="mean").tolist()
    rate = meter.tick(done)
    bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
    if acc.is_main_process:
        bar.write(f"step {done}/{setup.extra['steps']} | loss {loss:.4f} (instance {inst:.4f}, prior {prior:.4f}) | "
                  f"{rate:.2f} steps/s | {meter.mfu_text(rate)} | peak mem {peak_memory(setup.device) / 2**30:.2f} GiB")
        if writer:
            writer.add_scalar("loss", loss, done)
    return loss


def _tensorboard():
    """tensorboard's ``SummaryWriter`` class, or a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise LatexBlendError("--log-tensorboard needs tensorboard (pip install tensorboard)") from err
    return SummaryWriter


# --------------------------------------------------------------------------- run folder files


def _training_summary(setup: Setup) -> dict:
    cfg = setup.cfg
    return {"steps": setup.extra["steps"], "lr": setup.extra["lr"], "base_lr": cfg.lr, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": setup.extra["num_processes"],
            "base_flow": cfg.base_flow, "fixed_template": cfg.fixed_template, "resolution": setup.size,
            "prior": cfg.use_prior, "prior_loss_weight": cfg.prior_loss_weight, "kv_rank": cfg.kv_rank,
            "augment_shrink": cfg.augment_shrink, "augment_enlarge": cfg.augment_enlarge,
            "crop_time_ids": cfg.crop_time_ids,
            "token": cfg.token, "init_token": cfg.init_token, "images": str(Path(cfg.images).resolve())}


def save_trainables(setup: Setup, folder: Path, extra_meta: dict | None = None) -> None:
    """``kv.safetensors`` (attn2 to_k/to_v weights or LoRA factors, fp32) and ``tokens.safetensors``."""
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in setup.kv))
    kv_meta = {"kind": "lora" if setup.cfg.kv_rank else "full", "rank": str(setup.cfg.kv_rank),
               "layers": json.dumps(layers), "base_fingerprint": setup.fingerprint,
               "training": json.dumps(_training_summary(setup)), **(extra_meta or {})}
    rows_meta = {"token": setup.cfg.token, "init_token": setup.cfg.init_token, "token_id": str(setup.rows.token_id)}
    write_weights(folder, setup.kv_tensors(), kv_meta, setup.rows.tensors(), rows_meta)


def save_checkpoint(setup: Setup, optimizer, run: Path, step: int) -> Path:
    """``run/checkpoints/step_<step>/``: trainables, optimizer state (tensors and numbers only), state.json."""
    return write_checkpoint(run, step, lambda folder: save_trainables(setup, folder), optimizer.state_dict(),
                            config_hash(setup.cfg))


def load_checkpoint(setup: Setup, optimizer, folder: Path) -> int:
    """Restore trainables and optimizer state from ``folder``; returns the step to continue from."""
    step, kv, rows, state = read_checkpoint(folder, config_hash(setup.cfg))
    with torch.no_grad():
        for name, p in setup.kv_tensors().items():
            p.copy_(kv[name])
        for key, row in zip(ENCODERS, setup.rows.rows, strict=True):
            row.copy_(rows[key])
    optimizer.load_state_dict(state)
    return step


def _finish(setup: Setup, run: Path, start: int, wall: float, loss: float, meter: Meter) -> None:
    """Final weights, run.json, and the bank (Stage 2, no separate step)."""
    from latexblend.bank.format import SUFFIX, bank_dir, save_bank

    cfg, pipe, steps = setup.cfg, setup.pipe, setup.extra["steps"]
    save_trainables(setup, run)
    training = {**_training_summary(setup), "final_loss": loss}
    toks, encs = pipeline_text_side(pipe)
    bank = extract_bank(toks, encs, setup.weights(), name=cfg.name, class_noun=cfg.class_noun,
                        token_id=setup.rows.token_id, prompt=cfg.extract_prompt.format(token=cfg.token,
                                                                                       noun=cfg.class_noun),
                        base_model=cfg.model, fingerprint=setup.fingerprint, training=training,
                        dtype=bank_dtype(cfg.bank_dtype, pipe.device, setup.dtype))
    bank_path = save_bank(bank, bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}")
    rate = (steps - start) / wall if wall > 0 else None
    info = {"versions": environment(), "device": device_name(setup.device),
            "num_processes": setup.extra["num_processes"], "mixed_precision": setup.extra["mixed_precision"],
            "start_step": start, "steps": steps, "steps_per_s": rate, "wall_s": wall,
            "tflop_per_step": meter.tflop, "mfu": mfu(meter.tflop, rate, meter.peak) if rate else None,
            "peak_memory_bytes": peak_memory(setup.device), "final_loss": loss, "lr": setup.extra["lr"],
            "bank": str(bank_path)}
    write_run_info(run, info)
