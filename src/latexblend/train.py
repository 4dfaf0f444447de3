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
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latexblend.attention import SpliceProcessor, SpliceState, install_processors, project_kv
from latexblend.config import TrainConfig, to_dict
from latexblend.data import (
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
from latexblend.errors import LatexBlendError
from latexblend.extract import ENCODERS, KV_FILE, TOKENS_FILE, bank_dtype, concept_span, encode_prompts, extract_bank
from latexblend.fileio import save_safetensors, write_text_atomic
from latexblend.tokens import Span, token_ids

#: Settings that do not change what a step computes (may differ when resuming).
_NOT_HASHED = ("steps", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "log_every", "log_tensorboard",
               "runs_dir", "bank_dir", "bank_dtype", "extract_prompt", "gradient_checkpointing", "cache_prior",
               "compile_unet")
#: torch.compile backend of ``compile_unet`` (tests use "eager": the same graph capture, no code generation)
COMPILE_BACKEND = "inductor"


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
        return self.base.weight.float() + self.lora_B @ self.lora_A


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
    toks, encs = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
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
    toks, encs = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
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
    if cfg.compile_unet:
        compile_unet(pipe.unet)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Setup(cfg, pipe, images, prior, templates, rows, kv, state, scheduler, fp, size, dtype, pipe.device,
                 pipe.unet.dtype, pipe.vae.dtype, PriorCache(cfg.cache_prior))


def compile_unet(unet) -> None:
    """``torch.compile`` the UNet's forward in place (with :data:`COMPILE_BACKEND`); compiled at its first call.
    One graph serves every template pair: the splice reads span positions from a tensor."""
    unet.compile(backend=COMPILE_BACKEND)


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
        samples.append(augment(image, setup.size, factor, g))
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
    pipe = setup.pipe
    return encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts,
                          setup.device)


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


# --------------------------------------------------------------------------- the loop

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


def train(cfg: TrainConfig, progress: bool = True, on_step=None) -> Path | None:
    """Train one concept; write ``runs/<name>/`` and ``concept_bank/<name>.safetensors``. Returns the run
    folder on the main process (``None`` on the others).

    ``on_step(step, loss)`` is called after every optimizer step (``step`` counts from 1).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from latexblend.models import resolve_mixed_precision

    mixed = resolve_mixed_precision(cfg.mixed_precision)
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=1, cpu=not torch.cuda.is_available())
    images, prior = check_inputs(cfg)
    run, resume_from = _check_run_folder(cfg)
    summary_writer = _tensorboard() if cfg.log_tensorboard else None
    steps = cfg.steps or 3000 // acc.num_processes
    lr = cfg.lr * (cfg.batch_size * (2 if cfg.use_prior else 1) * acc.num_processes if cfg.scale_lr else 1)
    setup = build_setup(cfg, images, prior, acc.device, {"no": torch.float32, "bf16": torch.bfloat16,
                                                         "fp16": torch.float16}[mixed])
    setup.extra.update(steps=steps, lr=lr, num_processes=acc.num_processes, mixed_precision=mixed)
    params = setup.parameters()
    optimizer = acc.prepare(_optimizer(cfg, params, lr))
    start = load_checkpoint(setup, optimizer, resume_from) if resume_from else 0
    if resume_from and acc.is_main_process:
        tqdm.write(f"resuming from step {start} ({resume_from})")
    if acc.is_main_process:
        _start_run_folder(cfg, run, resume_from)
    writer = summary_writer(str(run / "tb")) if summary_writer and acc.is_main_process else None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=cfg.name,
               disable=not (progress and acc.is_main_process))
    t0, loss_value = time.perf_counter(), float("nan")
    for step in bar:
        with acc.autocast():
            loss, inst, prior_loss = step_loss(setup, step, acc.process_index)
        acc.backward(loss)
        average_gradients(params, lambda flat: acc.reduce(flat, reduction="mean"))
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(acc.reduce(loss.detach(), reduction="mean"))
        done, rate = step + 1, (step + 1 - start) / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss_value:.4f}", steps_per_s=f"{rate:.2f}")
        if acc.is_main_process and (done % cfg.log_every == 0 or done == steps):
            parts = f"instance {float(inst.detach()):.4f}, prior {float(prior_loss.detach()):.4f}"
            bar.write(f"step {done}/{steps} | loss {loss_value:.4f} ({parts}) | {rate:.2f} steps/s | "
                      f"peak mem {_peak_memory() / 2**30:.2f} GiB")
            if writer:
                writer.add_scalar("loss", loss_value, done)
        if acc.is_main_process and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            save_checkpoint(setup, optimizer, run, done)
            prune_checkpoints(run, cfg.keep_checkpoints)
        if on_step:
            on_step(done, loss_value)
    wall = time.perf_counter() - t0
    _debug_dump(setup, acc.process_index)
    if acc.is_main_process:
        _finish(setup, run, start, steps, wall, loss_value)
    acc.wait_for_everyone()
    return run if acc.is_main_process else None


def _optimizer(cfg: TrainConfig, params, lr: float):
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise LatexBlendError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from err
    return bnb.optim.AdamW8bit(params, **kwargs)


def _tensorboard():
    """tensorboard's ``SummaryWriter`` class, or a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise LatexBlendError("--log-tensorboard needs tensorboard (pip install tensorboard)") from err
    return SummaryWriter


def _peak_memory() -> int:
    """Peak bytes: CUDA allocator peak, else the process's max resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------- run folder and checkpoints


def config_hash(cfg: TrainConfig) -> str:
    data = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_run_folder(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint to resume from)``; refuses to clobber a run or a bank by accident. A run
    folder without weights (stopped before its first checkpoint) holds nothing to keep or resume: it is
    started again from step 0, also under ``--resume latest``."""
    from latexblend.bank import SUFFIX, bank_dir

    run = Path(cfg.runs_dir) / cfg.name
    kept = _has_weights(run)
    if cfg.resume and (cfg.resume != "latest" or kept):
        return run, find_checkpoint(run, cfg.resume)
    if kept and not cfg.overwrite:
        raise LatexBlendError(f"{run} already exists; continue it with --resume latest, or pass --overwrite")
    bank = bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}"
    if bank.exists() and not cfg.overwrite:
        raise LatexBlendError(f"{bank} already exists; pass --overwrite or choose another --name")
    if run.exists() and any(run.iterdir()) and not kept and not cfg.overwrite:
        print(f"{run} holds no checkpoint (an earlier run stopped before its first one): starting it from step 0")
    return run, None


def _has_weights(run: Path) -> bool:
    """Does ``run`` hold final weights or a checkpoint (anything worth keeping)?"""
    return (run / KV_FILE).is_file() or any((p / "state.json").is_file() for p in run.glob("checkpoints/step_*"))


def find_checkpoint(run: Path, which: str) -> Path:
    """``latest`` -> the newest ``run/checkpoints/step_<N>``; a path -> that checkpoint (or a run's newest)."""
    path = run if which == "latest" else Path(which)
    if not path.exists():
        raise LatexBlendError(f"--resume {which}: {path} does not exist")
    if (path / "state.json").is_file():
        return path
    steps = sorted((p for p in (path / "checkpoints").glob("step_*") if (p / "state.json").is_file()
                    and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if not steps:
        raise LatexBlendError(f"--resume {which}: no checkpoint in {path} (looked for checkpoints/step_<N>/state.json)")
    return steps[-1]


def _start_run_folder(cfg: TrainConfig, run: Path, resume_from: Path | None) -> None:
    import yaml

    if resume_from is None and run.exists():
        shutil.rmtree(run)  # --overwrite (checked up-front)
    resolved = {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")}
    write_text_atomic(run / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))


def _training_summary(setup: Setup) -> dict:
    cfg = setup.cfg
    return {"steps": setup.extra["steps"], "lr": setup.extra["lr"], "base_lr": cfg.lr, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "num_processes": setup.extra["num_processes"],
            "base_flow": cfg.base_flow, "fixed_template": cfg.fixed_template, "resolution": setup.size,
            "prior": cfg.use_prior, "prior_loss_weight": cfg.prior_loss_weight, "kv_rank": cfg.kv_rank,
            "token": cfg.token, "init_token": cfg.init_token, "images": str(Path(cfg.images).resolve())}


def save_trainables(setup: Setup, folder: Path, extra_meta: dict | None = None) -> None:
    """``kv.safetensors`` (attn2 to_k/to_v weights or LoRA factors, fp32) and ``tokens.safetensors``."""
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in setup.kv))
    meta = {"kind": "lora" if setup.cfg.kv_rank else "full", "rank": str(setup.cfg.kv_rank),
            "layers": json.dumps(layers), "base_fingerprint": setup.fingerprint,
            "training": json.dumps(_training_summary(setup)), **(extra_meta or {})}
    kv = {name: p.detach().cpu().contiguous() for name, p in setup.kv_tensors().items()}
    save_safetensors(kv, folder / KV_FILE, meta)
    meta = {"token": setup.cfg.token, "init_token": setup.cfg.init_token, "token_id": str(setup.rows.token_id)}
    save_safetensors(setup.rows.tensors(), folder / TOKENS_FILE, meta)


def save_checkpoint(setup: Setup, optimizer, run: Path, step: int) -> Path:
    """``run/checkpoints/step_<step>/``: trainables, optimizer state (tensors and numbers only), state.json.
    Written into a temporary folder and renamed, so a checkpoint is complete or absent."""
    final = run / "checkpoints" / f"step_{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainables(setup, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config_hash": config_hash(setup.cfg)}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``run`` (``keep`` 0: keep all); returns the deleted."""
    steps = sorted((p for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    old = steps[:-keep] if keep else []
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def load_checkpoint(setup: Setup, optimizer, folder: Path) -> int:
    """Restore trainables and optimizer state from ``folder``; returns the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    if state["config_hash"] != config_hash(setup.cfg):
        raise LatexBlendError(f"{folder} was written with different training settings; resume with the run's "
                              f"own config.yaml")
    kv, rows = load_file(str(folder / KV_FILE)), load_file(str(folder / TOKENS_FILE))
    with torch.no_grad():
        for name, p in setup.kv_tensors().items():
            p.copy_(kv[name])
        for key, row in zip(ENCODERS, setup.rows.rows, strict=True):
            row.copy_(rows[key])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(state["step"])


def _finish(setup: Setup, run: Path, start: int, steps: int, wall: float, loss: float) -> None:
    """Final weights, run.json, and the bank (Stage 2, no separate step)."""
    import platform

    import accelerate
    import diffusers
    import transformers

    from latexblend.bank import SUFFIX, bank_dir, save_bank

    cfg, pipe = setup.cfg, setup.pipe
    save_trainables(setup, run)
    training = {**_training_summary(setup), "final_loss": loss}
    bank = extract_bank([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                        setup.weights(), name=cfg.name, class_noun=cfg.class_noun, token_id=setup.rows.token_id,
                        prompt=cfg.extract_prompt.format(token=cfg.token, noun=cfg.class_noun),
                        base_model=cfg.model, fingerprint=setup.fingerprint, training=training,
                        dtype=bank_dtype(cfg.bank_dtype, pipe.device, setup.dtype))
    bank_path = save_bank(bank, bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}")
    device = torch.cuda.get_device_name() if pipe.device.type == "cuda" else platform.processor() or "cpu"
    info = {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__},
            "device": device, "num_processes": setup.extra["num_processes"],
            "mixed_precision": setup.extra["mixed_precision"], "start_step": start, "steps": steps,
            "steps_per_s": (steps - start) / wall if wall > 0 else None, "wall_s": wall,
            "peak_memory_bytes": _peak_memory(), "final_loss": loss, "lr": setup.extra["lr"],
            "bank": str(bank_path)}
    write_text_atomic(run / "run.json", json.dumps(info, indent=2))


def _debug_dump(setup: Setup, rank: int) -> None:
    """With ``$LATEXBLEND_DEBUG_DUMP`` set, write a digest of this process's trainables (multi-process tests)."""
    prefix = os.environ.get("LATEXBLEND_DEBUG_DUMP")
    if not prefix:
        return
    h = hashlib.sha256()
    total = 0.0
    for _, p in setup.named_parameters():
        data = p.detach().cpu().contiguous()
        h.update(data.numpy().tobytes())
        total += float(data.double().sum())
    write_text_atomic(f"{prefix}.rank{rank}.json", json.dumps({"rank": rank, "sha256": h.hexdigest(), "sum": total}))
