"""The authors' release: its inference JSON (``generate --config inference.json``) and its ``.pt``
concept banks (``bank import``), read into our settings and bank format.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

from latexblend.bank.format import ConceptBank, bank_dir, check_name, checked_file, load_bank, validate_bank
from latexblend.errors import LatexBlendError
from latexblend.settings import MAX_SETTINGS_BYTES, load_mapping, parse_json, read_text, shown


def settings_file(path: str | Path, directory: str | Path | None = None) -> dict:
    """The settings in a ``generate --config`` file: ours (a YAML/JSON mapping) or, sniffed by its
    ``[`` start, the authors' inference JSON (banks looked up in ``directory``)."""

    path = Path(path)
    text = read_text(path, "config file", MAX_SETTINGS_BYTES)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return release_config(path, directory, text)
    return load_mapping(path)


def release_config(path: str | Path, directory: str | Path | None = None, text: str | None = None) -> dict:
    """Settings from the authors' ``inference.json`` (its first element; ``text``: the file's text, already
    read), with banks converted by ``latexblend bank import`` (``concept_bank/n_2_dog_1500.pt`` ->
    ``<bank dir>/n_2_dog_1500.safetensors``)."""
    path = Path(path)
    text = read_text(path, "release config", MAX_SETTINGS_BYTES) if text is None else text
    data = parse_json(text, f"release config {path}")
    entry = data[0] if isinstance(data, list) and data else data
    if not isinstance(entry, dict) or "prompt" not in entry:
        raise LatexBlendError(f"{path}: expected a list whose first element has a 'prompt'")
    concepts = []
    for i in range(1, _number(path, entry, "concept_num", 0) + 1):
        spec = entry.get(f"concept{i}") or {}
        if not (isinstance(spec, dict) and isinstance(spec.get("concept_bank"), str)
                and isinstance(spec.get("class_noun"), str)):
            raise LatexBlendError(f"{path}: concept{i} needs 'concept_bank' and 'class_noun' strings")
        stem = Path(spec["concept_bank"]).stem
        found = [p for p in (Path(spec["concept_bank"]).with_suffix(".safetensors"),
                             bank_dir(directory) / f"{stem}.safetensors") if p.is_file()]
        if not found:
            raise LatexBlendError(
                f"{path}: concept{i} bank {spec['concept_bank']} has no converted bank; run `latexblend bank "
                f"import {spec['concept_bank']} --class-noun {spec['class_noun']} --name {stem}`"
            )
        bank = load_bank(found[0])
        if bank.class_noun != spec["class_noun"]:
            raise LatexBlendError(f"{path}: concept{i} class noun '{spec['class_noun']}' but its bank's is "
                                  f"'{bank.class_noun}'")
        concepts.append(str(found[0]))
    out = {"prompts": [entry["prompt"]], "concepts": concepts, "num_images": entry.get("batch_size"),
           "steps": entry.get("num_inference_steps"), "blend_start": entry.get("blending_start"),
           **_release_steering(entry)}
    return {k: v for k, v in out.items() if v is not None}


def _release_steering(entry: dict) -> dict:
    """The release's guidance/rectification keys in our units: its ``guidance_steps`` first steps of
    ``num_inference_steps`` become ``guidance_window = 1 - guidance_steps / num_inference_steps`` (exact
    for the default leading timestep spacing: 20 of 100 -> 0.8)."""
    out = {"guidance": bool(entry.get("blending_guidance")) or None,
           "guidance_step_size": entry.get("guidance_stepsize"),
           "rectify": bool(entry.get("self_rectification")) or None,
           "rectify_start": entry.get("rectification_start")}
    if entry.get("guidance_steps") is not None:
        total = _number(Path("inference JSON"), entry, "num_inference_steps", 100) or 100
        out["guidance_window"] = round(1 - _number(Path("inference JSON"), entry, "guidance_steps", 0) / total, 6)
    return out


def _number(path: Path, entry: dict, key: str, default: int) -> int:
    """``entry[key]`` as a whole number (``default`` when absent), else one line naming the key."""
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value):
        raise LatexBlendError(f"{path}: {key} must be a whole number, got {shown(value)}")
    return int(value)


# --------------------------------------------------------------------------- release .pt banks


def _load_pt(path: Path):
    """``torch.load`` with ``weights_only=True``; each failure is one line (a file that would need arbitrary
    code to load is refused as unsafe instead of torch's advice to turn the protection off)."""

    if path.stat().st_size == 0:
        raise LatexBlendError(f"{path} is empty; not a release concept bank")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # torch's weights-only unpickler met a class or function reference
            raise LatexBlendError(f"{path} is refused as unsafe: it holds objects other than tensors, which could run "
                                  "code when loaded; only plain tensor banks are imported") from None
        raise LatexBlendError(f"{path} is not a torch.save file (corrupt or another format)") from None
    except Exception as err:  # zip, pickle and storage errors all mean the same to a user
        raise LatexBlendError(f"{path} is not a torch.save file (corrupt or another format; "
                              f"{type(err).__name__})") from None


def _rows(path: Path, key, part: str, tensor) -> torch.Tensor:
    """A release entry's ``k`` or ``v`` as its own contiguous ``[L, C]`` copy (leading unit dims dropped)."""

    if not isinstance(tensor, torch.Tensor):
        raise LatexBlendError(f"{path}: entry {key!r}: {part} is a {type(tensor).__name__}, not a tensor")
    t = tensor.detach()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise LatexBlendError(f"{path}: entry {key!r}: {part} has shape {tuple(tensor.shape)}, not [L, C]")
    return t.contiguous().clone()


def import_release_bank(path: str | Path, class_noun: str, name: str, tokenizer,
                        base_model: str = "unknown", fingerprint: str | None = None) -> ConceptBank:
    """Convert a bank saved by the authors' release (``torch.save`` of
    ``{"<...>.attn2.processor": {"k": [L, C], "v": [L, C]}}``) into a :class:`ConceptBank`.

    The file is read with ``weights_only=True`` (no arbitrary unpickling) onto the CPU; tensors that
    are views of larger ones are copied down to their own rows, so nothing extra is kept.
    """
    path = checked_file(Path(path))
    raw = _load_pt(path)
    if not isinstance(raw, dict) or not raw:
        raise LatexBlendError(f"{path} does not hold a dict of layers; not a release concept bank")
    noun_ids = list(tokenizer(class_noun, add_special_tokens=False).input_ids)
    k, v = {}, {}
    for key, entry in raw.items():
        layer = str(key).removesuffix(".processor")
        if not layer.endswith("attn2") or not isinstance(entry, dict) or not {"k", "v"} <= set(entry):
            raise LatexBlendError(f"{path}: entry {key!r} is not an attn2 layer with 'k' and 'v' tensors")
        k[layer], v[layer] = (_rows(path, key, part, entry[part]) for part in ("k", "v"))
    rows = next(iter(k.values())).shape[0]
    if rows != 1 + len(noun_ids):
        raise LatexBlendError(
            f"{path} holds {rows} rows per layer, but '{class_noun}' is {len(noun_ids)} token(s) "
            f"(expected {1 + len(noun_ids)} rows): is --class-noun right?"
        )
    bank = ConceptBank(name=check_name(name), class_noun=class_noun, noun_ids=noun_ids, k=k, v=v,
                       extraction_prompt=f"photo of <new1> {class_noun}", base_model=base_model,
                       fingerprint=fingerprint, training={"imported_from": path.name})
    validate_bank(bank)
    return bank
