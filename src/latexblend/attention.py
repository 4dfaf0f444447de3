"""What every ``attn2`` (cross-attention) processor of the toolkit shares.

Everything the method does happens in the latent textual space, i.e. on the rows of ``K = c W_k^T``
and ``V = c W_v^T``: a processor computes (or fetches) K and V, edits rows, and runs the stock
scaled-dot-product attention (:func:`attend`). Training's splice (:mod:`latexblend.train.splice`) and
blending (:mod:`latexblend.blend.processor`) are the two kinds; :func:`explicit_attention` writes the
softmax out for the layers whose maps are read or whose logits are edited (METHOD.md sections 5 and 6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from latexblend.models import attn2_modules


def project_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_k(c), to_v(c))``: the latent textual features of ``context`` [B, 77, D] -> 2 x [B, 77, C]."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def attend(attn, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None = None, sdpa: Callable | None = None,
           query: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention of ``hidden_states`` [B, N, C_q] over given ``key``/``value`` [B, 77, C].

    The same computation as diffusers' ``AttnProcessor2_0`` once K and V are known (SDPA, output
    projection, residual and rescale as configured on ``attn``). ``sdpa`` replaces
    ``F.scaled_dot_product_attention`` (same signature), e.g. by :func:`explicit_attention`. ``query``:
    ``to_q`` of ``hidden_states`` when already computed (:class:`FusedSelfProcessor`).
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
    if query is None:
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
    if attn.rescale_output_factor != 1.0:  # x / 1.0 is x: an operator (and its backward) for nothing
        out = out / attn.rescale_output_factor
    return out


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

    old = dict(unet.attn_processors)
    new = {}
    for key, proc in old.items():
        layer = key.removesuffix(".processor")
        new[key] = factory(layer) if layer.endswith("attn2") else proc
    attn2_modules(unet)  # raises a clear error for a UNet without cross-attention
    unet.set_attn_processor(new)
    return lambda: unet.set_attn_processor(old)


def fuse_self_attention(unet) -> int:
    """Give every plain ``attn1`` layer of a frozen ``unet`` one ``[3C, C]`` weight for q, k and v (its
    ``to_q``/``to_k``/``to_v`` weights become views of it: no more memory) and :class:`FusedSelfProcessor`.
    Only for a UNet whose self-attention weights never change (training's). Returns the layers fused."""
    processor, fused = FusedSelfProcessor(), {}
    for name, attn in unet.named_modules():
        if not name.endswith("attn1") or attn.group_norm is not None or attn.spatial_norm is not None:
            continue
        projections = (attn.to_q, attn.to_k, attn.to_v)
        if any(p.bias is not None for p in projections) or attn.is_cross_attention:
            continue
        weight = torch.cat([p.weight.detach() for p in projections])
        for p, rows in zip(projections, weight.split([p.weight.shape[0] for p in projections]), strict=True):
            p.weight = torch.nn.Parameter(rows, requires_grad=False)
        attn.fused_qkv = weight
        fused[f"{name}.processor"] = processor
    if fused:
        unet.set_attn_processor({**unet.attn_processors, **fused})
    return len(fused)


class FusedSelfProcessor:
    """Self-attention (``attn1``) with q, k and v from one matmul on the layer's fused weight
    (:func:`fuse_self_attention`), then :func:`attend`: the same arithmetic as diffusers' processor, with
    one kernel (and one backward) where there were three."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError("the fused self-attention processor takes self-attention on [B, N, C] tokens")
        query, key, value = F.linear(hidden_states, attn.fused_qkv).chunk(3, dim=-1)
        return attend(attn, hidden_states, key, value, attention_mask, query=query)


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
