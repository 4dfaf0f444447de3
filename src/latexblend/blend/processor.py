"""The processors a :class:`~latexblend.blend.blender.Blender` installs, and the state they read.

:class:`BlendProcessor` is the one ``attn2`` processor of Stage 3 (METHOD.md section 4): per prompt it
projects K and V once, replaces each concept span's rows by the bank's (and binds the slot to the noun),
and reuses them at every step. It runs the stock SDPA unless the state asks a layer for its attention map
(guidance, map saving) or for edited logits (rectification): then the softmax is written out
(:func:`~latexblend.attention.explicit_attention`). :class:`SelfMapProcessor` stands on the ``attn1`` layers
only while rectification is on: it is the layer's own processor until a capture pass asks for maps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latexblend.attention import Edit, KVProcessor, Sink, attend, explicit_attention, project_kv
from latexblend.blend.options import BlendOptions
from latexblend.tokens import Span


@dataclass
class BlendState:
    """Everything the processors of one Blender read; the Blender (and its steering) is the only writer.

    Set once: ``rows[name]``, a concept's bank rows ``(k, v)`` per layer, each ``[L, C]``; ``options``.
    Per pipeline call (:meth:`reset`): ``row_spans[i]``, the spans of conditional sample ``i``; ``cache``, the
    projected K/V per prompt embedding. Per UNet call: ``t_frac`` (``t / T``; rows are replaced while
    ``t_frac < options.start``), and what a steering pass asks for: the maps of the layers in ``record`` go to
    ``sink``, ``edit`` edits every layer's logits, ``plain`` uses the prompt's own K/V (no concept rows), and
    ``self_sink`` receives the ``attn1`` maps (:class:`SelfMapProcessor`).
    """

    rows: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(default_factory=dict)
    options: BlendOptions = field(default_factory=BlendOptions)
    row_spans: list[list[Span]] = field(default_factory=list)
    t_frac: float = 0.0
    cache: dict = field(default_factory=dict)
    record: frozenset[str] = frozenset()
    sink: Sink | None = None
    edit: Edit | None = None
    plain: bool = False
    self_sink: Sink | None = None

    def reset(self, row_spans: Sequence[Sequence[Span]]) -> None:
        self.row_spans = [list(s) for s in row_spans]
        self.cache.clear()

    @property
    def active(self) -> bool:
        return self.t_frac < self.options.start

    def blended(self, layer: str, k: torch.Tensor, v: torch.Tensor,
                replace: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``k``, ``v`` [B, 77, C] with every conditional span's rows replaced by its bank rows (only
        bound, not replaced, when ``replace`` is False).

        The batch is ``[uncond..., cond...]`` (classifier-free guidance) or ``[cond...]``; the
        unconditional half is never touched. Returns ``None`` when there is nothing to change.
        """
        n, bind = len(self.row_spans), self.options.bind
        if not any(self.row_spans) or not (replace or bind):
            return None
        if k.shape[0] not in (n, 2 * n):
            raise RuntimeError(f"{layer}: batch of {k.shape[0]} does not match {n} conditional prompts")
        offset = k.shape[0] - n
        kb, vb = k.clone(), v.clone()
        for i, spans in enumerate(self.row_spans):
            row = offset + i
            for span in spans:
                if replace:
                    bank_k, bank_v = self.rows[span.name]
                    kb[row, span.start : span.stop] = bank_k[layer].to(kb.dtype)
                    vb[row, span.start : span.stop] = bank_v[layer].to(vb.dtype)
                if bind:  # V* attends where the noun attends: slot K row := last noun K row
                    kb[row, span.start] = kb[row, span.stop - 1]
        return kb, vb


class BlendProcessor(KVProcessor):
    """Per-prompt K/V computed once (plain and blended) and reused at every denoising step; SDPA, or the
    written-out softmax where the state records this layer's map or edits logits."""

    def __init__(self, layer: str, state: BlendState):
        super().__init__(layer)
        self.state = state

    def kv(self, attn, context):
        if self.state.plain:
            with torch.no_grad():
                return project_kv(attn, context)
        key = (self.layer, context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        entry = self.state.cache.get(key)
        if entry is None:
            with torch.no_grad():
                k, v = project_kv(attn, context)
                always = self.state.options.bind == "always"
                early = self.state.blended(self.layer, k, v, replace=False) if always else None
                entry = (k, v, self.state.blended(self.layer, k, v), early)
            self.state.cache[key] = entry
        k, v, blended, early = entry
        if blended is not None and self.state.active:
            return blended
        return early or (k, v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        state = self.state
        sink = state.sink if self.layer in state.record else None
        if sink is None and state.edit is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        key, value = self.kv(attn, encoder_hidden_states)
        fn = functools.partial(explicit_attention, layer=self.layer, sink=sink, edit=state.edit)
        return attend(attn, hidden_states, key, value, attention_mask, sdpa=fn)


class SelfMapProcessor:
    """An ``attn1`` layer's own processor (``fallback``), except while ``state.self_sink`` is set: then
    self-attention written out, its head-averaged map [B, N, N] sent to the sink (rectification's capture)."""

    def __init__(self, layer: str, state: BlendState, fallback):
        self.layer, self.state, self.fallback = layer, state, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        sink = self.state.self_sink
        if sink is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise RuntimeError(f"{self.layer}: self-attention capture expects a plain attn1 on [B, N, C] tokens")
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        fn = functools.partial(explicit_attention, layer=self.layer, sink=sink)
        return attend(attn, hidden_states, key, value, attention_mask, sdpa=fn)
