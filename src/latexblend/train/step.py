"""One training step (METHOD.md section 2): draw the batch (images, templates for both flows, augmentation,
noise, timesteps) from a generator seeded by ``(seed, step, process)``, encode it, run the UNet with the
splice, and take the epsilon loss; :func:`train_step` is the optimizer step over micro-batches and processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from latexblend.device import flop_counter
from latexblend.fileio import open_image
from latexblend.text import encode_prompts, pipeline_text_side
from latexblend.train.data import augment, draw, draw_flip, prior_sample
from latexblend.train.setup import Setup, Template


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
    n, state, sched = batch.n_instance, setup.splice, setup.scheduler
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
    for p in setup.flow.trainable():
        p.grad = None
    return counter.tflop()
