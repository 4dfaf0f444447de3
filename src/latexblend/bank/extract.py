"""Stage 2 (METHOD section 3): read a trained concept into the concept bank with one text-side pass.

Encode ``"photo of <new1> dog"`` with both text encoders (learned ``<new1>`` rows), concatenate their
penultimate hidden states as ``StableDiffusionXLPipeline.encode_prompt`` does, project with the
fine-tuned ``to_k``/``to_v`` of every attn2 layer and keep the span rows ``[<new1>, dog]``. No UNet
forward and no sampling loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from latexblend.errors import LatexBlendError
from latexblend.text import concept_span, encode_prompts, load_text_side, set_identifier_rows
from latexblend.tokens import Span, token_ids
from latexblend.train.runfolder import KV_FILE, TOKENS_FILE, checkpoint_folder, kv_metadata, kv_weights, read_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from latexblend.bank.format import ConceptBank

def kv_rows(context: torch.Tensor, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], span: Span,
            dtype=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer ``(K[span], V[span])`` [L, C] of ``context`` [77, D] under ``weights[layer] = (W_k, W_v)``."""
    import torch

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
    import torch

    from latexblend.bank.format import ConceptBank

    noun_ids = token_ids(tokenizers[0], class_noun)
    span = concept_span(tokenizers[0], prompt, token_id, noun_ids)
    device = next(iter(weights.values()))[0].device
    with torch.no_grad():
        context, _ = encode_prompts(tokenizers, encoders, [prompt], device)
    k, v = kv_rows(context[0], weights, span, dtype)
    return ConceptBank(name=name, class_noun=class_noun, noun_ids=noun_ids, k=k, v=v, extraction_prompt=prompt,
                       base_model=base_model, fingerprint=fingerprint, training=training)


# --------------------------------------------------------------------------- from a run folder


def extract_run(run: str | Path, checkpoint: int | None = None, prompt: str | None = None,
                out: str | Path | None = None, device: str | None = None, dtype: str = "auto",
                overwrite: bool = False) -> tuple:
    """Re-extract a trained run (``runs/<name>``) into the bank. Returns ``(bank, path)``. An existing bank
    file is replaced only with ``overwrite``."""
    from latexblend.bank.format import SUFFIX, bank_dir, save_bank
    from latexblend.device import resolve_device
    from latexblend.models import load_unet_and_tokenizer

    run = Path(run)
    cfg = read_config(run)
    folder = checkpoint_folder(run, checkpoint)
    path = Path(out) if out else bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}"
    if path.exists() and not overwrite:
        raise LatexBlendError(f"{path} already exists; pass --overwrite to replace it, or --out FILE")
    device = resolve_device(device)
    rows_dtype = bank_dtype(dtype, device, None)  # a bad --dtype is refused before anything loads
    meta = kv_metadata(folder / KV_FILE)
    base_unet = load_unet_and_tokenizer(cfg.model, device="cpu")[0] if meta.get("kind") == "lora" else None
    weights, meta = kv_weights(folder / KV_FILE, base_unet)
    weights = {k: (wk.to(device), wv.to(device)) for k, (wk, wv) in weights.items()}
    tokenizers, encoders = load_text_side(cfg.model, device, "fp32")
    token_id = set_identifier_rows(tokenizers, encoders, folder / TOKENS_FILE, cfg.token, cfg.init_token)
    prompt = prompt or cfg.extract_prompt.format(token=cfg.token, noun=cfg.class_noun)
    training = json.loads(meta.get("training", "{}"))
    training["checkpoint"] = "final" if checkpoint is None else checkpoint
    bank = extract_bank(tokenizers, encoders, weights, name=cfg.name, class_noun=cfg.class_noun, token_id=token_id,
                        prompt=prompt, base_model=cfg.model, fingerprint=meta["base_fingerprint"],
                        training=training, dtype=rows_dtype)
    return bank, save_bank(bank, path)


def bank_dtype(name: str, device, compute_dtype):
    """The dtype bank rows are stored in: ``auto`` is fp16 on CUDA, else the compute dtype (fp32)."""
    import torch

    from latexblend.models import resolve_dtype

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else (compute_dtype or torch.float32)
    return resolve_dtype(name, str(device))
