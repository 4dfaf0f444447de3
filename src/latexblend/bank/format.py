"""The concept bank: one ``.safetensors`` file per concept holding its latent textual rows.

Tensors are ``<attn2 module name>.k`` and ``.v``, each ``[L, C_l]`` and contiguous; the safetensors
metadata (all strings) carries the format version, name, class noun and its token ids, ``L``, the
extraction prompt, the base model and a fingerprint of its ``to_k`` weights, dtype and a training
summary. See ``docs/BANK_FORMAT.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latexblend import __version__
from latexblend.bank.scale import check_row_scale, reference_norms
from latexblend.errors import LatexBlendError
from latexblend.fileio import read_safetensors, save_safetensors
from latexblend.models import Fingerprint, attn2_shapes, fingerprint
from latexblend.settings import parse_json, safe_name

FORMAT = "latexblend-bank"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"


@dataclass
class ConceptBank:
    """One concept's rows in every attn2 layer.

    ``k[layer]`` and ``v[layer]`` are ``[L, C_layer]`` with ``L = 1 + len(noun_ids)``.
    ``fingerprint`` is a :class:`latexblend.models.Fingerprint` JSON (``None`` when unknown, e.g. an
    import without ``--model``).
    """

    name: str
    class_noun: str
    noun_ids: list[int]
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    extraction_prompt: str = ""
    base_model: str = "unknown"
    fingerprint: str | None = None
    training: dict = field(default_factory=dict)
    source: str | None = None  # the file it was loaded from (not stored in the file)

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.noun_ids)

    @property
    def layers(self) -> list[str]:
        return list(self.k)

    @property
    def dtype(self) -> str:
        return str(next(iter(self.k.values())).dtype).replace("torch.", "")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    @property
    def fingerprint_digest(self) -> str:
        if not self.fingerprint:
            return "unknown"

        return Fingerprint.from_json(self.fingerprint).digest

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "name": self.name,
            "class_noun": self.class_noun, "noun_token_ids": json.dumps(self.noun_ids),
            "num_tokens": str(self.num_tokens), "extraction_prompt": self.extraction_prompt,
            "base_model": self.base_model, "base_fingerprint": self.fingerprint_digest,
            "base_fingerprint_norms": self.fingerprint or "", "dtype": self.dtype,
            "training": json.dumps(self.training), "latexblend_version": __version__,
        }


def check_name(name: str, what: str = "concept name") -> str:
    """A concept/bank name, checked to be safe as a file name (:func:`latexblend.settings.safe_name`)."""
    return safe_name(name, what)


def validate_bank(bank: ConceptBank) -> None:
    """Layers, shapes and values: every row finite (a NaN or Inf row would turn images black)."""

    if set(bank.k) != set(bank.v) or not bank.k:
        raise LatexBlendError(f"bank '{bank.name}': k and v must cover the same, non-empty set of layers")
    for layer in bank.k:
        k, v = bank.k[layer], bank.v[layer]
        if k.ndim != 2 or k.shape != v.shape or k.shape[0] != bank.num_tokens:
            raise LatexBlendError(
                f"bank '{bank.name}', layer {layer}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                f"[L={bank.num_tokens}, C]"
            )
        if not (k.is_floating_point() and v.is_floating_point()):
            raise LatexBlendError(f"bank '{bank.name}', layer {layer}: rows must be floating point, not {k.dtype}")
        if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
            raise LatexBlendError(f"bank '{bank.name}', layer {layer}: holds NaN or infinite values (a diverged "
                                  f"training or a damaged file); retrain or re-extract it")


def save_bank(bank: ConceptBank, path: str | Path) -> Path:
    """Write ``bank`` to ``path`` atomically; tensors are stored as contiguous copies on the CPU, metadata
    in sorted order (identical banks give identical files)."""
    check_name(bank.name)
    validate_bank(bank)
    tensors = {}
    for layer in bank.k:
        tensors[f"{layer}.k"] = bank.k[layer].detach().to("cpu").contiguous().clone()
        tensors[f"{layer}.v"] = bank.v[layer].detach().to("cpu").contiguous().clone()
    return save_safetensors(tensors, path, bank.metadata())


def checked_file(path: Path) -> Path:
    """``path``, or one clear error if it is missing, a folder or unreadable."""
    if not path.exists():
        raise LatexBlendError(f"bank file {path} not found")
    if path.is_dir():
        raise LatexBlendError(f"{path} is a directory; expected a {SUFFIX} bank file")
    if not path.is_file():
        raise LatexBlendError(f"{path} is not a regular file (a device, pipe or socket); expected a {SUFFIX} bank file")
    if not os.access(path, os.R_OK):
        raise LatexBlendError(f"bank file {path} is not readable")
    return path


def load_bank(path: str | Path) -> ConceptBank:
    """Read a bank file, with one clear error for a missing, corrupt, truncated or foreign file."""

    path = checked_file(Path(path))
    tensors, meta = read_safetensors(path, "bank file")
    if meta.get("format") != FORMAT:
        raise LatexBlendError(
            f"{path} is not a latexblend concept bank (convert release .pt banks with `latexblend bank import`)"
        )
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise LatexBlendError(f"{path}: bank metadata format_version is {version!r}, not a whole number")
    if int(version) > FORMAT_VERSION:
        raise LatexBlendError(f"{path} has bank format {version}; upgrade latexblend to read it")
    bank = _bank_from(path, meta, tensors)
    validate_bank(bank)
    return bank


def _bank_from(path: Path, meta: dict[str, str], tensors: dict) -> ConceptBank:
    """The :class:`ConceptBank` of a file's metadata and tensors; every field read from the file is checked
    (the name becomes a file name in ``generate --save-maps``)."""
    missing = [key for key in ("name", "class_noun", "noun_token_ids") if key not in meta]
    if missing:
        raise LatexBlendError(f"{path}: bank metadata is incomplete ({', '.join(missing)} missing)")
    name, noun = meta["name"], meta["class_noun"]
    noun_ids = parse_json(meta["noun_token_ids"], f"{path}: bank metadata noun_token_ids")
    training = parse_json(meta.get("training") or "{}", f"{path}: bank metadata training")
    norms = meta.get("base_fingerprint_norms") or None
    if norms is not None:
        Fingerprint.from_json(norms, f"{path}: bank metadata base_fingerprint_norms")
    if not (isinstance(noun_ids, list) and noun_ids and all(type(i) is int and i >= 0 for i in noun_ids)):
        raise LatexBlendError(f"{path}: bank metadata noun_token_ids must be a non-empty list of token ids")
    if not isinstance(training, dict):
        raise LatexBlendError(f"{path}: bank metadata training must be a JSON object")
    if not noun.strip():
        raise LatexBlendError(f"{path}: bank metadata class_noun is empty")
    safe_name(name, f"{path}: bank name")
    return ConceptBank(
        name=name, class_noun=noun, noun_ids=noun_ids,
        k={key[:-2]: t for key, t in tensors.items() if key.endswith(".k")},
        v={key[:-2]: t for key, t in tensors.items() if key.endswith(".v")},
        extraction_prompt=meta.get("extraction_prompt", ""), base_model=meta.get("base_model", "unknown"),
        fingerprint=norms, training=training, source=str(path),
    )


def bank_complete(path: str | Path) -> bool:
    """True when ``path`` holds a bank that loads and checks (a finished concept, for farm re-runs)."""
    try:
        load_bank(path)
    except LatexBlendError:
        return False
    return True


# --------------------------------------------------------------------------- names and folders


def bank_dir(directory: str | Path | None = None) -> Path:
    """The concept-bank folder: ``directory``, else ``$LATEXBLEND_BANK``, else ``./concept_bank``; refused when
    that path is a file."""
    path = Path(directory or os.environ.get("LATEXBLEND_BANK", "concept_bank"))
    if path.exists() and not path.is_dir():
        raise LatexBlendError(f"bank folder {path} is a file, not a folder")
    return path


def bank_file(name: str, directory: str | Path | None = None) -> Path:
    """Where bank ``name`` is (or will be) stored: ``<bank folder>/<name>.safetensors``."""
    return bank_dir(directory) / f"{check_name(name)}{SUFFIX}"


def describe_bank(path: Path) -> dict:
    """A bank file's metadata, path, sizes and layer count per width, and its training summary."""
    bank = load_bank(path)
    widths: dict[int, int] = {}
    for t in bank.k.values():
        widths[int(t.shape[1])] = widths.get(int(t.shape[1]), 0) + 1
    info = {**bank.metadata(), "path": str(path), "file_bytes": path.stat().st_size, "tensor_bytes": bank.nbytes,
            "layers_by_width": {str(w): n for w, n in sorted(widths.items())}}
    info.pop("base_fingerprint_norms")
    info["training"] = bank.training
    return info


def bank_path(name_or_path: str, directory: str | Path | None = None) -> Path:
    """``corgi`` -> ``concept_bank/corgi.safetensors``; a path (with a suffix or a slash) is kept."""
    if name_or_path.endswith(SUFFIX) or os.sep in name_or_path or "/" in name_or_path:
        return Path(name_or_path)
    path = bank_dir(directory) / f"{check_name(name_or_path)}{SUFFIX}"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in bank_dir(directory).glob(f"*{SUFFIX}"))) or "none"
        raise LatexBlendError(f"no concept '{name_or_path}' in {bank_dir(directory)}/ (banks there: {known})")
    return path


def list_banks(directory: str | Path | None = None) -> list[tuple[Path, ConceptBank | LatexBlendError]]:
    """Every ``*.safetensors`` in the bank folder with its bank, or the error that reading it gave."""
    out: list[tuple[Path, ConceptBank | LatexBlendError]] = []
    for path in sorted(bank_dir(directory).glob(f"*{SUFFIX}")):
        try:
            out.append((path, load_bank(path)))
        except LatexBlendError as err:
            out.append((path, err))
    return out


# --------------------------------------------------------------------------- verification


def verify_bank(bank: ConceptBank, unet, tokenizer=None, model_fingerprint=None, text_side=None) -> None:
    """Refuse a bank that does not fit ``unet`` (layer names, shapes, ``to_k`` fingerprint), whose
    noun tokenizes differently under ``tokenizer``, or (given the model's ``text_side``, ``(tokenizers,
    encoders)``) whose rows are far larger than the model's own (:mod:`latexblend.bank.scale`). Raises
    :class:`LatexBlendError`; returns nothing. ``model_fingerprint`` saves recomputing ``fingerprint(unet)``
    when verifying several banks."""

    shapes = attn2_shapes(unet)
    missing, extra = sorted(set(shapes) - set(bank.k)), sorted(set(bank.k) - set(shapes))
    if missing or extra:
        raise LatexBlendError(
            f"bank '{bank.name}' does not fit this model: {len(missing)} of its {len(shapes)} attn2 layers "
            f"missing from the bank, {len(extra)} bank layers not in the model (e.g. {(missing + extra)[0]})"
        )
    for layer, dim in shapes.items():
        if bank.k[layer].shape[1] != dim:
            raise LatexBlendError(
                f"bank '{bank.name}' does not fit this model: layer {layer} has width {bank.k[layer].shape[1]} "
                f"in the bank and {dim} in the model"
            )
    if bank.fingerprint:
        ours = model_fingerprint or fingerprint(unet)
        if not Fingerprint.from_json(bank.fingerprint).matches(ours):
            raise LatexBlendError(
                f"bank '{bank.name}' was made for base model '{bank.base_model}' (fingerprint "
                f"{bank.fingerprint_digest}), not this one (fingerprint {ours.digest})"
            )
    if tokenizer is not None:
        ids = tokenizer(bank.class_noun, add_special_tokens=False).input_ids
        if list(ids) != list(bank.noun_ids):
            raise LatexBlendError(
                f"bank '{bank.name}': class noun '{bank.class_noun}' tokenizes as {list(ids)} here but "
                f"{bank.noun_ids} in the bank; this tokenizer does not match the bank's model"
            )
    if text_side is not None:
        reference = reference_norms(*text_side, unet, bank.class_noun)
        check_row_scale(bank.name, bank.k, bank.v, reference, bank.class_noun)
