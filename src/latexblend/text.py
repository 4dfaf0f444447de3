"""SDXL's text side: both tokenizers and text encoders, prompt encoding as the stock pipeline does it,
concept spans found from token ids, and the learned identifier rows written into the embeddings.

Used by training (the instance prompts and the replace prompts' base flow), extraction (Stage 2) and
anything that needs the text side without a UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from latexblend.errors import LatexBlendError
from latexblend.fileio import read_safetensors
from latexblend.models import load_error, resolve_dtype, resolve_model
from latexblend.tokens import MAX_TOKENS, Span, add_identifier_token, find_sublist, prompt_ids, token_ids

#: The pipeline's attribute names of the two text encoders (also the keys of ``tokens.safetensors``).
ENCODERS = ("text_encoder", "text_encoder_2")

def pipeline_text_side(pipe) -> tuple[list, list]:
    """``([tokenizer, tokenizer_2], [text_encoder, text_encoder_2])`` of an SDXL pipeline."""
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]

def encode_prompts(tokenizers: Sequence, encoders: Sequence, prompts: Sequence[str],
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [B, 77, D1 + D2], pooled [B, P])``: SDXL's prompt embedding (penultimate hidden states of
    both encoders, concatenated; the pooled projection of the second). Prompts over 77 tokens are refused."""

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

def load_text_side(model: str, device: str = "cpu", dtype: str = "fp32"):
    """The two tokenizers and text encoders of ``model`` (no UNet, no VAE)."""

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

    rows = read_safetensors(rows_file, "identifier rows file")[0]
    missing = [key for key in ENCODERS if key not in rows]
    if missing:
        raise LatexBlendError(f"{rows_file} does not hold the identifier rows ({', '.join(missing)} missing): a "
                              "damaged or foreign file")
    token_id = add_identifier_token(tokenizers, encoders, token, init_token=init_token)
    with torch.no_grad():
        for key, encoder in zip(ENCODERS, encoders, strict=True):
            weight = encoder.get_input_embeddings().weight
            if tuple(rows[key].shape) != tuple(weight[token_id].shape):
                raise LatexBlendError(f"{rows_file}: {key} row has shape {tuple(rows[key].shape)}, but this model's "
                                      f"embeddings are {tuple(weight[token_id].shape)}: a run of another base model?")
            weight[token_id] = rows[key].to(weight.dtype)
    return token_id

