"""Blending guidance, self-attention rectification and attention-map saving, hooked into the stock
SDXL loop (METHOD sections 5 and 6) without forking it.

:class:`Steering` replaces the blend processors by :class:`~latexblend.attention.MapProcessor` (the same
K/V, SDPA unless a map is read or a logit edited) and adds a UNet pre-forward hook that runs, before
the step's own UNet call:

- **guidance** (while ``t/T >= window``): one extra UNet pass on the conditional branch with grad to
  the latent only, stopped after the last chosen layer. The pipeline hands the UNet
  ``x = scale_model_input(cat([z, z]), t) = s * z``; the hook recovers the scheduler-space latent
  ``z = x / s`` (``s`` from ``scheduler.scale_model_input`` on ones: a linear factor), differentiates
  ``g1 + g2`` at ``s * z`` with respect to ``z``, and updates ``z' = z - step_size * grad``. A pre-hook
  cannot rebind the pipeline's ``latents``, so it (a) feeds the UNet ``s * z'`` for both CFG halves
  and (b) hands the same update to ``scheduler.step``, which is wrapped to receive ``z'`` instead of
  ``z``: the step is exactly the stock step taken from ``z'``.
- **rectification** (at the first step with ``t/T < start``): one extra pass on the conditional branch
  without concept rows and without grad (stopped after the last attn2 layer), capturing
  cross-attention maps (all attn2 layers) and self-attention at the highest-resolution attn1 layers;
  the masks it yields then edit every attn2 layer's logits on the conditional branch for the rest of
  the call (explicit attention there; the edit is a fixed number of tensor ops per layer, from
  coefficient maps built once per resolution: :func:`~latexblend.rectify.coefficients`).
- **map saving**: the main pass records every attn2 layer's conditional maps, averaged over steps;
  :meth:`Steering.image_maps` gives them per image of the last call.

Everything that belongs to one pipeline call lives in a :class:`SteeredCall`, made anew by
:meth:`Steering.begin` when the blender's ``encode_prompt`` wrapper starts the call.

Why hooks and not diffusers' ``callback_on_step_end``: that callback runs after the step's
``scheduler.step`` (it can replace the latents only for the *next* step), so nothing runs through it
before step 0's UNet call, where the guidance window starts; and it is an argument of each pipeline
call, which ``apply()`` leaves to the caller. Guidance must change the latent before the step's UNet
call and the same step's ``scheduler.step``: the pre-hook does the first, the wrapped ``step`` (installed
only with guidance) the second.

The two extra passes end by an exception once their last layer has reported, so forward hooks on the
UNet and on the modules after that layer fire for the main pass only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latexblend.attention import MapProcessor, MapState, SelfMapProcessor, install_processors
from latexblend.blend.guidance import (
    GuidanceOptions,
    collector,
    guidance_pass,
    layer_hw,
    recording,
    run_until_recorded,
    select_layers,
    token_maps,
)
from latexblend.blend.rectify import RectifyOptions, coefficients, concept_masks, modulate, resize_masks
from latexblend.errors import LatexBlendError


def _cut(value, batch: int, offset: int):
    """The conditional rows of ``value`` (tensors with ``batch`` rows, also inside dicts)."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[offset:]
    if isinstance(value, dict):
        return {k: _cut(v, batch, offset) for k, v in value.items()}
    return value


@dataclass
class SteeredCall:
    """Steering's record of one pipeline call, made anew by :meth:`Steering.begin`."""

    row_spans: list  # the spans of each conditional sample
    latent_hw: tuple[int, int] | None = None  # the UNet's input latent grid
    pending: torch.Tensor | None = None  # this step's guidance update, for this step's scheduler.step
    masks: list | None = None  # per conditional sample once rectification has captured: [C, h, w] or None
    coef: dict = field(default_factory=dict)  # rectification coefficients per (batch, tokens, width, device)
    acc: dict = field(default_factory=dict)  # save_maps: each layer's conditional maps summed over steps
    steps: int = 0  # save_maps: main passes summed in ``acc``


class Steering:
    """Guidance / rectification / map saving for a :class:`~latexblend.blend.Blender` (see module doc)."""

    def __init__(self, blender, guidance: GuidanceOptions | None = None, rectify: RectifyOptions | None = None,
                 save_maps: bool = False):
        from latexblend.models import attn2_shapes

        self.pipe, self.state = blender.pipe, blender.state
        self.guidance, self.rectify, self.save_maps = guidance, rectify, save_maps
        shapes = attn2_shapes(self.pipe.unet)
        self.layers = list(shapes)
        self.guide_layers = select_layers(shapes, guidance.layers) if guidance else []
        self.maps = MapState()
        self.stats = {"guidance_passes": 0, "guidance_saved_bytes": None, "rectify_passes": 0}
        self.history: list[dict] = []  # with guidance.history, per pass of the last call: t_frac, loss [B], delta
        self.count_saved = False  # measure the guidance pass's saved activations (stats; benchmarks: costs time)
        self.call = SteeredCall([])
        self._busy = False
        self._restore = install_processors(self.pipe.unet, lambda layer: MapProcessor(layer, self.state, self.maps))
        self._hook = self.pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        self._scheduler = self.pipe.scheduler
        if guidance:  # the update must reach this step's scheduler.step too (see the module doc)
            self._step = self._scheduler.step
            self._scheduler.step = self._scheduler_step

    def remove(self) -> None:
        self._restore()
        self._hook.remove()
        if self.guidance:
            self._scheduler.__dict__.pop("step", None)

    def begin(self, call) -> None:
        """A new pipeline call (a :class:`~latexblend.blend.Call`) begins."""
        self.call = SteeredCall(call.row_spans)
        self.history = []
        self.maps.edit = None

    def _on_unet(self, module, args, kwargs):
        if self._busy:
            return None
        if self.guidance and self.pipe.scheduler is not self._scheduler:
            raise LatexBlendError("the pipeline's scheduler was replaced after apply(); apply latexblend again")
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        offset = sample.shape[0] - len(self.call.row_spans)
        self.call.latent_hw = tuple(sample.shape[-2:])
        rest = ([_cut(a, sample.shape[0], offset) for a in args[1:]],
                {k: _cut(v, sample.shape[0], offset) for k, v in kwargs.items() if k != "sample"})
        active = any(self.call.row_spans)
        if active and self.guidance and self.state.t_frac >= self.guidance.window:
            sample = self._guide(module, sample, offset, rest)
            if args:
                args[0] = sample
            else:
                kwargs["sample"] = sample
        if active and self.rectify and self.call.masks is None and self.state.t_frac < self.rectify.start:
            self._capture(module, sample[offset:], rest)
        self._prepare_main()
        return tuple(args), kwargs

    def _run(self, unet, x, rest):
        self._busy = True
        try:
            return unet(x, *rest[0], **rest[1])
        finally:
            self._busy = False

    def _scheduler_step(self, model_output, timestep, sample, *args, **kwargs):
        if self.call.pending is not None:
            sample = sample + self.call.pending.to(sample.dtype)
            self.call.pending = None
        return self._step(model_output, timestep, sample, *args, **kwargs)

    # ---- guidance

    def _guide(self, unet, sample: torch.Tensor, offset: int, rest) -> torch.Tensor:
        """Update the latent of every conditional sample; returns the UNet input for the main pass."""
        t = rest[0][0] if rest[0] else rest[1]["timestep"]
        scale = self._scheduler.scale_model_input(torch.ones_like(sample[:1], dtype=torch.float32), t)
        z = sample[offset:].float() / scale
        grad, loss, nbytes = guidance_pass(unet, z, scale, lambda x: self._run(unet, x, rest), self.maps,
                                           self.guide_layers, self.call.row_spans, self.call.latent_hw,
                                           self.guidance.checkpointing, count_saved=self.count_saved)
        delta = -self.guidance.step_size * grad
        self.call.pending = delta
        self.stats["guidance_passes"] += 1
        if self.count_saved:
            self.stats["guidance_saved_bytes"] = max(self.stats["guidance_saved_bytes"] or 0, nbytes)
        if self.guidance.history:
            self.history.append({"t_frac": self.state.t_frac, "loss": loss, "delta": delta})
        repeats = sample.shape[0] // delta.shape[0]
        return (sample.float() + (scale * delta).repeat(repeats, 1, 1, 1)).to(sample.dtype)

    # ---- rectification

    def _capture(self, unet, cond: torch.Tensor, rest) -> None:
        """One pass without concept rows: self-attention affinity and cross maps -> masks per sample."""
        cross: dict[str, torch.Tensor] = {}
        best = {"n": 0, "sum": None, "count": 0}

        def self_sink(layer, probs):  # keep the highest-resolution layers only
            if probs.shape[1] > best["n"]:
                best.update(n=probs.shape[1], sum=probs.float().clone(), count=1)
            elif probs.shape[1] == best["n"]:
                best["sum"] += probs.float()
                best["count"] += 1

        old = dict(unet.attn_processors)
        unet.set_attn_processor({k: SelfMapProcessor(k, self_sink) if k.endswith("attn1.processor") else p
                                 for k, p in old.items()})
        try:
            with torch.no_grad(), recording(self.maps, self.layers, sink=collector(cross, self.layers), plain=True):
                run_until_recorded(lambda x: self._run(unet, x, rest), cond)
        finally:
            unet.set_attn_processor(old)
        self.stats["rectify_passes"] += 1
        hw = layer_hw(best["n"], self.call.latent_hw)
        maps = token_maps(cross, self.call.latent_hw)
        maps = torch.nn.functional.interpolate(maps, size=hw, mode="bilinear", align_corners=False).flatten(2)
        affinity = best["sum"] / best["count"]  # [B, N, N]
        self.call.masks = []
        for i, spans in enumerate(self.call.row_spans):
            nouns = torch.stack([maps[i, s.start + 1 : s.stop].mean(0) for s in spans]) if spans else None
            self.call.masks.append(None if nouns is None else concept_masks(
                affinity[i], nouns, hw, self.rectify.clusters, self.rectify.seed))

    def masks(self, sample: int) -> torch.Tensor | None:
        """Boolean concept masks ``[C, h, w]`` of conditional sample ``sample`` (after the capture step)."""
        return None if self.call.masks is None else self.call.masks[sample]

    def _edit(self, layer: str, scores: torch.Tensor) -> torch.Tensor:
        """Modulate the conditional rows of ``scores`` [B, heads, N, K] (METHOD section 6)."""
        key = (scores.shape[0], scores.shape[2], scores.shape[3], scores.device)
        if key not in self.call.coef:
            self.call.coef[key] = self._coefficients(*key)
        return modulate(scores, *self.call.coef[key], self.state.t_frac ** 5)

    def _coefficients(self, batch: int, tokens: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both coefficient maps of a layer for the whole batch, ``[batch, 1, tokens, width]``: zero for
        the unconditional rows and for samples without masks (built once per resolution and batch)."""
        hw = layer_hw(tokens, self.call.latent_hw)
        own = torch.zeros(batch, 1, tokens, width, device=device)
        other = torch.zeros_like(own)
        offset = batch - len(self.call.row_spans)
        for i, spans in enumerate(self.call.row_spans):
            if self.call.masks[i] is not None:
                masks = resize_masks(self.call.masks[i], hw).flatten(1).to(device)
                own[offset + i, 0], other[offset + i, 0] = coefficients(spans, masks, width)
        return own, other

    # ---- the main pass and saved maps

    def _prepare_main(self) -> None:
        self.maps.edit = self._edit if self.call.masks is not None else None
        self.maps.plain = False
        if self.save_maps:
            self.maps.layers, self.maps.sink = frozenset(self.layers), self._accumulate
            self.call.steps += 1

    def _accumulate(self, layer: str, probs: torch.Tensor) -> None:
        cond = probs[probs.shape[0] - len(self.call.row_spans):].detach().float()
        self.call.acc[layer] = self.call.acc[layer] + cond if layer in self.call.acc else cond

    def image_maps(self) -> list[dict]:
        """``{concept: [h, w] float array}`` per conditional sample of the last call (``save_maps``): its
        cross-attention maps averaged over the call's steps and layers, and over each concept's noun tokens."""
        c = self.call
        if not c.acc:
            return [{} for _ in c.row_spans]
        maps = token_maps({k: v / c.steps for k, v in c.acc.items()}, c.latent_hw)
        return [{s.name: maps[i, s.start + 1 : s.stop].mean(0).cpu().numpy() for s in spans}
                for i, spans in enumerate(c.row_spans)]
