"""Files: atomic writes (a reader sees the old file or the complete new one, never half of one), safe names,
folders held by one run (lock files), and reading user images."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
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
    except (PermissionError, OverflowError, ValueError):  # alive, owned by someone else (or not a pid we can ask)
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, as the kernel counts it (``/proc/<pid>/stat`` field 22, clock ticks since
    boot): with the pid it names one process, also after the pid is reused. ``None`` where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _lock_record() -> dict:
    """What a lock file holds: our pid, host, the time we took it and our process start (see _lock_owner)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _read_lock(lock: Path) -> dict | None:
    """The record in ``lock`` (older versions wrote only the pid: read as a lock of this host), ``None`` when it
    is gone; a lock that is not a small regular file of ours is one error line saying to remove it."""
    try:
        if not lock.is_file() or lock.stat().st_size > 4096:
            raise LatexBlendError(f"{lock} is not a latexblend lock file; remove it if no run uses {lock.parent}")
        text = lock.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):  # an older version's lock: the pid alone
        record = {"pid": text.split()[0]} if text.split() else {}
    if not str(record.get("pid", "")).isdigit():
        raise LatexBlendError(f"{lock} is not a latexblend lock file (it holds no pid); delete it if no run is "
                              f"writing into {lock.parent}")
    return {**record, "pid": int(record["pid"])}


def _stale(record: dict) -> bool:
    """Has the run that wrote ``record`` ended? Only a lock of this host can tell: its process is gone, or its pid
    now belongs to a process started at another time (a reused pid)."""
    if record.get("host", socket.gethostname()) != socket.gethostname():
        return False  # another machine (a shared file system): we cannot see its processes
    if not _pid_alive(record["pid"]):
        return True
    recorded, now = record.get("process_start"), _process_start(record["pid"])
    return recorded is not None and now is not None and recorded != now


def _in_use(lock: Path, record: dict, what: str) -> LatexBlendError:
    host = record.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    since = f", since {record['started']}" if record.get("started") else ""
    return LatexBlendError(f"{lock.parent} is in use by another {what} (pid {record['pid']}{where}{since}); wait for "
                           f"it to finish or choose another folder; if no such run is active, delete {lock}")


def _create_exclusive(tmp: Path, lock: Path) -> None:
    """``lock`` with ``tmp``'s content, created only if it does not exist (``FileExistsError`` otherwise): a hard
    link, so the content is in place when the name appears; where a file system has no hard links, an
    ``O_EXCL`` create and write."""
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text(encoding="utf-8"))


def _take_lock(lock: Path, what: str) -> None:
    """Create ``lock`` holding our record, atomically (a reader sees no lock or a whole one); a lock left by a
    run that has ended on this host is taken over (see :func:`_stale`)."""
    for _ in range(3):
        tmp = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(_lock_record()) + "\n", encoding="utf-8")
            _create_exclusive(tmp, lock)
            return
        except FileExistsError:
            record = _read_lock(lock)
            if record is not None and record["pid"] != os.getpid() and not _stale(record):
                raise _in_use(lock, record, what) from None
            lock.unlink(missing_ok=True)  # stale: its process has ended
        except OSError as err:
            raise LatexBlendError(f"cannot write to output folder {lock.parent}: {err.strerror or err}") from err
        finally:
            tmp.unlink(missing_ok=True)
    raise LatexBlendError(f"cannot lock {lock.parent}: its lock file keeps reappearing")  # pragma: no cover


@contextlib.contextmanager
def claim_folder(path: str | Path, what: str = "run", lock: bool = True) -> Iterator[Path]:
    """Create ``path`` if needed and hold it for one writer (a lock file with our pid, host and start time,
    removed on exit; a lock left by a process of this host that has ended is taken over, one of another host
    never). If the block fails, the folders created here
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
        record = _read_lock(lock)
    except LatexBlendError:
        return
    if record is not None and record["pid"] == os.getpid() and record.get("host", socket.gethostname()) == \
            socket.gethostname():
        lock.unlink(missing_ok=True)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Text files allowed beside images (prior captions, the release's list files).
SIDE_FILES = ("captions.txt", "caption.txt", "images.txt")


# --------------------------------------------------------------------------- reading images


def open_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; a corrupt file, or one too large to decode safely
    (a decompression bomb: over ``PIL.Image.MAX_IMAGE_PIXELS``), is one clear error naming it. 16-bit and
    32-bit greyscale images are scaled to 8 bits (PIL's plain ``convert`` would clip them to white)."""
    if not Path(path).is_file():  # a pipe would block the read, a device never end it
        what = "does not exist" if not Path(path).exists() else "is not a regular file"
        raise LatexBlendError(f"image {path} {what}")
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


def list_images(folder: str | Path, what: str = "image", strict: bool = True, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (by suffix, hidden files left out) in sorted order.

    Refused with one line: a missing folder, a folder without images, more than ``limit`` images (before any is
    opened). ``strict`` (training data): also an image that does not decode and a file that is not an image
    (other than the caption/list files in :data:`SIDE_FILES`). Not strict (evaluation references): other files
    are ignored and images are not opened, so that the caller can report or skip each unreadable one.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LatexBlendError(f"{what} folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise LatexBlendError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if limit is not None and len(images) > limit:  # before any is opened
        raise LatexBlendError(f"{what} folder {folder} holds {len(images):,} images; at most {limit:,} are "
                              "accepted")
    for path in files if strict else ():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            open_image(path)
        elif path.name not in SIDE_FILES:
            raise LatexBlendError(f"{path} is not an image (expected {', '.join(IMAGE_SUFFIXES)}); move it out of "
                                  f"the {what} folder")
    if not images:
        raise LatexBlendError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images
