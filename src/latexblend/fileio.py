"""Files: atomic writes (a reader sees the old file or the complete new one, never half of one), safe names,
folders held by one run (lock files), and reading user images."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file

from latexblend.errors import LatexBlendError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise LatexBlendError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        try:
            os.replace(tmp_path, path)
        except OSError as err:  # e.g. a folder of that name
            reason = "it is a folder" if path.is_dir() else err.strerror or err
            raise LatexBlendError(f"cannot write {path}: {reason}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """``path`` if it is a folder this process can write in, or one it can create (its nearest existing parent
    is a writable folder); one line naming ``what`` otherwise. Nothing is created: the check runs before work."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: creating the folder would fail
            raise LatexBlendError(f"{what} {path}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise LatexBlendError(f"{what} {path} is not a folder{where}; choose another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LatexBlendError(f"{what} {path}: cannot write in {existing} (permission denied)")
    return path

# --------------------------------------------------------------------------- reproducible safetensors


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` atomically, with the metadata keys in sorted order.

    safetensors writes its metadata map in hash order, which changes from one call to the next; the
    header is rewritten sorted (same length, so in place) so that identical inputs give identical bytes.
    """

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header(tmp)
    return Path(path)


def read_safetensors(path: str | Path, what: str = "file", tensors: bool = True) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (``tensors=False``: only the metadata, ``{}`` for the
    tensors); one line naming ``what`` for a missing, special, corrupt or truncated file."""
    path = Path(path)
    if not path.is_file():
        reason = "not found" if not path.exists() else "is not a regular file"
        raise LatexBlendError(f"{what} {path} {reason}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except Exception as err:  # safetensors' errors (header, offsets, dtype) all mean the same to a user
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise LatexBlendError(f"{path} is not a readable safetensors file (corrupt or truncated): {first}") from None
    return out, meta


def _sort_header(path: Path) -> None:
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # pragma: no cover - safetensors' JSON is never shorter than ours
            raise LatexBlendError(f"cannot normalise the header of {path}")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


# --------------------------------------------------------------------------- one writer per output folder

LOCK_FILE = ".latexblend.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _take_lock(lock: Path, what: str) -> None:
    """Create ``lock`` holding our pid (``O_EXCL``); a lock whose process is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise LatexBlendError(f"{lock.parent} is in use by another {what} (pid {pid}); wait for it to "
                                      f"finish or choose another folder") from None
            lock.unlink(missing_ok=True)  # stale: its process has ended
            continue
        except OSError as err:
            raise LatexBlendError(f"cannot write to output folder {lock.parent}: {err.strerror or err}") from err
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise LatexBlendError(f"cannot lock {lock.parent}: its lock file keeps reappearing")  # pragma: no cover


@contextlib.contextmanager
def claim_folder(path: str | Path, what: str = "run", lock: bool = True) -> Iterator[Path]:
    """Create ``path`` if needed and hold it for one writer (a lock file with our pid, removed on exit;
    a lock left by a process that has died is taken over). If the block fails, the folders created here
    (``path`` and any missing parents) are removed again while empty: a refused run leaves nothing behind."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LatexBlendError(f"cannot write to output folder {path}: {err.strerror or err}") from err
    lock_path = path / LOCK_FILE
    try:
        if lock:
            _take_lock(lock_path, what)
        try:
            yield path
        finally:
            if lock:
                _release(lock_path)
    except BaseException:
        for folder in created:  # what this call created, while it is still empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _release(lock: Path) -> None:
    try:
        if int(lock.read_text().split()[0]) == os.getpid():
            lock.unlink()
    except (OSError, ValueError, IndexError):
        pass


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Text files allowed beside images (prior captions, the release's list files).
SIDE_FILES = ("captions.txt", "caption.txt", "images.txt")


# --------------------------------------------------------------------------- reading images


def open_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; a corrupt file, or one too large to decode safely
    (a decompression bomb: over ``PIL.Image.MAX_IMAGE_PIXELS``), is one clear error naming it. 16-bit and
    32-bit greyscale images are scaled to 8 bits (PIL's plain ``convert`` would clip them to white)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_8bit(img).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise LatexBlendError(f"{path} is refused: too many pixels to decode safely (a decompression bomb?); "
                              f"{Image.MAX_IMAGE_PIXELS:,} pixels at most") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise LatexBlendError(f"{path} is not a readable image ({type(err).__name__}): remove or replace it") from err


def _to_8bit(img: Image.Image) -> Image.Image:
    """Greyscale images of more than 8 bits (modes ``I;16*``, ``I``, ``F``) as mode ``L``: 16-bit values
    are divided by 257 (65535 -> 255); ``I``/``F`` images holding only 0..255 are kept as they are."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def list_images(folder: str | Path, what: str = "image", strict: bool = True) -> list[Path]:
    """The image files of ``folder`` (by suffix, hidden files left out) in sorted order.

    Refused with one line: a missing folder, a folder without images. ``strict`` (training data): also
    an image that does not decode and a file that is not an image (other than the caption/list files in
    :data:`SIDE_FILES`). Not strict (evaluation references): other files are ignored and images are not
    opened, so that the caller can report or skip each unreadable one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LatexBlendError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for path in files if strict else ():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            open_image(path)
        elif path.name not in SIDE_FILES:
            raise LatexBlendError(f"{path} is not an image (expected {', '.join(IMAGE_SUFFIXES)}); move it out of "
                                  f"the {what} folder")
    if not images:
        raise LatexBlendError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images
