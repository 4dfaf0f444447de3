"""How large a bank's rows may be, measured against the model's own rows.

A trained concept's K/V rows come from the model's own text features under slightly fine-tuned
projections, so they stay within a few times the norm of the rows the model itself makes for the class
noun (random banks of the test suite: about 3x; trained ones: 1-2x). A row :data:`MAX_ROW_SCALE` times
larger is not a concept but a damaged file: rows 1e5 times too large overflow fp16 and turn images
black, 1e30 does it in any dtype. The reference of a layer is the largest L2 norm among the model's K
(or V) rows of the span ``[a, <noun tokens>]`` of the prompt ``"a <noun>"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from latexblend.errors import LatexBlendError
from latexblend.models import attn2_modules
from latexblend.text import concept_span, encode_prompts
from latexblend.tokens import token_ids

#: A bank row may be at most this many times the norm of the model's own rows (see the module docstring).
MAX_ROW_SCALE = 100.0


def reference_norms(tokenizers: Sequence, encoders: Sequence, unet, noun: str) -> dict[str, tuple[float, float]]:
    """Per attn2 layer, the largest norm of the model's own K rows and of its V rows of ``"a <noun>"``'s span."""
    prompt = f"a {noun}"
    span = concept_span(tokenizers[0], prompt, "a", token_ids(tokenizers[0], noun))
    out = {}
    with torch.no_grad():
        context, _ = encode_prompts(tokenizers, encoders, [prompt], encoders[0].device)
        rows = context[0, span.start : span.stop]
        for name, attn in attn2_modules(unet).items():
            x = rows.to(attn.to_k.weight.device, attn.to_k.weight.dtype)  # the weights alone: no module hooks run
            out[name] = tuple(float(F.linear(x, proj.weight, proj.bias).double().norm(dim=-1).max())
                              for proj in (attn.to_k, attn.to_v))
    return out


def check_row_scale(name: str, k: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
                    reference: dict[str, tuple[float, float]], noun: str) -> None:
    """Refuse rows over :data:`MAX_ROW_SCALE` times the model's own (``reference``: :func:`reference_norms`)."""
    for layer, (ref_k, ref_v) in reference.items():
        for part, rows, ref in (("K", k[layer], ref_k), ("V", v[layer], ref_v)):
            norm = float(rows.double().norm(dim=-1).max())
            if norm > MAX_ROW_SCALE * max(ref, 1e-12):
                raise LatexBlendError(
                    f"bank '{name}', layer {layer}: its {part} rows are {norm / max(ref, 1e-12):.3g} times the norm "
                    f"of this model's own rows of 'a {noun}' (at most {MAX_ROW_SCALE:g}): a damaged bank, or one "
                    f"of another model; retrain or re-extract it")
