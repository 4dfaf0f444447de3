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
from latexblend.tokens import MAX_TOKENS, Span, find_sublist, prompt_ids, token_ids

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from latexblend.bank import ConceptBank

KV_FILE = "kv.safetensors"
TOKENS_FILE = "tokens.safetensors"
ENCODERS = ("text_encoder", "text_encoder_2")


def encode_prompts(tokenizers: Sequence, encoders: Sequence, prompts: Sequence[str],
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [B, 77, D1 + D2], pooled [B, P])``: SDXL's prompt embedding (penultimate hidden states of
    both encoders, concatenated; the pooled projection of the second). Prompts over 77 tokens are refused."""
    import torch

    for prompt in prompts:
        prompt_ids(tokenizers[0], prompt)
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(device or encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def concept_span(tokenizer, prompt: str, slot: str | int, noun_ids: Sequence[int]) -> Span:
    """The span ``[slot, noun...]`` in ``prompt`` found from token ids (``slot``: a word or a token id).

    One clear error when the noun does not appear right after the slot in the tokenized prompt.
    """
    ids = prompt_ids(tokenizer, prompt)
    slot_ids = [slot] if isinstance(slot, int) else token_ids(tokenizer, slot)
    pattern = [*slot_ids, *noun_ids]
    hits = find_sublist(ids, pattern, start=1)
    if len(slot_ids) != 1 or not hits:
        noun = tokenizer.decode(list(noun_ids))
        raise LatexBlendError(f"the class noun '{noun}' (tokens {list(noun_ids)}) does not follow its slot in "
                              f"the tokenized prompt '{prompt}' ({ids}); choose a plain class noun")
    return Span("concept", hits[-1], len(pattern))


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

    from latexblend.bank import ConceptBank

    noun_ids = token_ids(tokenizers[0], class_noun)
    span = concept_span(tokenizers[0], prompt, token_id, noun_ids)
    device = next(iter(weights.values()))[0].device
    with torch.no_grad():
        context, _ = encode_prompts(tokenizers, encoders, [prompt], device)
    k, v = kv_rows(context[0], weights, span, dtype)
    return ConceptBank(name=name, class_noun=class_noun, noun_ids=noun_ids, k=k, v=v, extraction_prompt=prompt,
                       base_model=base_model, fingerprint=fingerprint, training=training)


# --------------------------------------------------------------------------- from a run folder


def weights_from_file(path: Path, base_unet=None) -> tuple[dict, dict]:
    """``({layer: (W_k, W_v)}, metadata)`` from a run's ``kv.safetensors`` (full weights or LoRA factors;
    LoRA needs ``base_unet`` for ``W0``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    layers = json.loads(meta.get("layers") or "null") or list(dict.fromkeys(k.split(".to_")[0] for k in tensors))
    if meta.get("kind") == "lora":
        from latexblend.models import attn2_modules

        if base_unet is None:
            raise LatexBlendError(f"{path} holds LoRA factors; the base UNet is needed to merge them")
        mods = attn2_modules(base_unet)
        merged = {}
        for layer in layers:
            pair = []
            for proj in ("to_k", "to_v"):
                w0 = getattr(mods[layer], proj).weight.detach().float().cpu()
                pair.append(w0 + tensors[f"{layer}.{proj}.lora_B"] @ tensors[f"{layer}.{proj}.lora_A"])
            merged[layer] = tuple(pair)
        return merged, meta
    return {layer: (tensors[f"{layer}.to_k.weight"], tensors[f"{layer}.to_v.weight"]) for layer in layers}, meta


def load_text_side(model: str, device: str = "cpu", dtype: str = "fp32"):
    """The two tokenizers and text encoders of ``model`` (no UNet, no VAE)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from latexblend.models import load_error, resolve_dtype, resolve_model

    source = resolve_model(model)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        toks = [CLIPTokenizer.from_pretrained(source, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        encs = [CLIPTextModel.from_pretrained(source, subfolder=ENCODERS[0], dtype=torch_dtype),
                CLIPTextModelWithProjection.from_pretrained(source, subfolder=ENCODERS[1], dtype=torch_dtype)]
    except Exception as err:
        raise load_error(model, source, err) from err
    return toks, [e.to(device).eval() for e in encs]


def set_identifier_rows(tokenizers, encoders, rows_file: Path, token: str, init_token: str) -> int:
    """Add the identifier token and write its learned rows (``tokens.safetensors``) into both embeddings."""
    import torch
    from safetensors.torch import load_file

    from latexblend.tokens import add_identifier_token

    rows = load_file(str(rows_file))
    token_id = add_identifier_token(tokenizers, encoders, token, init_token=init_token)
    with torch.no_grad():
        for key, encoder in zip(ENCODERS, encoders, strict=True):
            weight = encoder.get_input_embeddings().weight
            weight[token_id] = rows[key].to(weight.dtype)
    return token_id


def checkpoint_folder(run: Path, checkpoint: int | None) -> Path:
    """The run folder itself (final weights) or ``checkpoints/step_<N>``; refused, naming the missing
    file(s), when its weights are incomplete."""
    folder = run if checkpoint is None else run / "checkpoints" / f"step_{checkpoint}"
    missing = [name for name in (KV_FILE, TOKENS_FILE) if not (folder / name).is_file()]
    if missing:
        what = "final weights (the run did not finish; pass --checkpoint N)" if checkpoint is None else \
            f"checkpoint {checkpoint}"
        raise LatexBlendError(f"{run} has no {what}: {' and '.join(str(folder / m) for m in missing)} missing")
    return folder


def extract_run(run: str | Path, checkpoint: int | None = None, prompt: str | None = None,
                out: str | Path | None = None, device: str | None = None, dtype: str = "auto",
                overwrite: bool = False) -> tuple:
    """Re-extract a trained run (``runs/<name>``) into the bank. Returns ``(bank, path)``. An existing bank
    file is replaced only with ``overwrite``."""
    from latexblend.bank import SUFFIX, bank_dir, save_bank
    from latexblend.config import TrainConfig, load_mapping, merge
    from latexblend.models import load_unet_and_tokenizer, resolve_device

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise LatexBlendError(f"{run} is not a training run folder (no config.yaml)")
    cfg = merge(TrainConfig, load_mapping(run / "config.yaml"), source=f"{run}/config.yaml")
    folder = checkpoint_folder(run, checkpoint)
    path = Path(out) if out else bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}"
    if path.exists() and not overwrite:
        raise LatexBlendError(f"{path} already exists; pass --overwrite to replace it, or --out FILE")
    device = resolve_device(device)
    meta = _kv_metadata(folder / KV_FILE)
    base_unet = load_unet_and_tokenizer(cfg.model, device="cpu")[0] if meta.get("kind") == "lora" else None
    weights, meta = weights_from_file(folder / KV_FILE, base_unet)
    weights = {k: (wk.to(device), wv.to(device)) for k, (wk, wv) in weights.items()}
    tokenizers, encoders = load_text_side(cfg.model, device, "fp32")
    token_id = set_identifier_rows(tokenizers, encoders, folder / TOKENS_FILE, cfg.token, cfg.init_token)
    prompt = prompt or cfg.extract_prompt.format(token=cfg.token, noun=cfg.class_noun)
    training = json.loads(meta.get("training", "{}"))
    training["checkpoint"] = "final" if checkpoint is None else checkpoint
    bank = extract_bank(tokenizers, encoders, weights, name=cfg.name, class_noun=cfg.class_noun, token_id=token_id,
                        prompt=prompt, base_model=cfg.model, fingerprint=meta["base_fingerprint"],
                        training=training, dtype=bank_dtype(dtype, device, None))
    return bank, save_bank(bank, path)


def _kv_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:
        raise LatexBlendError(f"{path} is not a readable safetensors file: {err}") from err


def bank_dtype(name: str, device, compute_dtype):
    """The dtype bank rows are stored in: ``auto`` is fp16 on CUDA, else the compute dtype (fp32)."""
    import torch

    from latexblend.models import resolve_dtype

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else (compute_dtype or torch.float32)
    return resolve_dtype(name, str(device))
