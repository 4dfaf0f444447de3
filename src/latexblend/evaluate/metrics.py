"""Evaluation (METHOD.md section 7): CLIP-T, CLIP-I and DINO on a ``generate`` output folder.

- CLIP-T: cosine between the CLIP ViT-B/32 text embedding of the prompt and the image embedding,
  reported raw and as CLIPScore ``2.5 * max(cos, 0)``.
- CLIP-I: mean cosine over all (generated, reference) pairs of CLIP image embeddings.
- DINO: the same with DINO ViT-S/16 CLS features.
- An image with concepts ``[a, b]`` is scored against a's references and b's references separately:
  one row per (image, concept). Aggregates: per concept (mean over its rows) and overall (mean over
  all (image, concept) rows; CLIP-T over images).

The exact protocol is in ``docs/EVALUATION.md``. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from latexblend import __version__
from latexblend.blend.samples import SampleImage, Samples, read_samples
from latexblend.console import Progress
from latexblend.device import resolve_device
from latexblend.errors import LatexBlendError
from latexblend.evaluate import DEFAULT_CLIP, DEFAULT_DINO
from latexblend.fileio import list_images, open_image
from latexblend.models import load_error

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIPSCORE_WEIGHT = 2.5
TEXT_POLICIES = {
    "expanded": "CLIP-T text is images[].expanded_prompt: placeholders replaced by 'a <class noun>', "
                "no identifier tokens reach CLIP",
    "raw": "CLIP-T text is images[].prompt as the user wrote it (placeholders such as <corgi> kept as text)",
}


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Resize the shortest side to ``resize`` (bicubic), centre-crop ``crop``, normalise by mean/std."""

    name: str
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CLIP_PREPROCESS = Preprocess("clip", 224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = Preprocess("dino", 256, 224, IMAGENET_MEAN, IMAGENET_STD)


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shortest side to ``short`` (long side truncated, as torchvision)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centred ``crop x crop`` box (offsets rounded, as torchvision)."""
    left, top = int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def preprocess(images: Sequence[Image.Image], spec: Preprocess) -> torch.Tensor:
    """RGB PIL images -> normalised pixels ``[B, 3, crop, crop]`` (float32)."""

    out = []
    for image in images:
        image = image.convert("RGB").resize(resized_size(*image.size, spec.resize), Image.Resampling.BICUBIC)
        array = np.asarray(image.crop(center_crop_box(*image.size, spec.crop)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std


# --------------------------------------------------------------------------- references


def parse_reference_flags(flags: Sequence[str], concept_names: Sequence[str]) -> dict[str, Path]:
    """``["corgi=data/corgi", ...]`` -> ``{"corgi": Path}``; a bare ``DIR`` needs exactly one concept."""
    out: dict[str, Path] = {}
    for flag in flags:
        name, sep, directory = flag.partition("=")
        if not sep:
            if len(concept_names) != 1:
                raise LatexBlendError(f"--references {flag}: the samples have {len(concept_names)} concepts; "
                                      "write --references NAME=DIR")
            name, directory = concept_names[0], flag
        if name not in concept_names:
            raise LatexBlendError(f"--references {flag}: no concept '{name}' in the samples "
                                  f"(they have: {', '.join(concept_names) or 'none'})")
        out[name] = Path(directory).expanduser()
    return out


def _recorded_reference(samples: Samples, name: str) -> Path | None:
    """The references folder recorded in metadata: as written, else relative to the samples folder."""
    recorded = (samples.concepts.get(name) or {}).get("references")
    if not recorded:
        return None
    path = Path(recorded).expanduser()
    if not path.is_absolute() and not path.exists() and (samples.folder / path).exists():
        return samples.folder / path
    return path


def resolve_references(samples: Samples, overrides: Mapping[str, str | Path]) -> tuple[dict[str, list[Path]], list]:
    """Reference images per used concept, and ``skipped`` entries for concepts that have none."""
    used = sorted({name for img in samples.images for name in img.concepts})
    refs: dict[str, list[Path]] = {}
    skipped = []
    for name in used:
        folder = Path(overrides[name]) if name in overrides else _recorded_reference(samples, name)
        if folder is None:
            skipped.append({"kind": "concept", "name": name,
                            "reason": "no references recorded in metadata.json and none given with --references"})
            continue
        refs[name] = list_images(folder, "references", strict=False)
    return refs, skipped


# --------------------------------------------------------------------------- models


@dataclass
class Models:
    """CLIP (model + tokenizer) and DINO on one device."""

    clip: Any
    tokenizer: Any
    dino: Any
    device: str
    clip_id: str
    dino_id: str


def _load(loader: Callable, model_id: str, flag: str, **kwargs):
    try:
        return loader(model_id, **kwargs)
    except Exception as err:  # hub, file-system and format errors all mean the same to a user
        raise load_error(model_id, model_id, err, flag) from err


def load_models(clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO, device: str | None = None) -> Models:
    """Load CLIP (``CLIPModel`` + ``CLIPTokenizer``) and DINO (``ViTModel``) from folders or hub ids."""

    device = resolve_device(device)
    clip = _load(CLIPModel.from_pretrained, clip_model, "--clip-model")
    tokenizer = _load(CLIPTokenizer.from_pretrained, clip_model, "--clip-model")
    dino = _load(ViTModel.from_pretrained, dino_model, "--dino-model", add_pooling_layer=False)
    return Models(clip=clip.to(device).eval(), tokenizer=tokenizer, dino=dino.to(device).eval(), device=device,
                  clip_id=clip_model, dino_id=dino_model)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_image_embeds(clip, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 224, 224]`` -> unit CLIP image embeddings ``[B, D]`` (projected pooled output)."""
    return _normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).float())


def dino_embeds(dino, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 224, 224]`` -> unit DINO CLS features ``[B, D]`` (``last_hidden_state[:, 0]``)."""
    return _normalize(dino(pixel_values=pixels).last_hidden_state[:, 0].float())


def clip_text_embeds(models: Models, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Texts -> unit CLIP text embeddings ``[N, D]`` (tokens truncated to 77)."""

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tok = models.tokenizer(list(texts[i : i + batch_size]), padding="max_length", truncation=True,
                                   max_length=77, return_tensors="pt").to(models.device)
            pooled = models.clip.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            out.append(_normalize(models.clip.text_projection(pooled).float()).cpu())
    return torch.cat(out)


def embed_images(paths: Sequence[Path], spec: Preprocess, encode: Callable, device: str, batch_size: int = 32,
                 desc: str = "embed") -> torch.Tensor:
    """Image files -> unit embeddings ``[N, D]`` in batches, with a progress bar on a terminal."""

    out = []
    with torch.inference_mode(), Progress(len(paths), desc, "img") as bar:
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            pixels = preprocess([open_image(p) for p in chunk], spec).to(device)
            out.append(encode(pixels).cpu())
            bar.update(len(chunk))
    return torch.cat(out)


# --------------------------------------------------------------------------- metrics


def clip_score(cos: float) -> float:
    """CLIPScore (Hessel et al. 2021): ``2.5 * max(cos, 0)``."""
    return CLIPSCORE_WEIGHT * max(cos, 0.0)


def mean_pair_cosine(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Unit ``[N, D]`` x unit ``[R, D]`` -> ``[N]``: each generated image's mean cosine over the references."""
    return (generated @ references.T).mean(dim=1)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _readable(paths: Sequence[Path], kind: str, skip_bad: bool, skipped: list) -> list[Path]:
    """Paths whose images decode; the others are an error, or with ``skip_bad`` a ``skipped`` entry."""
    good = []
    for path in paths:
        try:
            open_image(path)
        except LatexBlendError as err:
            if not skip_bad:
                raise
            skipped.append({"kind": kind, "file": str(path), "reason": str(err)})
            continue
        good.append(path)
    return good


def _usable_references(refs: dict[str, list[Path]], skip_bad: bool, skipped: list) -> dict[str, list[Path]]:
    out = {}
    for name, paths in refs.items():
        good = _readable(paths, "reference", skip_bad, skipped)
        if good:
            out[name] = good
        else:
            skipped.append({"kind": "concept", "name": name, "reason": "no readable reference images"})
    return out


def _text(img: SampleImage, policy: str) -> str:
    return img.expanded_prompt if policy == "expanded" else img.prompt


def _image_rows(images: list[SampleImage], texts: list[str], t_cos, gen_clip, gen_dino,
                ref_clip: Mapping, ref_dino: Mapping) -> list[dict]:
    """One dict per image with CLIP-T and a ``per_concept`` dict of CLIP-I / DINO."""
    rows = []
    for i, img in enumerate(images):
        cos = float(t_cos[i])
        per_concept = {}
        for name in img.concepts:
            if name in ref_clip:
                per_concept[name] = {"clip_i": float(mean_pair_cosine(gen_clip[i : i + 1], ref_clip[name])[0]),
                                     "dino": float(mean_pair_cosine(gen_dino[i : i + 1], ref_dino[name])[0]),
                                     "n_refs": int(ref_clip[name].shape[0])}
            else:
                per_concept[name] = {"clip_i": None, "dino": None, "n_refs": 0}
        rows.append({"file": img.file, "prompt_index": img.prompt_index, "seed": img.seed, "prompt": img.prompt,
                     "text": texts[i], "concepts": img.concepts, "clip_t": cos, "clipscore": clip_score(cos),
                     "per_concept": per_concept})
    return rows


def _summary(rows: Sequence[dict], pairs: Sequence[dict]) -> dict:
    """Means over image ``rows`` (CLIP-T) and over (image, concept) ``pairs`` with values (CLIP-I, DINO)."""
    scored = [p for p in pairs if p["clip_i"] is not None]
    return {"n_images": len(rows), "clip_t": _mean([r["clip_t"] for r in rows]),
            "clipscore": _mean([r["clipscore"] for r in rows]), "n_pairs": len(scored),
            "clip_i": _mean([p["clip_i"] for p in scored]), "dino": _mean([p["dino"] for p in scored])}


def aggregate(rows: Sequence[dict]) -> dict:
    """Per-concept, per-prompt and overall means of per-image rows (see module docstring)."""
    pairs = {}
    for row in rows:
        for name, vals in row["per_concept"].items():
            pairs.setdefault(name, []).append(vals)
    per_concept = {name: _summary([r for r in rows if name in r["concepts"]], pairs[name]) for name in sorted(pairs)}
    per_prompt = {}
    for index in sorted({r["prompt_index"] for r in rows}):
        group = [r for r in rows if r["prompt_index"] == index]
        summary = _summary(group, [v for r in group for v in r["per_concept"].values()])
        per_prompt[str(index)] = {"prompt": group[0]["prompt"], **summary}
    overall = _summary(rows, [v for vals in pairs.values() for v in vals])
    return {"overall": overall, "per_concept": per_concept, "per_prompt": per_prompt}


def _settings(models: Models, policy: str, batch_size: int, refs: Mapping[str, list[Path]]) -> dict:
    return {"latexblend_version": __version__, "clip_model": models.clip_id, "dino_model": models.dino_id,
            "device": models.device, "batch_size": batch_size, "text_policy": policy,
            "text_policy_note": TEXT_POLICIES[policy], "clip_text_max_tokens": 77,
            "clipscore": f"{CLIPSCORE_WEIGHT} * max(cos, 0), per image, then averaged",
            "preprocess": {"clip": {**asdict(CLIP_PREPROCESS), "interpolation": "bicubic"},
                           "dino": {**asdict(DINO_PREPROCESS), "interpolation": "bicubic"}},
            "aggregation": "per concept: mean over its (image, concept) rows; overall CLIP-I/DINO: mean over all "
                           "(image, concept) rows with references; overall CLIP-T: mean over images",
            "references": {name: {"n": len(paths), "files": [str(p) for p in paths]} for name, paths in refs.items()}}


def check_text_policy(policy: str) -> None:
    if policy not in TEXT_POLICIES:
        raise LatexBlendError(f"unknown text policy '{policy}'; choose one of {', '.join(TEXT_POLICIES)}")


def evaluate_samples(samples_dir: str | Path, models: Models, references: Mapping[str, str | Path] | None = None,
                     text_policy: str = "expanded", skip_bad: bool = False, batch_size: int = 32) -> dict:
    """Score every image of a ``generate`` output folder; returns the ``metrics.json`` content.

    Nothing is written. Unreadable images are an error, or with ``skip_bad`` listed in ``skipped``.
    """
    check_text_policy(text_policy)
    samples = read_samples(samples_dir)
    refs, skipped = resolve_references(samples, references or {})
    missing = [img for img in samples.images if not img.path.is_file()]
    if missing and not skip_bad:
        raise LatexBlendError(f"image {missing[0].path} listed in metadata.json does not exist")
    skipped += [{"kind": "image", "file": str(img.path), "reason": "file does not exist"} for img in missing]
    readable = set(_readable([img.path for img in samples.images if img not in missing], "image", skip_bad, skipped))
    images = [img for img in samples.images if img.path in readable]
    if not images:
        raise LatexBlendError(f"no readable images in {samples.folder}")
    refs = _usable_references(refs, skip_bad, skipped)
    texts = [_text(img, text_policy) for img in images]
    rows = _score(models, images, texts, refs, batch_size)
    settings = _settings(models, text_policy, batch_size, refs)
    settings["texts_truncated"] = sum(len(models.tokenizer(t).input_ids) > 77 for t in set(texts))
    return {"format": "latexblend-metrics", "format_version": 1, "samples": str(samples.folder),
            "settings": settings, **aggregate(rows), "images": rows, "skipped": skipped}


def _score(models: Models, images: list[SampleImage], texts: list[str], refs: Mapping[str, list[Path]],
           batch_size: int) -> list[dict]:
    """Embed everything once (unique paths) and build the per-image rows."""
    unique = list(dict.fromkeys([img.path for img in images] + [p for paths in refs.values() for p in paths]))
    index = {p: i for i, p in enumerate(unique)}
    clip_all = embed_images(unique, CLIP_PREPROCESS, lambda x: clip_image_embeds(models.clip, x), models.device,
                            batch_size, "CLIP images")
    dino_all = embed_images(unique, DINO_PREPROCESS, lambda x: dino_embeds(models.dino, x), models.device,
                            batch_size, "DINO images")
    gen = [index[img.path] for img in images]
    t_cos = (clip_text_embeds(models, texts, batch_size) * clip_all[gen]).sum(dim=1)
    ref_clip = {n: clip_all[[index[p] for p in paths]] for n, paths in refs.items()}
    ref_dino = {n: dino_all[[index[p] for p in paths]] for n, paths in refs.items()}
    return _image_rows(images, texts, t_cos, clip_all[gen], dino_all[gen], ref_clip, ref_dino)
