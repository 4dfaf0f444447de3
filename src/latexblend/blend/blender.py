"""Stage 3's method: concept banks blended into the stock ``StableDiffusionXLPipeline`` (METHOD section 4).

The pipeline is extended, never forked: :func:`apply` makes a :class:`Blender`, which installs
:class:`~latexblend.blend.processor.BlendProcessor` on every ``attn2`` layer, a UNet pre-forward hook that
records ``t / T`` (and runs guidance and rectification, :mod:`latexblend.blend.steering`), and a wrapper
around ``pipe.encode_prompt`` that expands ``<name>`` placeholders and locates each concept's span.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch.utils._pytree import tree_flatten, tree_unflatten

from latexblend.bank.format import ConceptBank, bank_path, load_bank, verify_bank
from latexblend.blend.graphs import GRAPHS, CallGraphs, resolve_graphs
from latexblend.blend.options import BlendOptions, GuidanceOptions, RectifyOptions
from latexblend.blend.processor import BlendProcessor, BlendState, SelfMapProcessor
from latexblend.blend.steering import Steering
from latexblend.errors import LatexBlendError
from latexblend.models import attn2_modules, fingerprint
from latexblend.tokens import Span, locate_spans, placeholder_names


def _options(cls, value):
    """``None``/``False`` -> off; ``True`` -> defaults; a mapping -> ``cls(**value)``; an instance as is."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if not isinstance(value, dict):
        return value
    try:
        return cls(**value)
    except TypeError as err:  # an unknown key
        raise LatexBlendError(f"bad {cls.__name__}: {err}") from None


@dataclass
class Call:
    """One pipeline call as latexblend sees it. The pipeline's ``encode_prompt`` (wrapped) begins it:
    a call encodes its prompt once, before its first UNet call."""

    prompts: list[str]  # as encoded: placeholders expanded
    row_spans: list[list[Span]]  # the spans of each conditional sample (prompts x images per prompt)
    schedule: list[float] | None = None  # scheduler.timesteps on the host, copied at the call's first UNet call


class Blender:
    """Concept banks applied to a pipeline; use :func:`apply` to make one, :meth:`remove` to undo.

    ``required`` concepts must appear in every prompt (by noun or placeholder); any other loaded
    concept is blended where a prompt names it as ``<name>``. The Blender is the one owner of what it
    changes in the pipeline (:meth:`_install`, undone by :meth:`remove`): the ``attn2`` processors (and the
    ``attn1`` ones while rectification is on), one UNet pre-forward hook, ``pipe.encode_prompt``, with
    guidance ``scheduler.step``, and with CUDA graphs the UNet's ``forward`` (:meth:`use_graphs`).
    """

    def __init__(self, pipe, banks: dict[str, ConceptBank], required: Sequence[str] = (),
                 options: BlendOptions | None = None, guidance: GuidanceOptions | None = None,
                 rectify: RectifyOptions | None = None, save_maps: bool = False, graphs: str = "auto"):
        if getattr(pipe, "_latexblend", None) is not None:
            raise LatexBlendError("latexblend is already applied to this pipeline; remove() it first")
        if graphs not in GRAPHS:
            raise LatexBlendError(f"graphs must be one of {', '.join(GRAPHS)}, got '{graphs}'")
        self.pipe, self.banks, self.required = pipe, dict(banks), list(required)
        for name in self.required:
            if name not in self.banks:
                raise LatexBlendError(f"concept '{name}' is required but was not loaded")
        attn2_modules(pipe.unet)  # a clear error for a UNet without cross-attention
        device, dtype = pipe.unet.device, pipe.unet.dtype
        model_fp = fingerprint(pipe.unet) if self.banks else None
        text_side = ([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
        for bank in self.banks.values():
            verify_bank(bank, pipe.unet, pipe.tokenizer, model_fingerprint=model_fp, text_side=text_side)
        rows = {name: ({k: t.to(device, dtype) for k, t in b.k.items()},
                       {k: t.to(device, dtype) for k, t in b.v.items()}) for name, b in self.banks.items()}
        self.state = BlendState(rows=rows, options=options or BlendOptions())
        self.steering = Steering(pipe.unet, self.state, guidance, rectify, save_maps) \
            if guidance or rectify or save_maps else None
        self.graph_mode, self.graphs = "off", None
        self.call: Call | None = None  # the current (or last) pipeline call
        self._num_train = int(pipe.scheduler.config.num_train_timesteps)
        self._install()
        self.use_graphs(resolve_graphs(graphs, device))

    def use_graphs(self, mode: str, emulate: bool = False) -> None:
        """Set which UNet calls CUDA graphs replay (``off``, ``steering``, ``all``; see :func:`apply`), with new
        graphs (``emulate``: their CPU stand-in, for tests). The UNet's forward is wrapped while any are on."""
        self.graph_mode = mode
        self.graphs = CallGraphs(self.pipe.unet.device, emulate) if mode != "off" else None
        if self.steering is not None:
            self.steering.graphs = self.graphs
        if self.graphs is None:
            self.pipe.unet.__dict__.pop("forward", None)
        else:
            self.pipe.unet.forward = self._forward

    def _install(self) -> None:
        """Every change to the pipeline, in one place. ``scheduler.step`` is wrapped only with guidance: its
        latent update must reach the same step's ``scheduler.step``, and neither a UNet hook (it cannot
        rebind the pipeline's ``latents``) nor diffusers' ``callback_on_step_end`` (it runs after the step,
        and is an argument of each call, which ``apply()`` leaves to the caller) can do that."""
        pipe, unet = self.pipe, self.pipe.unet
        self._processors = dict(unet.attn_processors)
        capture = self.steering is not None and self.steering.rectify is not None
        unet.set_attn_processor({key: self._processor(key.removesuffix(".processor"), proc, capture)
                                 for key, proc in self._processors.items()})
        self._hook = unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        self._encode = pipe.encode_prompt
        self._signature = inspect.signature(self._encode)
        pipe.encode_prompt = self._encode_prompt
        self._scheduler = pipe.scheduler
        self._step = self._scheduler.step
        if self.steering is not None and self.steering.guidance:
            self._scheduler.step = self._scheduler_step
        self._unet_forward = unet.forward  # wrapped by use_graphs: the steps CUDA graphs may replay
        pipe._latexblend = self

    def _processor(self, layer: str, old, capture: bool):
        if layer.endswith("attn2"):
            return BlendProcessor(layer, self.state)
        return SelfMapProcessor(layer, self.state, old) if capture and layer.endswith("attn1") else old

    def remove(self) -> None:
        """Undo everything :meth:`_install` changed."""
        self.pipe.unet.set_attn_processor(self._processors)
        self.pipe.unet.__dict__.pop("forward", None)
        self._hook.remove()
        self._scheduler.__dict__.pop("step", None)
        self.pipe.__dict__.pop("encode_prompt", None)
        self.pipe.__dict__.pop("_latexblend", None)

    def __enter__(self) -> Blender:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- the hooks

    def _on_unet(self, module, args, kwargs):
        """Before every UNet call: record ``t / T`` (without a device sync where the scheduler allows), then let
        steering run this step's extra passes (not for its own passes' UNet calls)."""
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.t_frac = self._host_timestep(t) / self._num_train
        if self.steering is None or self.steering.busy:
            return None
        if self.steering.guidance and self.pipe.scheduler is not self._scheduler:
            raise LatexBlendError("the pipeline's scheduler was replaced after apply(); apply latexblend again")
        args, kwargs = list(args), dict(kwargs)
        self.steering.before_unet(module, self._scheduler, args, kwargs)
        return tuple(args), kwargs

    def _forward(self, *args, **kwargs):
        """The UNet's forward while graphs are on: a denoising step the graph setting covers (every step with
        ``all``; with ``steering`` the rectified ones) is replayed from its CUDA graph, keyed by what the host
        decides in it; steering's own passes, map saving and anything unusual run eagerly."""
        state, steering = self.state, self.steering
        covered = self.graph_mode == "all" or state.edit is not None
        if not covered or state.sink is not None or state.self_sink is not None or (steering and steering.busy):
            return self._unet_forward(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = ("denoising step", str(spec), tuple(x for x in leaves if not isinstance(x, torch.Tensor)),
               tuple(tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor)), state.active,
               state.edit is not None, state.plain, tuple(tuple(spans) for spans in state.row_spans))
        try:
            hash(key)
        except TypeError:  # an argument the key cannot hold: not a call to replay
            return self._unet_forward(*args, **kwargs)

        def run(*values):
            it = iter(values)
            a, k = tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
            return (self._unet_forward(*a, **{**k, "return_dict": False})[0],)

        (sample,) = self.graphs.run(key, run, [x for x in leaves if isinstance(x, torch.Tensor)])
        return UNet2DConditionOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)

    def _scheduler_step(self, model_output, timestep, sample, *args, **kwargs):
        return self._step(model_output, timestep, self.steering.step_sample(sample), *args, **kwargs)

    def _host_timestep(self, t) -> float:
        if not isinstance(t, torch.Tensor):
            return float(t)
        scheduler = self.pipe.scheduler
        index = getattr(scheduler, "step_index", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(index, int) and isinstance(timesteps, torch.Tensor) and self.call is not None:
            if self.call.schedule is None:  # once per call: copy the schedule to the host
                self.call.schedule = timesteps.detach().float().cpu().tolist()
            if index < len(self.call.schedule):
                return self.call.schedule[index]
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
            self._begin(Call([], []))
            return self._encode(**call)
        if call.get("prompt_2") is not None:
            raise LatexBlendError("prompt_2 is not supported with blended concepts: give one prompt")
        prepared = [self.prepare(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        self._begin(Call([text for text, _ in prepared], [spans for _, spans in prepared for _ in range(copies)]))
        call["prompt"] = self.call.prompts[0] if isinstance(prompt, str) else self.call.prompts
        return self._encode(**call)

    def _begin(self, call: Call) -> None:
        """Start a pipeline call: the processors' per-call state and steering's are set up anew."""
        self.call = call
        self.state.reset(call.row_spans)
        if self.steering is not None:
            self.steering.begin(call)


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


def apply(pipe, concepts: Sequence[str | Path | ConceptBank], blend_start: float = 0.9, bind: bool | str = True,
          bank_dir: str | Path | None = None, optional: Sequence[str | Path | ConceptBank] = (),
          guidance: GuidanceOptions | dict | bool | None = None, rectify: RectifyOptions | dict | bool | None = None,
          save_maps: bool = False, graphs: str = "auto") -> Blender:
    """Blend concept banks into an existing SDXL pipeline; call it as usual afterwards.

    >>> blender = latexblend.apply(pipe, ["corgi", "castle"])   # doctest: +SKIP
    >>> pipe("a dog in front of a castle").images[0]            # doctest: +SKIP
    >>> blender.remove()                                         # doctest: +SKIP

    ``concepts`` must appear in every prompt (by class noun, or as ``<name>``); ``optional`` ones only
    where a prompt writes ``<name>``. ``bind``: the slot attends where the noun attends while blending
    (True), also before ``blend_start`` as in the authors' release (``"always"``), or never (False).
    ``guidance`` (blending guidance, METHOD section 5) and ``rectify``
    (self-attention rectification, section 6) take ``True`` for the defaults, a dict of
    :class:`~latexblend.blend.options.GuidanceOptions` / :class:`~latexblend.blend.options.RectifyOptions` fields,
    or an instance; ``save_maps`` keeps per-concept cross-attention maps (``blender.steering``). ``graphs``:
    CUDA graphs of the UNet calls (:mod:`~latexblend.blend.graphs`): ``auto`` (``steering`` on CUDA: the
    guidance passes and the rectified steps), ``all`` (every denoising step too) or ``off``.
    """
    options = BlendOptions(blend_start, bind)
    guidance, rectify = _options(GuidanceOptions, guidance), _options(RectifyOptions, rectify)
    required = load_banks(concepts, bank_dir)
    extra = load_banks(optional, bank_dir)
    return Blender(pipe, {**extra, **required}, required=list(required), options=options, guidance=guidance,
                   rectify=rectify, save_maps=save_maps, graphs=graphs)
