"""The output folder of ``latexblend generate`` (docs/OUTPUT_FORMAT.md): the one place that writes and
reads it.

Writing: :func:`claim_out` checks and holds the folder, :func:`save_image` writes one PNG (settings in its
text chunk), :func:`save_heatmaps` the per-concept maps beside it, :func:`write_records` one process's
records, and :func:`finish` merges them into ``metadata.json`` and draws one grid per prompt.
Reading: :func:`read_samples` (``evaluate``) and :func:`samples_complete` (``cc101``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latexblend import __version__
from latexblend.errors import LatexBlendError
from latexblend.fileio import LOCK_FILE, atomic_path, claim_folder, write_text_atomic
from latexblend.settings import MAX_SETTINGS_BYTES, load_data, safe_name, shown

FORMAT = "latexblend-samples"
FORMAT_VERSION = 1


def metadata_path(folder: str | Path) -> Path:
    """The folder's ``metadata.json``: it exists once the generation is finished."""
    return Path(folder) / "metadata.json"


# --------------------------------------------------------------------------- writing


#: Written into an output folder while a generation fills it (removed once metadata.json is written): the
#: settings of that generation, so that a re-run continues only the same one.
UNFINISHED = ".latexblend-unfinished.json"
#: Written by a process of a multi-process generation that failed, so that the others stop at their next image.
STOPPED = ".latexblend-stopped"
#: Every name a generation writes into its folder (images, maps, grids, records, its lock, temporary files).
_OURS = re.compile(r"p\d{3,}_s\d{7,}(_map_[A-Za-z0-9_.\-]+)?\.png|p\d{3,}_grid\.png|\.records-\d+\.json|"
                   r"\.write-test-\d+|\..+\.tmp|" + "|".join(map(re.escape, (LOCK_FILE, UNFINISHED, STOPPED))))


@contextlib.contextmanager
def claim_out(out: str | Path | None, rank: int = 0, settings: dict | None = None) -> Iterator[Path]:
    """Create (or accept an existing) output folder and hold it while the block runs. Refused: a folder that
    already holds a finished run, that another run is writing (the main process keeps a lock file there:
    :func:`~latexblend.fileio.claim_folder`), that holds files a generation did not write, or an unfinished
    generation of other ``settings`` (recorded in :data:`UNFINISHED`); an unfinished one of the same settings is
    continued (its files are written again). A folder created here is removed again when the block fails while
    it is still empty. Every process checks the same things, so all of them stop on a bad folder."""
    path = Path(out or f"out/generate-{time.strftime('%Y%m%d-%H%M%S')}")
    if metadata_path(path).exists():
        raise LatexBlendError(f"{path} already holds a generation (metadata.json); choose another --out")
    _check_contents(path, settings or {})
    with claim_folder(path, "generate", lock=rank == 0) as path:
        if rank:  # the main process's lock file showed that it can write there
            try:
                write_text_atomic(path / f".write-test-{rank}", "")
                (path / f".write-test-{rank}").unlink()
            except (OSError, LatexBlendError) as err:
                raise LatexBlendError(f"cannot write to output folder {path}: "
                                      f"{getattr(err, 'strerror', None) or err}") from err
            yield path
            return
        write_text_atomic(path / UNFINISHED, json.dumps({"settings": settings or {}}, indent=2))
        try:
            yield path
        except BaseException:
            if not any(path.glob("*.png")):  # nothing written yet: the record goes, so the folder can go too
                (path / UNFINISHED).unlink(missing_ok=True)
            raise


def _check_contents(path: Path, settings: dict) -> None:
    """Refuse an existing folder holding files a generation did not write, or an unfinished generation of other
    settings (see :func:`claim_out`)."""
    if not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if not _OURS.fullmatch(n)]
    if foreign:
        raise LatexBlendError(f"{path} holds files that latexblend generate did not write (e.g. '{foreign[0]}'); "
                              "choose an empty or new --out")
    images = [n for n in names if n.endswith(".png")]
    if not images:  # at most a lock, records or temporary files: nothing to mix with
        return
    try:
        recorded = load_data(path / UNFINISHED, "unfinished-generation record", MAX_SETTINGS_BYTES)["settings"]
    except (LatexBlendError, KeyError, TypeError):
        raise LatexBlendError(f"{path} holds images of an unknown generation (e.g. '{images[0]}'); choose an empty "
                              "or new --out") from None
    changed = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k)) \
        if isinstance(recorded, dict) else ["all"]
    if changed:
        raise LatexBlendError(f"{path} holds an unfinished generation of other settings (different "
                              f"{', '.join(changed)}); choose another --out, or delete the folder to start again")


def image_file(prompt_index: int, seed: int) -> str:
    """The file name of image ``seed`` of prompt ``prompt_index``."""
    return f"p{prompt_index:03d}_s{seed:07d}.png"


def make_grid(images: Sequence, cols: int | None = None):
    """PIL images of one size -> one PIL grid image."""

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image, path: Path, text: dict[str, str]) -> None:
    """Write a PIL image as PNG atomically, with ``text`` as its text chunks."""

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def save_image(out: Path, record: dict, pil, settings: dict) -> None:
    """Write ``record['file']``: the image, with the settings and its record (JSON) and the expanded prompt."""
    text = {"latexblend": json.dumps({**settings, **record}), "parameters": record["expanded_prompt"]}
    save_png(pil, out / record["file"], text)


def heatmap(values, size: tuple[int, int], under=None):
    """A ``[h, w]`` map as an RGB heatmap (black-red-yellow-white) of ``size`` (w, h), min-max scaled,
    laid half-transparent over ``under`` (a PIL image) when given."""

    v = np.asarray(values, dtype=np.float64)
    v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return Image.blend(under.convert("RGB"), img, 0.6) if under is not None else img


def save_heatmaps(out: Path, record: dict, pil, maps: dict) -> dict[str, str]:
    """Write ``<image stem>_map_<concept>.png`` per concept beside the image; returns {concept: file}."""
    files = {}
    for name, values in maps.items():
        files[name] = f"{Path(record['file']).stem}_map_{safe_name(name)}.png"
        save_png(heatmap(values, pil.size, pil), out / files[name], {"concept": name})
    return files


def write_records(out: Path, rank: int, records: list[dict]) -> None:
    """Process ``rank``'s image records, merged by :func:`finish`."""
    write_text_atomic(out / f".records-{rank}.json", json.dumps(records))


def finish(out: Path, *, model: str, prompts: Sequence[str], settings: dict, concepts: dict, grid: bool,
           world: int, elapsed: float) -> None:
    """Merge the processes' records into ``metadata.json`` and draw one grid per prompt from the PNGs."""

    images = []
    for rank in range(world):
        images += load_data(out / f".records-{rank}.json", "image records")
    images.sort(key=lambda r: (r["prompt_index"], r["seed"]))
    grids = {}
    if grid:
        for p in sorted({r["prompt_index"] for r in images}):
            pils = [Image.open(out / r["file"]).convert("RGB") for r in images if r["prompt_index"] == p]
            grids[str(p)] = f"p{p:03d}_grid.png"
            save_png(make_grid(pils), out / grids[str(p)], {"parameters": prompts[p]})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "latexblend_version": __version__,
            "model": model, "settings": settings, "concepts": concepts, "images": images, "grids": grids,
            "timings": {"total_s": round(elapsed, 3), "per_image_s": round(elapsed / max(len(images), 1), 3)}}
    write_text_atomic(metadata_path(out), json.dumps(meta, indent=2))
    for rank in range(world):
        (out / f".records-{rank}.json").unlink(missing_ok=True)
    (out / UNFINISHED).unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading


@dataclass
class SampleImage:
    file: str
    path: Path
    prompt_index: int
    prompt: str
    expanded_prompt: str
    concepts: list[str]
    seed: int | None = None


@dataclass
class Samples:
    folder: Path
    metadata: dict
    images: list[SampleImage]
    concepts: dict[str, dict] = field(default_factory=dict)


def _read_metadata(folder: Path) -> dict:
    meta_path = metadata_path(folder)
    if folder.exists() and not folder.is_dir():
        raise LatexBlendError(f"samples folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise LatexBlendError(f"samples folder {folder} does not exist")
    if not meta_path.is_file():
        raise LatexBlendError(f"{folder} has no metadata.json: not a `latexblend generate` output folder")
    meta = load_data(meta_path, "samples metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LatexBlendError(f"{meta_path} is not a latexblend-samples metadata file (format field)")
    if not isinstance(meta.get("images"), list) or not meta["images"]:
        raise LatexBlendError(f"{meta_path} lists no images")
    return meta


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing absolute paths and paths that leave ``folder``."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts or Path(relative).is_absolute():
        raise LatexBlendError(f"image path '{relative}' in {folder}/metadata.json must be relative and inside it")
    return folder / pure


def _sample_image(folder: Path, entry: Any, concepts: Mapping[str, dict]) -> SampleImage:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "prompt" not in entry:
        raise LatexBlendError(f"{folder}/metadata.json: an image entry lacks 'file' or 'prompt': {shown(entry, 80)}")
    names, index, seed = entry.get("concepts") or [], entry.get("prompt_index", 0), entry.get("seed")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LatexBlendError(f"{folder}/metadata.json: image {entry['file']}: 'concepts' must be a list of names")
    if type(index) is not int or index < 0 or not (seed is None or type(seed) is int):
        raise LatexBlendError(f"{folder}/metadata.json: image {entry['file']}: prompt_index and seed must be whole "
                              "numbers")
    unknown = [n for n in names if n not in concepts]
    if unknown:
        raise LatexBlendError(f"{folder}/metadata.json: image {entry['file']} uses concepts {unknown} "
                              "that are not in its 'concepts' section")
    return SampleImage(file=entry["file"], path=_inside(folder, entry["file"]),
                       prompt_index=index, prompt=str(entry["prompt"]),
                       expanded_prompt=str(entry.get("expanded_prompt") or entry["prompt"]), concepts=names, seed=seed)


def read_samples(folder: str | Path) -> Samples:
    """Parse ``folder/metadata.json`` (docs/OUTPUT_FORMAT.md); clear errors on a malformed folder."""
    folder = Path(folder)
    meta = _read_metadata(folder)
    concepts = meta.get("concepts") or {}
    if not isinstance(concepts, dict):
        raise LatexBlendError(f"{folder}/metadata.json: 'concepts' must be an object")
    images = [_sample_image(folder, entry, concepts) for entry in meta["images"]]
    return Samples(folder=folder, metadata=meta, images=images, concepts=concepts)


def samples_complete(folder: str | Path, num_prompts: int | None = None) -> bool:
    """True when ``folder`` holds a readable metadata.json whose image files all exist.

    With ``num_prompts``, every prompt index ``0..num_prompts-1`` must also have at least one image.
    """
    try:
        samples = read_samples(folder)
    except LatexBlendError:
        return False
    if not all(img.path.is_file() for img in samples.images):
        return False
    return num_prompts is None or {img.prompt_index for img in samples.images} >= set(range(num_prompts))
