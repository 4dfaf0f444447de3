"""Attention processors for the ``attn2`` (cross-attention) layers.

Everything the method does happens in the latent textual space, i.e. on the rows of ``K = c W_k^T``
and ``V = c W_v^T``: a processor computes (or fetches) K and V, edits rows, and runs the stock
scaled-dot-product attention. Self-attention (``attn1``) keeps diffusers' own processor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from latexblend.tokens import Span


def project_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_k(c), to_v(c))``: the latent textual features of ``context`` [B, 77, D] -> 2 x [B, 77, C]."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def attend(attn, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None = None, sdpa: Callable | None = None) -> torch.Tensor:
    """Cross-attention of ``hidden_states`` [B, N, C_q] over given ``key``/``value`` [B, 77, C].

    The same computation as diffusers' ``AttnProcessor2_0`` once K and V are known (SDPA, output
    projection, residual and rescale as configured on ``attn``). ``sdpa`` replaces
    ``F.scaled_dot_product_attention`` (same signature), e.g. by :func:`explicit_attention`.
    """
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, ch, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
    batch = key.shape[0]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = (sdpa or F.scaled_dot_product_attention)(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                   is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, ch, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class KVProcessor:
    """Base processor: ``kv()`` supplies K and V, :func:`attend` does the rest."""

    def __init__(self, layer: str):
        self.layer = layer

    def kv(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return project_kv(attn, context)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.layer}: latexblend processors are for cross-attention (attn2) only")
        key, value = self.kv(attn, encoder_hidden_states)
        return attend(attn, hidden_states, key, value, attention_mask)


def install_processors(unet, factory: Callable[[str], object]) -> Callable[[], None]:
    """Give every attn2 layer ``factory(layer_name)``; returns a function restoring the old processors."""
    from latexblend.models import attn2_modules

    old = dict(unet.attn_processors)
    new = {}
    for key, proc in old.items():
        layer = key.removesuffix(".processor")
        new[key] = factory(layer) if layer.endswith("attn2") else proc
    attn2_modules(unet)  # raises a clear error for a UNet without cross-attention
    unet.set_attn_processor(new)
    return lambda: unet.set_attn_processor(old)


# --------------------------------------------------------------------------- blending (METHOD section 4)


@dataclass
class BlendState:
    """What the blend processors share during one pipeline call.

    ``rows[name]`` holds a concept's bank rows ``(k, v)`` per layer, each ``[L, C]``. ``row_spans[i]``
    lists the spans of conditional sample ``i`` (the i-th prompt embedding the pipeline built).
    ``t_frac`` is the current ``t / T``, set by a UNet pre-forward hook; rows are replaced while
    ``t_frac < blend_start``. ``bind``: True binds the slot to the noun while blending, ``"always"``
    also before ``blend_start`` (the authors' release), False never.
    """

    rows: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(default_factory=dict)
    row_spans: list[list[Span]] = field(default_factory=list)
    blend_start: float = 0.9
    bind: bool | str = True
    t_frac: float = 0.0
    cache: dict = field(default_factory=dict)

    def reset(self, row_spans: Sequence[Sequence[Span]]) -> None:
        self.row_spans = [list(s) for s in row_spans]
        self.cache.clear()

    @property
    def active(self) -> bool:
        return self.t_frac < self.blend_start

    def blended(self, layer: str, k: torch.Tensor, v: torch.Tensor,
                replace: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``k``, ``v`` [B, 77, C] with every conditional span's rows replaced by its bank rows (only
        bound, not replaced, when ``replace`` is False).

        The batch is ``[uncond..., cond...]`` (classifier-free guidance) or ``[cond...]``; the
        unconditional half is never touched. Returns ``None`` when there is nothing to change.
        """
        n = len(self.row_spans)
        if not any(self.row_spans) or not (replace or self.bind):
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
                if self.bind:  # V* attends where the noun attends: slot K row := last noun K row
                    kb[row, span.start] = kb[row, span.stop - 1]
        return kb, vb


class BlendProcessor(KVProcessor):
    """Per-prompt K/V computed once (plain and blended) and reused at every denoising step."""

    def __init__(self, layer: str, state: BlendState):
        super().__init__(layer)
        self.state = state

    def kv(self, attn, context):
        key = (self.layer, context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        entry = self.state.cache.get(key)
        if entry is None:
            with torch.no_grad():
                k, v = project_kv(attn, context)
                early = self.state.blended(self.layer, k, v, replace=False) if self.state.bind == "always" else None
                entry = (k, v, self.state.blended(self.layer, k, v), early)
            self.state.cache[key] = entry
        k, v, blended, early = entry
        if blended is not None and self.state.active:
            return blended
        return early or (k, v)


# --------------------------------------------------------------------------- training splice (METHOD section 2)


@dataclass
class SpliceState:
    """What the splice processors share during one training step.

    The UNet batch is ``[instance..., prior...]``. For instance sample ``i`` (when ``base_kv`` is
    given) ``base_kv[i][layer]`` holds the frozen base flow's ``(k, v)`` [77, C] of its replace prompt;
    ``concept_spans[i]`` is the span ``[<new1>, noun...]`` in the instance prompt and
    ``replace_spans[i]`` the span ``[a, noun...]`` in the replace prompt (equal lengths), both set with
    :meth:`set_spans`. ``record`` (tests, debugging): a dict that receives every layer's final ``(k, v)``.
    """

    base_kv: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    concept_spans: list[Span] = field(default_factory=list)
    replace_spans: list[Span] = field(default_factory=list)
    record: dict | None = None
    rows: torch.Tensor | None = None  # [n, 77]: see set_spans

    def set_spans(self, concept_spans: Sequence[Span], replace_spans: Sequence[Span], device=None) -> None:
        """Set the spans and build ``rows`` [n, 77]: row ``j`` of instance sample ``i`` is row ``rows[i, j]``
        of ``cat([base (77 rows), concept (77 rows)])``. Positions live in a tensor, built before the UNet
        runs, so a compiled UNet does not specialise (and recompile) on each pair of templates."""
        rows = torch.arange(77).repeat(len(concept_spans), 1)
        for i, (cs, rs) in enumerate(zip(concept_spans, replace_spans, strict=True)):
            if cs.length != rs.length:
                raise RuntimeError(f"concept span {cs} and replace span {rs} differ in length")
            rows[i, rs.start : rs.stop] = torch.arange(77 + cs.start, 77 + cs.stop)
        self.concept_spans, self.replace_spans, self.rows = list(concept_spans), list(replace_spans), rows.to(device)

    def spliced(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concept-flow ``k``, ``v`` [B, 77, C] -> what the UNet attends to: for each instance sample the
        base-flow rows with the replace span overwritten by the concept flow's span rows; the other
        samples keep the concept flow. Row 0 (BOS) never carries gradient."""
        ks, vs = [], []
        for i in range(k.shape[0]):
            ki, vi = k[i], v[i]
            if i < len(self.base_kv):
                bk, bv = (t.to(ki.dtype) for t in self.base_kv[i][layer])
                ki = torch.cat([bk, ki]).index_select(0, self.rows[i])
                vi = torch.cat([bv, vi]).index_select(0, self.rows[i])
            ks.append(torch.cat([ki[:1].detach(), ki[1:]]))
            vs.append(torch.cat([vi[:1].detach(), vi[1:]]))
        out = torch.stack(ks), torch.stack(vs)
        if self.record is not None:
            self.record[layer] = out
        return out


class SpliceProcessor(KVProcessor):
    """Dual-flow training: trainable ``to_k``/``to_v`` (the concept flow) on the whole batch, spliced
    into the cached base flow at the span for instance samples (:meth:`SpliceState.spliced`)."""

    def __init__(self, layer: str, state: SpliceState):
        super().__init__(layer)
        self.state = state

    def kv(self, attn, context):
        k, v = project_kv(attn, context)
        return self.state.spliced(self.layer, k, v)


# --------------------------------------------------------------------------- explicit attention (METHOD sections 5, 6)

#: ``sink(layer, probs)`` receives head-averaged attention probabilities [B, N, K] of a recording layer.
Sink = Callable[[str, torch.Tensor], None]
#: ``edit(layer, scores)`` returns edited pre-softmax scores [B, heads, N, K].
Edit = Callable[[str, torch.Tensor], torch.Tensor]


def explicit_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, *,
                       layer: str = "", sink: Sink | None = None, edit: Edit | None = None) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` written out, for layers whose maps are read or whose logits are edited.

    A drop-in for ``F.scaled_dot_product_attention`` (no dropout, not causal): ``query`` [B, h, N, d],
    ``key``/``value`` [B, h, K, d]. Scores and softmax are computed in fp32.
    """
    scores = (query.float() @ key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5  # [B, h, N, K]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    if edit is not None:
        scores = edit(layer, scores)
    probs = scores.softmax(dim=-1)
    if sink is not None:
        sink(layer, probs.mean(dim=1))  # [B, N, K]
    return probs.to(value.dtype) @ value


@dataclass
class MapState:
    """What :class:`MapProcessor` layers do beyond blending, shared by all of them.

    ``sink`` is called with the maps of the layers in ``layers``; ``edit`` (if set) edits the scores of
    every layer; ``plain`` makes every layer use the prompt's own K/V (no concept rows).
    """

    layers: frozenset[str] = frozenset()
    sink: Sink | None = None
    edit: Edit | None = None
    plain: bool = False


class MapProcessor(BlendProcessor):
    """:class:`BlendProcessor` that switches to :func:`explicit_attention` only when a map is recorded
    or logits are edited; otherwise it is exactly its parent (SDPA over the same K/V)."""

    def __init__(self, layer: str, state: BlendState, maps: MapState):
        super().__init__(layer, state)
        self.maps = maps

    def kv(self, attn, context):
        if self.maps.plain:
            with torch.no_grad():
                return project_kv(attn, context)
        return super().kv(attn, context)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        m = self.maps
        sink = m.sink if self.layer in m.layers else None
        if sink is None and m.edit is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        key, value = self.kv(attn, encoder_hidden_states)
        fn = functools.partial(explicit_attention, layer=self.layer, sink=sink, edit=m.edit)
        return attend(attn, hidden_states, key, value, attention_mask, sdpa=fn)


class SelfMapProcessor:
    """Self-attention (``attn1``) with its head-averaged map [B, N, N] sent to ``sink`` (capture passes only)."""

    def __init__(self, layer: str, sink: Sink):
        self.layer, self.sink = layer, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise RuntimeError(f"{self.layer}: self-attention capture expects a plain attn1 on [B, N, C] tokens")
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        fn = functools.partial(explicit_attention, layer=self.layer, sink=self.sink)
        return attend(attn, hidden_states, key, value, attention_mask, sdpa=fn)
