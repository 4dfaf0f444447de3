"""Blending guidance, self-attention rectification and attention-map saving (METHOD.md sections 5 and 6):
what the :class:`~latexblend.blend.blender.Blender`'s UNet pre-forward hook runs before a step's own UNet
call. :class:`Steering` changes nothing in the pipeline itself; the Blender owns every hook.

- **guidance** (while ``t/T >= window``): one extra UNet pass on the conditional branch with grad to the
  latent only. The pipeline hands the UNet ``x = scale_model_input(cat([z, z]), t) = s * z``; the pass
  recovers the scheduler-space latent ``z = x / s`` (``s`` from ``scheduler.scale_model_input`` on ones: a
  linear factor), differentiates ``g1 + g2`` at ``s * z`` with respect to ``z``, and updates
  ``z' = z - step_size * grad``. It returns ``s * z'`` as the UNet input of both CFG halves, and keeps the
  update for the same step's ``scheduler.step`` (:meth:`Steering.step_sample`): the step is exactly the
  stock step taken from ``z'``.
- **rectification** (at the first step with ``t/T < start``): one extra pass on the conditional branch
  without concept rows and without grad, capturing cross-attention maps (all attn2 layers) and
  self-attention at the highest-resolution attn1 layers; the masks it yields then edit every attn2 layer's
  logits on the conditional branch for the rest of the call (a fixed number of tensor ops per layer, from
  coefficient maps built once per resolution: :func:`~latexblend.blend.rectify.coefficients`).
- **map saving**: the main pass records every attn2 layer's conditional maps, averaged over steps;
  :meth:`Steering.image_maps` gives them per image of the last call.

Everything that belongs to one pipeline call lives in a :class:`SteeredCall`, made anew by
:meth:`Steering.begin` when the Blender's ``encode_prompt`` wrapper starts the call. The extra passes run
the whole UNet; their outputs are not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from latexblend.blend.graphs import CallGraphs
from latexblend.blend.guidance import collector, guidance_pass, layer_hw, recording, select_layers, token_maps
from latexblend.blend.options import GuidanceOptions, RectifyOptions
from latexblend.blend.processor import BlendState
from latexblend.blend.rectify import coefficients, concept_masks, modulate, resize_masks
from latexblend.models import attn2_shapes


def _spans_key(row_spans) -> tuple:
    return tuple(tuple(spans) for spans in row_spans)


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
    acc: dict = field(default_factory=dict)  # save_maps: each layer's conditional maps summed over steps
    steps: int = 0  # save_maps: main passes summed in ``acc``


class Steering:
    """Guidance / rectification / map saving for one Blender (see the module doc). ``busy`` is set while an
    extra pass runs, so the Blender's hook leaves that UNet call alone."""

    def __init__(self, unet, state: BlendState, guidance: GuidanceOptions | None = None,
                 rectify: RectifyOptions | None = None, save_maps: bool = False):
        self.state, self.guidance, self.rectify, self.save_maps = state, guidance, rectify, save_maps
        shapes = attn2_shapes(unet)
        self.layers = list(shapes)
        self.guide_layers = select_layers(shapes, guidance.layers) if guidance else []
        self.stats = {"guidance_passes": 0, "rectify_passes": 0}
        self.history: list[dict] = []  # with guidance.history, per pass of the last call: t_frac, loss [B], delta
        self.call = SteeredCall([])
        self.busy = False
        self.graphs: CallGraphs | None = None  # set by the Blender: CUDA graphs of the guidance passes
        # rectification's coefficient maps per (batch, tokens, width, device) and tau = (t/T)^5: tensors that
        # stay where they are across steps and calls (refilled, never replaced), so a captured step reads them
        self.coef: dict = {}
        self.tau: torch.Tensor | None = None

    def begin(self, call) -> None:
        """A new pipeline call (a :class:`~latexblend.blend.blender.Call`) begins."""
        self.call = SteeredCall(call.row_spans)
        self.history = []
        self.state.edit = None

    def before_unet(self, unet, scheduler, args: list, kwargs: dict) -> None:
        """Run this step's extra passes; ``args``/``kwargs`` (the main UNet call's) get the guided input."""
        if self.tau is not None:  # this step's rectification strength, for every pass of the step
            self.tau.fill_(self.state.t_frac**5)
        sample = args[0] if args else kwargs["sample"]
        offset = sample.shape[0] - len(self.call.row_spans)
        self.call.latent_hw = tuple(sample.shape[-2:])
        rest = ([_cut(a, sample.shape[0], offset) for a in args[1:]],
                {k: _cut(v, sample.shape[0], offset) for k, v in kwargs.items() if k != "sample"})
        active = any(self.call.row_spans)
        if active and self.guidance and self.state.t_frac >= self.guidance.window:
            sample = self._guide(unet, scheduler, sample, offset, rest)
            if args:
                args[0] = sample
            else:
                kwargs["sample"] = sample
        if active and self.rectify and self.call.masks is None and self.state.t_frac < self.rectify.start:
            self._capture(unet, sample[offset:], rest)
        self._prepare_main()

    def step_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The latent this step's ``scheduler.step`` starts from: ``sample`` plus this step's guidance update."""
        if self.call.pending is not None:
            sample = sample + self.call.pending.to(sample.dtype)
            self.call.pending = None
        return sample

    def _run(self, unet, x, rest):
        self.busy = True
        try:
            return unet(x, *rest[0], **rest[1])
        finally:
            self.busy = False

    # ---- guidance

    def _guide(self, unet, scheduler, sample: torch.Tensor, offset: int, rest) -> torch.Tensor:
        """Update the latent of every conditional sample; returns the UNet input for the main pass."""
        t = rest[0][0] if rest[0] else rest[1]["timestep"]
        scale = scheduler.scale_model_input(torch.ones_like(sample[:1], dtype=torch.float32), t)
        z = sample[offset:].float() / scale
        grad, loss = self._guidance_pass(unet, z, scale, rest)
        delta = -self.guidance.step_size * grad
        self.call.pending = delta
        self.stats["guidance_passes"] += 1
        if self.guidance.history:
            self.history.append({"t_frac": self.state.t_frac, "loss": loss, "delta": delta})
        repeats = sample.shape[0] // delta.shape[0]
        return (sample.float() + (scale * delta).repeat(repeats, 1, 1, 1)).to(sample.dtype)

    def _guidance_pass(self, unet, z: torch.Tensor, scale: torch.Tensor, rest) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~latexblend.blend.guidance.guidance_pass` at ``z``: eagerly, or from its CUDA graph (one per
        latent size, spans, blend activity and layer set: what the host decides in a pass)."""
        leaves, spec = tree_flatten(rest)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]

        def run(z, scale, *values):
            it = iter(values)
            args, kwargs = tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
            return guidance_pass(unet, z, scale, lambda x: self._run(unet, x, (args, kwargs)), self.state,
                                 self.guide_layers, self.call.row_spans, self.call.latent_hw,
                                 self.guidance.checkpointing)

        if self.graphs is None:
            return run(z, scale, *tensors)
        key = ("guidance pass", str(spec), tuple(x for x in leaves if not isinstance(x, torch.Tensor)),
               tuple(z.shape), self.state.active, self.state.edit is not None, _spans_key(self.call.row_spans))
        return self.graphs.run(key, run, (z, scale, *tensors))

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

        self.state.self_sink = self_sink
        try:
            with torch.no_grad(), recording(self.state, self.layers, collector(cross), plain=True):
                self._run(unet, cond, rest)
        finally:
            self.state.self_sink = None
        self.stats["rectify_passes"] += 1
        hw = layer_hw(best["n"], self.call.latent_hw)
        maps = F.interpolate(token_maps(cross, self.call.latent_hw), size=hw, mode="bilinear",
                             align_corners=False).flatten(2)
        affinity = best["sum"] / best["count"]  # [B, N, N]
        self.call.masks = []
        for i, spans in enumerate(self.call.row_spans):
            nouns = torch.stack([maps[i, s.start + 1 : s.stop].mean(0) for s in spans]) if spans else None
            self.call.masks.append(None if nouns is None else concept_masks(
                affinity[i], nouns, hw, self.rectify.clusters, self.rectify.seed))
        self._refresh_coefficients({(m.shape[1], m.shape[2]) for m in cross.values()}, cond.device)

    def masks(self, sample: int) -> torch.Tensor | None:
        """Boolean concept masks ``[C, h, w]`` of conditional sample ``sample`` (after the capture step)."""
        return None if self.call.masks is None else self.call.masks[sample]

    def _edit(self, layer: str, scores: torch.Tensor) -> torch.Tensor:
        """Modulate the conditional rows of ``scores`` [B, heads, N, K] (METHOD section 6)."""
        key = (scores.shape[0], scores.shape[2], scores.shape[3], scores.device)
        if key not in self.coef:
            self.coef[key] = self._coefficients(*key)
        return modulate(scores, *self.coef[key], self._tau(scores.device))

    def _tau(self, device) -> torch.Tensor:
        """``(t/T)^5`` of the current step as a 0-d fp32 tensor on ``device`` (the same buffer every step)."""
        if self.tau is None or self.tau.device != torch.device(device):
            self.tau = torch.zeros((), device=device)
            self.tau.fill_(self.state.t_frac**5)
        return self.tau

    def _refresh_coefficients(self, shapes: set[tuple[int, int]], device) -> None:
        """This call's coefficient maps into the kept buffers: every buffer that fits this call (refilled in
        place: a captured step reads them) and those of the main pass's ``(tokens, width)`` ``shapes``."""
        n = len(self.call.row_spans)
        keys = {(b, tokens, width, torch.device(device)) for b in (n, 2 * n) for tokens, width in shapes}
        for key in keys | set(self.coef):
            batch, tokens = key[0], key[1]
            try:
                layer_hw(tokens, self.call.latent_hw)
            except RuntimeError:
                continue  # a buffer of another latent size: refreshed by the calls of that size
            if batch not in (n, 2 * n):
                continue
            own, other = self._coefficients(*key)
            if key in self.coef:
                self.coef[key][0].copy_(own)
                self.coef[key][1].copy_(other)
            else:
                self.coef[key] = (own, other)

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
        self.state.edit = self._edit if self.call.masks is not None else None
        self.state.plain = False
        if self.save_maps:
            self.state.record, self.state.sink = frozenset(self.layers), self._accumulate
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
