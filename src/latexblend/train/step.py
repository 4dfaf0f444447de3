"""One training step (METHOD.md section 2): draw the batch (images, templates for both flows, augmentation,
noise, timesteps) from a generator seeded by ``(seed, step, process)``, encode it, run the UNet with the
splice, and take the epsilon loss; :func:`train_step` is the optimizer step over micro-batches and processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from latexblend.device import flop_counter
from latexblend.fileio import open_image
from latexblend.text import encode_prompts, pipeline_text_side
from latexblend.tokens import MAX_TOKENS
from latexblend.train.data import augment, draw, draw_flip, prior_sample
from latexblend.train.setup import Setup, Template


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of every random draw of ``step`` on process ``rank``."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Batch:
    """One micro-batch ``[instance..., prior...]`` (``B`` samples, ``n`` instance), on the device: what the
    step's device work reads, drawn on the host by :func:`make_batch` (the step's device work makes no
    draw and reads nothing back: :func:`step_losses`).

    ``pixels`` [n, 3, H, W] (instance images, augmented), ``eps`` [B, 4, h, w] (each latent's draw from
    its VAE distribution), ``noise`` [B, 4, h, w], ``timesteps`` [B], ``masks`` [n, 1, h, w], ``time_ids``
    [B, 6]; the prior samples' cached VAE moments [B - n, 8, h, w], text features [B - n, 77, D] and
    pooled [B - n, P]; ``index``: the step's integers in one tensor (:meth:`parts`). ``prompts`` and
    ``replace`` (each instance sample's replace template) are for reading only."""

    pixels: torch.Tensor
    eps: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    masks: torch.Tensor
    time_ids: torch.Tensor
    prior_moments: torch.Tensor | None
    prior_context: torch.Tensor | None
    prior_pooled: torch.Tensor | None
    index: torch.Tensor
    prompts: list[str]
    replace: list[Template]
    n_instance: int

    @property
    def size(self) -> int:
        return self.noise.shape[0]

    def parts(self) -> tuple[torch.Tensor, ...]:
        """``(rows [B * 77], take [B, 77, 1] bool, ids [n, 77], ids_2 [n, 77], base_index [n])``: the context
        row each spliced K/V row reads, whether it takes the concept flow's row (:class:`SpliceTables`), the
        instance prompts' token ids for both text encoders, and each instance sample's replace template."""
        b, n = self.size * MAX_TOKENS, self.n_instance
        rows, take, ids, ids_2, base = self.index.split([b, b, n * MAX_TOKENS, n * MAX_TOKENS, n])
        return rows, take.view(-1, MAX_TOKENS, 1).bool(), ids.view(n, -1), ids_2.view(n, -1), base

    def tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors by field name (what a CUDA graph's static batch holds)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def _draw_instances(setup: Setup, g: torch.Generator) -> tuple[list, list[int], list[int]]:
    """Each instance sample's augmented image and its (instance, replace) template indices."""
    samples, inst, rep = [], [], []
    pool = range(len(setup.templates))
    for _ in range(setup.cfg.batch_size):
        image = draw(g, setup.images)
        inst.append(draw(g, pool))
        rep.append(draw(g, pool))
        samples.append(augment(image, setup.size, setup.pipe.vae_scale_factor, g, setup.cfg.augment_shrink,
                               setup.cfg.augment_enlarge))
    return samples, inst, rep


def _index(setup: Setup, inst: list[int], rep: list[int], size: int) -> torch.Tensor:
    """:meth:`Batch.parts` of a batch of ``size`` samples whose instance samples use templates ``inst``
    and ``rep``, as one int64 tensor (on the host)."""
    t, base_flow = setup.tables, setup.cfg.base_flow
    rows, take, ids, ids_2 = [], [], [], []
    for b in range(size):
        if b < len(inst) and base_flow:
            r, k = t.rows[inst[b]][rep[b]], t.take[inst[b]][rep[b]]
        else:
            r, k = t.own_rows, t.own_take
        rows += [b * MAX_TOKENS + i for i in r]
        take += k
    for i in inst:
        ids += setup.templates[i].ids[0]
        ids_2 += setup.templates[i].ids[1]
    return torch.tensor(rows + take + ids + ids_2 + rep, dtype=torch.int64)


def make_batch(setup: Setup, g: torch.Generator) -> Batch:
    """Draw images, templates (independently for the two flows), augmentation, each latent's sample from
    its VAE distribution, noise and timesteps from ``g``, in that order, and move the batch to the device.
    A prior image's VAE moments and its caption's features come from the prior cache."""
    cfg, device = setup.cfg, setup.device
    samples, inst, rep = _draw_instances(setup, g)
    prompts, time_ids, prior = [setup.templates[i].instance for i in inst], [s.time_ids for s in samples], []
    for _ in range(cfg.batch_size if setup.prior else 0):
        path, caption = draw(g, setup.prior)
        moments, ids = prior_latent(setup, path, draw_flip(g))
        prior.append((moments, *prior_text(setup, caption)))
        time_ids.append(ids)
        prompts.append(caption)
    lat = setup.size // setup.pipe.vae_scale_factor
    shape = (len(time_ids), setup.pipe.vae.config.latent_channels, lat, lat)
    eps = torch.randn(shape, generator=g, dtype=_moments_dtype(setup))  # as DiagonalGaussianDistribution.sample
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, setup.scheduler.config.num_train_timesteps, (shape[0],), generator=g)
    if not cfg.crop_time_ids:  # what inference passes
        time_ids = [(setup.size, setup.size, 0, 0, setup.size, setup.size)] * len(time_ids)

    def cat(i):
        return (prior[0][i] if len(prior) == 1 else torch.cat([p[i] for p in prior])) if prior else None

    return Batch(torch.stack([s.pixels for s in samples]).to(device), eps.to(device), noise.to(device), t.to(device),
                 torch.stack([s.mask for s in samples]).to(device), torch.tensor(time_ids, dtype=torch.float32,
                                                                                 device=device),
                 cat(0), cat(1), cat(2), _index(setup, inst, rep, shape[0]).to(device), prompts,
                 [setup.templates[j] for j in rep], cfg.batch_size)


def _moments_dtype(setup: Setup) -> torch.dtype:
    """The dtype of the VAE's moments: its weights' dtype, or autocast's where autocast is on."""
    kind = setup.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else setup.vae_dtype


def _vae_moments(setup: Setup, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean, log-variance) [B, 8, h, w] of ``pixels`` [B, 3, H, W]."""
    with torch.no_grad():
        return setup.pipe.vae.encode(pixels.to(setup.device, setup.vae_dtype)).latent_dist.parameters


def batch_latents(setup: Setup, batch: Batch) -> torch.Tensor:
    """The batch's latents [B, 4, h, w] (fp32, scaled): the instance images encoded now, the prior images'
    cached moments, each sampled with its draw ``eps`` as ``DiagonalGaussianDistribution.sample`` does."""
    with torch.no_grad():
        moments = _vae_moments(setup, batch.pixels)
        if batch.prior_moments is not None:
            moments = torch.cat([moments, batch.prior_moments])
        mean, logvar = torch.chunk(moments, 2, dim=1)
        latents = mean + torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0)) * batch.eps
    return latents.float() * setup.pipe.vae.config.scaling_factor


def prior_latent(setup: Setup, path, flip: bool) -> tuple[torch.Tensor, tuple]:
    """``(VAE moments [1, 8, h, w], time_ids)`` of prior image ``path`` (hflipped when ``flip``), cached."""
    def compute():
        sample = prior_sample(open_image(path), setup.size, setup.pipe.vae_scale_factor, flip)
        return _vae_moments(setup, sample.pixels[None]), sample.time_ids

    return setup.prior_cache.get(("latent", str(path), flip), compute)


def prior_text(setup: Setup, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [1, 77, D], pooled [1, P])`` of a prior caption: frozen (no identifier), so no gradient; cached."""
    def compute():
        with torch.no_grad():
            return encode_prompts(*pipeline_text_side(setup.pipe), [caption], setup.device)

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
    """``(context [B, 77, D], pooled [B, P])`` with the learned identifier rows (the instance prompts' token
    ids, tokenized once per run); with the base flow the instance samples' pooled embedding is the replace
    prompt's (METHOD section 2, item 6). The prior samples' come from the prior cache."""
    _, _, ids, ids_2, base = batch.parts()
    encoders = pipeline_text_side(setup.pipe)[1]
    first, second = encoders[0](ids, output_hidden_states=True), encoders[1](ids_2, output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second[0]
    if setup.cfg.base_flow:
        pooled = setup.tables.pooled.index_select(0, base).to(pooled.dtype)
    if batch.prior_context is None:
        return context, pooled
    return torch.cat([context, batch.prior_context]), torch.cat([pooled, batch.prior_pooled])


def unet_loss(setup: Setup, batch: Batch, context: torch.Tensor, pooled: torch.Tensor) -> tuple:
    """``(instance loss, prior loss)``: epsilon MSE, the instance term inside the augmentation mask. The
    UNet's attn2 layers attend to the splice of the concept flow's K/V into the base flow (one projection
    and one ``where`` for all layers: :meth:`~latexblend.train.splice.SpliceState.set`)."""
    n, sched = batch.n_instance, setup.scheduler
    rows, take, _, _, base = batch.parts()
    placed = context.flatten(0, 1).index_select(0, rows).view(context.shape)
    setup.splice.set(setup.tables, setup.flow.project(placed), take, base, n)
    latents = batch_latents(setup, batch)
    keep, add = (s.index_select(0, batch.timesteps).view(-1, 1, 1, 1) for s in setup.noise_scales)
    noisy = keep * latents + add * batch.noise  # DDPMScheduler.add_noise, its factors computed once
    dtype = setup.unet_dtype
    pred = setup.pipe.unet(noisy.to(dtype), batch.timesteps, context.to(dtype),
                           added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": batch.time_ids}).sample
    target = batch.noise
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, batch.noise, batch.timesteps)
    err = (pred.float() - target.float()).pow(2)
    inst = (err[:n] * batch.masks).sum() / (batch.masks.sum() * err.shape[1])
    prior = err[n:].mean() if err.shape[0] > n else err.new_zeros(())
    return inst, prior


def step_losses(setup: Setup, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, instance loss, prior loss)`` of ``batch``: device work only (no draw, no read-back)."""
    context, pooled = encode_batch(setup, batch)
    inst, prior = unet_loss(setup, batch, context, pooled)
    return inst + setup.cfg.prior_loss_weight * prior, inst, prior


def step_loss(setup: Setup, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, instance loss, prior loss)`` of training step ``step`` on process ``rank``."""
    return step_losses(setup, make_batch(setup, step_generator(setup.cfg.seed, step, rank)))


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


def micro_batches(setup: Setup, acc, step: int) -> list[Batch]:
    """The ``grad_accum`` micro-batches of training step ``step`` on this process. Micro-batch ``m`` of process
    ``r`` draws its data as process ``r * grad_accum + m`` would with one micro-batch, so ``k`` micro-batches on
    one process train exactly as ``k`` processes do. Drawn under autocast: a prior-cache miss encodes there."""
    accum = setup.cfg.grad_accum
    with acc.autocast():
        return [make_batch(setup, step_generator(setup.cfg.seed, step, acc.process_index * accum + m))
                for m in range(accum)]


def update(setup: Setup, optimizer, acc, batches: list[Batch], params: list[nn.Parameter],
           autocast_kwargs=None) -> torch.Tensor:
    """The device work of one optimizer step: each micro-batch's losses and backward, gradients averaged
    across processes, clipped, the update; nothing read back (what a CUDA graph captures:
    :mod:`~latexblend.train.runner`). Returns ``[loss, instance loss, prior loss]`` (mean over the micro-batches).
    ``acc``: the ``accelerate.Accelerator`` (autocast, backward with fp16 loss scaling, collectives, clipping)."""
    total = None
    for batch in batches:
        with acc.autocast(autocast_kwargs):
            loss, inst, prior = step_losses(setup, batch)
        acc.backward(loss / len(batches))
        parts = torch.stack([loss.detach(), inst.detach(), prior.detach()])
        total = parts if total is None else total + parts
    setup.splice.clear()
    if acc.num_processes > 1:  # one process: the identity, skipping two copies of every gradient
        average_gradients(params, lambda flat: acc.reduce(flat, reduction="mean"))
    if setup.cfg.max_grad_norm:
        acc.clip_grad_norm_(params, setup.cfg.max_grad_norm)
    optimizer.step()
    return total / len(batches)


def train_step(setup: Setup, optimizer, acc, step: int, params: list[nn.Parameter]) -> torch.Tensor:
    """One optimizer step of ``train`` and ``bench train``, run eagerly: :func:`micro_batches`, :func:`update`,
    gradients zeroed. Returns ``[loss, instance loss, prior loss]`` of this process (mean over its
    micro-batches), detached and on the device: reading it is the caller's sync."""
    losses = update(setup, optimizer, acc, micro_batches(setup, acc, step), params)
    optimizer.zero_grad(set_to_none=True)
    return losses


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
