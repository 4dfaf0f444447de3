"""Stage 3's method: concept banks blended into the stock ``StableDiffusionXLPipeline`` (METHOD section 4).

The pipeline is extended, never forked: :func:`apply` installs :class:`~latexblend.attention.BlendProcessor`
on every ``attn2`` layer, a UNet pre-forward hook that records ``t / T``, and a wrapper around
``pipe.encode_prompt`` that expands ``<name>`` placeholders and locates each concept's span.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from latexblend.attention import BlendProcessor, BlendState, install_processors
from latexblend.bank.format import ConceptBank, bank_path, load_bank, verify_bank
from latexblend.blend.guidance import GuidanceOptions
from latexblend.blend.rectify import RectifyOptions
from latexblend.config import check_range
from latexblend.errors import LatexBlendError
from latexblend.models import fingerprint
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
    concept is blended where a prompt names it as ``<name>``.
    """

    def __init__(self, pipe, banks: dict[str, ConceptBank], required: Sequence[str] = (),
                 blend_start: float = 0.9, bind: bool | str = True, guidance=None, rectify=None,
                 save_maps: bool = False):
        check_range("blend_start", blend_start, 0, 1)
        if bind not in (True, False, "always"):
            raise LatexBlendError(f"bind must be True, False or 'always', got {bind!r}")
        guidance, rectify = _options(GuidanceOptions, guidance), _options(RectifyOptions, rectify)
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
        self.call: Call | None = None  # the current (or last) pipeline call
        num_train = int(pipe.scheduler.config.num_train_timesteps)
        self._restore = install_processors(pipe.unet, lambda layer: BlendProcessor(layer, self.state))
        self._hook = pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)
        self._num_train = num_train
        self._encode = pipe.encode_prompt
        self._signature = inspect.signature(self._encode)
        pipe.encode_prompt = self._encode_prompt
        pipe._latexblend = self
        self.steering = None  # guidance / rectification / map saving (latexblend.blend.steering)
        if guidance or rectify or save_maps:
            from latexblend.blend.steering import Steering

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


def apply(pipe, concepts: Sequence[str | Path | ConceptBank], blend_start: float = 0.9, bind: bool | str = True,
          bank_dir: str | Path | None = None, optional: Sequence[str | Path | ConceptBank] = (),
          guidance: GuidanceOptions | dict | bool | None = None, rectify: RectifyOptions | dict | bool | None = None,
          save_maps: bool = False) -> Blender:
    """Blend concept banks into an existing SDXL pipeline; call it as usual afterwards.

    >>> blender = latexblend.apply(pipe, ["corgi", "castle"])   # doctest: +SKIP
    >>> pipe("a dog in front of a castle").images[0]            # doctest: +SKIP
    >>> blender.remove()                                         # doctest: +SKIP

    ``concepts`` must appear in every prompt (by class noun, or as ``<name>``); ``optional`` ones only
    where a prompt writes ``<name>``. ``bind``: the slot attends where the noun attends while blending
    (True), also before ``blend_start`` as in the authors' release (``"always"``), or never (False).
    ``guidance`` (blending guidance, METHOD section 5) and ``rectify``
    (self-attention rectification, section 6) take ``True`` for the defaults, a dict of
    :class:`~latexblend.guidance.GuidanceOptions` / :class:`~latexblend.rectify.RectifyOptions` fields,
    or an instance; ``save_maps`` keeps per-concept cross-attention maps (``blender.steering``).
    """
    required = load_banks(concepts, bank_dir)
    extra = load_banks(optional, bank_dir)
    return Blender(pipe, {**extra, **required}, required=list(required), blend_start=blend_start, bind=bind,
                   guidance=guidance, rectify=rectify, save_maps=save_maps)
