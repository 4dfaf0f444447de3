"""Training data (METHOD section 2, "Data"): the template pool, instance and prior images, augmentation.

Every random draw takes an explicit ``torch.Generator``: the training loop seeds one per step from
``(seed, step, process)``, so a resumed run sees exactly the draws an uninterrupted one would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latexblend.console import Progress
from latexblend.errors import LatexBlendError
from latexblend.fileio import atomic_path, list_images, open_image, write_text_atomic
from latexblend.settings import check_range, check_seed, load_data, read_text, safe_name
from latexblend.train.options import SHRINK

#: At most this many prior images per class (the paper uses 200), and instance images per concept (they are all
#: kept in memory while training; Custom Diffusion uses 3-20).
MAX_PRIOR = 100_000
MAX_INSTANCE_IMAGES = 1_000

#: The replace/instance template pool (METHOD section 2, step 1). Drawn independently per flow.
TEMPLATES = ("{}", "a {}", "photo of {}", "a photo of {}", "a photo of a {}", "a fancy photo of a {}",
             "A close-up, detailed photo of {}")
FIXED_TEMPLATE = "photo of {}"  # --fixed-template: both flows always use it


def template_pool(fixed: bool) -> tuple[str, ...]:
    return (FIXED_TEMPLATE,) if fixed else TEMPLATES


def _read_lines(path: Path, what: str) -> list[str]:
    text = read_text(path, what)
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prior(folder: str | Path, class_noun: str, captions: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of the prior (class) data.

    Two layouts: the release's ``images.txt`` (one path per line, relative ones against ``folder``)
    with ``caption.txt``; or a folder of images with an optional captions file (``captions`` or
    ``folder/captions.txt``, one line per image in sorted file order). Without captions every
    caption is the class noun.
    """
    folder = Path(folder)
    listing = folder / "images.txt"
    if listing.is_file():
        paths = [p if p.is_absolute() else folder / p for p in map(Path, _read_lines(listing, "prior image list"))]
        if len(paths) > MAX_PRIOR:
            raise LatexBlendError(f"{listing} lists {len(paths):,} images; at most {MAX_PRIOR:,} are accepted")
        for p in paths:
            if not p.is_file():
                raise LatexBlendError(f"{listing} lists {p}, which does not exist")
            open_image(p)
        if not paths:
            raise LatexBlendError(f"{listing} lists no images")
        captions = captions or folder / "caption.txt"
    else:
        paths = list_images(folder, "prior", limit=MAX_PRIOR)
        captions = captions or folder / "captions.txt"
    texts = [class_noun] * len(paths)
    if Path(captions).exists():
        texts = _read_lines(Path(captions), "prior captions file")
        if len(texts) != len(paths):
            raise LatexBlendError(f"{captions} has {len(texts)} captions for {len(paths)} prior images")
    elif captions not in (folder / "caption.txt", folder / "captions.txt"):
        raise LatexBlendError(f"prior captions file {captions} does not exist")
    return list(zip(paths, texts, strict=True))


# --------------------------------------------------------------------------- augmentation


@dataclass
class Sample:
    """One augmented image: ``pixels`` [3, H, W] in [-1, 1], ``mask`` [1, H/f, W/f] (latent grid, 1 where
    the loss counts), and SDXL's ``time_ids`` (original h, w, crop top, left, target h, w)."""

    pixels: torch.Tensor
    mask: torch.Tensor
    time_ids: tuple[int, int, int, int, int, int]


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive) from ``g``."""

    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _square(img: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to ``side`` (bicubic)."""

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC)


def augment(img: Image.Image, size: int, factor: int, g: torch.Generator, shrink: float = SHRINK,
            enlarge: bool = True) -> Sample:
    """Custom Diffusion's augmentation: random hflip; with probability ``shrink`` (2/3) shrink to a side
    in ``[size/3, size]`` and paste at a random place on a blank (mid-grey) canvas, the loss masked to
    the latent cells the object covers; otherwise enlarge to ``[1.2, 1.4] x size`` and random-crop (mask
    all ones), or with ``enlarge`` False keep the image at ``size`` (hflip only). ``factor`` is the VAE's
    downsampling (8)."""

    orig = (img.height, img.width)
    if draw_flip(g):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lat = size // factor
    mask = torch.zeros(1, lat, lat)
    if float(torch.rand((), generator=g)) < shrink:
        side = _randint(g, size // 3, size)
        top, left = _randint(g, 0, size - side), _randint(g, 0, size - side)
        pixels = torch.zeros(3, size, size)
        pixels[:, top : top + side, left : left + side] = _to_tensor(_square(img, side))
        r0, r1 = -(-top // factor), (top + side) // factor  # latent cells fully inside the object
        c0, c1 = -(-left // factor), (left + side) // factor
        if r1 <= r0 or c1 <= c0:  # object smaller than one cell: keep the cells it touches
            r0, r1, c0, c1 = top // factor, -(-(top + side) // factor), left // factor, -(-(left + side) // factor)
        mask[:, r0:r1, c0:c1] = 1.0
        return Sample(pixels, mask, (*orig, 0, 0, size, size))
    if not enlarge:
        return Sample(_to_tensor(_square(img, size)), mask + 1.0, (*orig, 0, 0, size, size))
    side = _randint(g, int(1.2 * size), int(1.4 * size))
    top, left = _randint(g, 0, side - size), _randint(g, 0, side - size)
    pixels = _to_tensor(_square(img, side))[:, top : top + size, left : left + size].contiguous()
    return Sample(pixels, mask + 1.0, (*orig, top, left, size, size))


def draw_flip(g: torch.Generator) -> bool:
    """A fair coin from ``g``: flip the image left-right?"""

    return float(torch.rand((), generator=g)) < 0.5


def prior_sample(img: Image.Image, size: int, factor: int, flip: bool) -> Sample:
    """A class image: centre square at ``size``, hflipped when ``flip`` (drawn with :func:`draw_flip`),
    loss everywhere."""

    orig = (img.height, img.width)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lat = size // factor
    return Sample(_to_tensor(_square(img, size)), torch.ones(1, lat, lat), (*orig, 0, 0, size, size))


# --------------------------------------------------------------------------- prior generation


def prior_dir(class_noun: str) -> Path:
    """The default prior folder of a class, ``reg_data/<class noun>`` (the noun checked to be a safe name)."""
    return Path("reg_data") / safe_name(class_noun, "class noun (the default prior folder's name; pass a folder "
                                                    "to use another)", spaces=True)


def prior_missing(out: str | Path, num: int) -> list[int]:
    """Indices of the prior images ``out/00000.png``... that do not exist yet."""
    return [i for i in range(num) if not (Path(out) / f"{i:05d}.png").is_file()]


def prior_complete(out: str | Path, num: int) -> bool:
    """All ``num`` prior images and their ``captions.txt`` are in ``out``."""
    return not prior_missing(out, num) and (Path(out) / "captions.txt").is_file()


#: The record :func:`generate_prior` keeps in its folder of the settings that make its images, so that a stopped
#: run is continued only by the same settings and images it did not make are never taken for its own.
PRIOR_RECORD = ".latexblend-prior.json"
_PRIOR_FILES = re.compile(r"\d{5,}\.png|captions\.txt|\..+\.tmp|" + re.escape(PRIOR_RECORD))


def prior_settings(class_noun: str, model: str | None, seed: int, steps: int, cfg: float,
                   resolution: int | None = None) -> dict:
    """What decides the prior images of :func:`generate_prior` (``resolution`` None: the model's own; a ``model``
    that is a folder here, as an absolute path)."""
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    return {"class_noun": class_noun, "model": model, "seed": seed, "steps": steps, "cfg": cfg,
            "resolution": resolution}


def prior_done(out: str | Path, num: int, settings: dict | None = None) -> bool:
    """All ``num`` prior images and their captions are in ``out`` (nothing to do); refused when the folder's
    record says that other ``settings`` made them."""
    if not prior_complete(out, num):
        return False
    if (Path(out) / PRIOR_RECORD).is_file():
        _check_record(Path(out), settings)
    return True


def check_prior_folder(out: str | Path, settings: dict | None = None) -> None:
    """``out`` holds nothing but what :func:`generate_prior` writes (``00000.png``..., ``captions.txt``, its
    record), so that its images are never mixed with a user's files or written over them; images already there
    were made by :func:`generate_prior` with ``settings`` (as its record says)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LatexBlendError(f"prior folder {out} is a file; choose another --out")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in names if not _PRIOR_FILES.fullmatch(n)]
    if foreign:
        raise LatexBlendError(f"prior folder {out} holds files that latexblend prior did not write (e.g. "
                              f"'{foreign[0]}'); choose an empty or new --out")
    if not any(n.endswith(".png") for n in names):
        return
    if PRIOR_RECORD not in names:
        raise LatexBlendError(f"prior folder {out} holds images with no record of what made them ({PRIOR_RECORD}): "
                              "they may be another tool's or an earlier run's; choose an empty or new --out")
    _check_record(out, settings)


def _check_record(out: Path, settings: dict | None) -> None:
    """The prior record in ``out`` names ``settings`` (a setting that is None on either side is not compared)."""
    recorded = load_data(out / PRIOR_RECORD, "prior record")
    recorded = recorded.get("settings") if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict):
        raise LatexBlendError(f"{out / PRIOR_RECORD} is not a prior record; choose an empty or new --out")
    differ = [k for k, v in (settings or {}).items() if v is not None and recorded.get(k) not in (None, v)]
    if differ:
        raise LatexBlendError(f"prior folder {out} holds images made with other settings (different "
                              f"{', '.join(differ)}); choose another --out, or delete the folder to start again")


def check_prior_request(class_noun: str, num: int, steps: int, cfg: float, seed: int = 0) -> None:
    """The arguments of :func:`generate_prior` (and the ``prior`` command, before it loads a model): ``--num`` in
    [1, 100,000], ``--steps`` in [1, 1000], ``--cfg`` in [0, 100], image i's seed ``seed + i`` in [0, 2**63 - 1]."""
    if not class_noun.strip():
        raise LatexBlendError("class noun is empty: the prior images and their captions would have no subject")
    check_range("--num", num, 1, MAX_PRIOR)
    check_range("--steps", steps, 1, 1000)
    check_range("--cfg", cfg, 0, 100)
    check_seed("--seed", seed, num)


def generate_prior(pipe, class_noun: str, num: int, out: str | Path, seed: int = 0, steps: int = 50,
                   cfg: float = 6.0, resolution: int | None = None, progress: bool = True,
                   model: str | None = None) -> tuple[int, Path]:
    """Generate ``num`` class images ``00000.png``... into ``out`` with the base model (named ``model`` in the
    folder's record, :data:`PRIOR_RECORD`).

    Image ``i`` uses seed ``seed + i``, so the set is deterministic and a stopped run resumes with the same
    settings: existing images are kept. ``captions.txt`` (the class noun per image) is written once all exist.
    Returns ``(number generated now, out)``; 0 means the set was already complete.
    """

    check_prior_request(class_noun, num, steps, cfg, seed)
    out = Path(out)
    settings = prior_settings(class_noun, model, seed, steps, cfg, resolution)
    if prior_done(out, num, settings):
        return 0, out
    check_prior_folder(out, settings)
    write_text_atomic(out / PRIOR_RECORD, json.dumps({"settings": settings}, indent=1))
    todo = prior_missing(out, num)
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    with Progress(len(todo), f"prior '{class_noun}'", "img", enabled=progress) as bar:
        for i in todo:
            g = torch.Generator("cpu").manual_seed(seed + i)
            image = pipe(class_noun, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                         generator=g).images[0]
            with atomic_path(out / f"{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
            bar.update()
    write_text_atomic(out / "captions.txt", "\n".join([class_noun] * num) + "\n")
    return len(todo), out


def draw(g: torch.Generator, options: Sequence):
    """One element of ``options`` drawn uniformly with ``g``."""
    return options[_randint(g, 0, len(options) - 1)]
