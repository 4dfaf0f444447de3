"""Stage 2 (METHOD section 3): read a trained concept into the concept bank with one text-side pass.

Encode ``"photo of <new1> dog"`` with both text encoders (learned ``<new1>`` rows), concatenate their
penultimate hidden states as ``StableDiffusionXLPipeline.encode_prompt`` does, project with the
fine-tuned ``to_k``/``to_v`` of every attn2 layer and keep the span rows ``[<new1>, dog]``. No UNet
forward and no sampling loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latexblend.bank.format import ConceptBank
from latexblend.models import resolve_dtype
from latexblend.text import concept_span, encode_prompts
from latexblend.tokens import Span, token_ids


def kv_rows(context: torch.Tensor, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], span: Span,
            dtype=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer ``(K[span], V[span])`` [L, C] of ``context`` [77, D] under ``weights[layer] = (W_k, W_v)``."""

    k, v = {}, {}
    with torch.no_grad():
        rows = context[span.start : span.stop].float()
        for layer, (wk, wv) in weights.items():
            k[layer] = (rows @ wk.float().T).to(dtype or torch.float32).contiguous()
            v[layer] = (rows @ wv.float().T).to(dtype or torch.float32).contiguous()
    return k, v


def extract_bank(tokenizers: Sequence, encoders: Sequence, weights: dict, *, name: str, class_noun: str,
                 token_id: int, prompt: str, base_model: str, fingerprint: str, training: dict,
                 dtype=None) -> ConceptBank:
    """A :class:`ConceptBank` read from ``prompt`` (which holds the identifier then the noun). The encoders
    must already carry the learned identifier rows; ``weights`` are the fine-tuned ``(W_k, W_v)``."""

    noun_ids = token_ids(tokenizers[0], class_noun)
    span = concept_span(tokenizers[0], prompt, token_id, noun_ids)
    device = next(iter(weights.values()))[0].device
    with torch.no_grad():
        context, _ = encode_prompts(tokenizers, encoders, [prompt], device)
    k, v = kv_rows(context[0], weights, span, dtype)
    return ConceptBank(name=name, class_noun=class_noun, noun_ids=noun_ids, k=k, v=v, extraction_prompt=prompt,
                       base_model=base_model, fingerprint=fingerprint, training=training)


def bank_dtype(name: str, device, compute_dtype):
    """The dtype bank rows are stored in: ``auto`` is fp16 on CUDA, else the compute dtype (fp32)."""

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else (compute_dtype or torch.float32)
    return resolve_dtype(name, str(device))
