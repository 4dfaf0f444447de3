"""Typed settings: dataclasses built from layered mappings, with one-line errors.

Every stage keeps its options in a dataclass that validates itself when it is built
(:class:`~latexblend.train.options.TrainConfig`, :class:`~latexblend.blend.options.GenerateConfig` and the
options it nests). This module is what they share: :func:`merge` builds one from layers of flat
``key: value`` mappings (defaults < YAML < ``--set`` < flags), :func:`coerce` checks each value against its
field's type, :func:`check_range` is the range check every option uses, :func:`load_mapping` reads a YAML or
JSON file and :func:`key_value` a ``KEY=VALUE`` argument. No torch here: the command line reads these
modules for ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import stat
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from latexblend.errors import LatexBlendError

T = TypeVar("T")


#: Limits of every YAML/JSON document and text file the tool reads (:func:`read_text`, :func:`parse_yaml`,
#: :func:`parse_json`): a settings file (configs, concept YAML, the release inference JSON, a run's config.yaml,
#: a checkpoint's state.json) at most 1 MiB, a data file (an output folder's metadata.json, cc101 dataset, jobs
#: and metrics files) at most 256 MiB, a text file (prompts, captions) at most 16 MiB; every document at most 64
#: levels deep, and a YAML document at most 100,000 values once its aliases are expanded (so an alias bomb is
#: refused before anything walks it; JSON has no aliases: its size bounds its values).
MAX_SETTINGS_BYTES = 1 << 20
MAX_DATA_BYTES = 256 << 20
MAX_TEXT_BYTES = 16 << 20
MAX_DEPTH = 64
MAX_VALUES = 100_000


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, read only when it is a regular file of at most ``max_bytes`` bytes; one line
    naming ``what`` and the path otherwise (missing, a directory, a device or pipe, too large, not UTF-8)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LatexBlendError(f"{what} {path} not found") from None
    except OSError as err:
        raise LatexBlendError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise LatexBlendError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise LatexBlendError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    if info.st_size > max_bytes:
        raise LatexBlendError(f"{what} {path} is too large ({info.st_size:,} bytes; at most {max_bytes:,})")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise LatexBlendError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise LatexBlendError(f"{what} {path} is too large (over {max_bytes:,} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LatexBlendError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


class _TooBig(Exception):
    """A document over :data:`MAX_DEPTH` or :data:`MAX_VALUES` (turned into one line by the caller)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than :data:`MAX_DEPTH` while it composes them
    (its composer recurses once per level: a deep document would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooBig(f"nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_size(data: Any, max_values: int | None = MAX_VALUES) -> Any:
    """``data``, once it nests at most :data:`MAX_DEPTH` deep and its values, counted as if every shared (aliased)
    part were written out, are at most ``max_values`` (``None``: any number); a part that contains itself is
    refused too. Linear in the document: each shared part is counted once and its count reused."""
    counts: dict[int, int] = {}
    open_parts: set[int] = set()

    def count(obj: Any, depth: int) -> int:
        if not isinstance(obj, dict | list | tuple | set | frozenset):
            return 1
        if depth >= MAX_DEPTH:  # depth 0 is the first level
            raise _TooBig(f"nests deeper than {MAX_DEPTH} levels")
        key = id(obj)
        if key in counts:
            return counts[key]
        if key in open_parts:
            raise _TooBig("holds a value that contains itself")
        open_parts.add(key)
        items = [x for pair in obj.items() for x in pair] if isinstance(obj, dict) else obj
        total = 1
        for item in items:
            total += count(item, depth + 1)
            if max_values is not None and total > max_values:
                raise _TooBig(f"holds more than {max_values:,} values (aliases expanded)")
        open_parts.discard(key)
        counts[key] = total
        return total

    count(data, 0)
    return data


def parse_yaml(text: str, what: str) -> Any:
    """``text`` read as YAML (JSON is YAML too), within :data:`MAX_DEPTH` and :data:`MAX_VALUES`; every failure
    is one line naming ``what``."""
    try:
        return _check_size(yaml.load(text, Loader=_BoundedLoader))  # noqa: S506 - a SafeLoader subclass
    except _TooBig as err:
        raise LatexBlendError(f"{what} is refused: it {err}") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LatexBlendError(f"{what} is not valid YAML/JSON: {first}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of more digits than Python converts
        raise LatexBlendError(f"{what} is not valid YAML/JSON: {str(err)[:100] or type(err).__name__}") from None


def parse_json(text: str, what: str) -> Any:
    """``text`` read as JSON, at most :data:`MAX_DEPTH` deep; every failure is one line naming ``what``."""
    try:
        return _check_size(json.loads(text), max_values=None)
    except _TooBig as err:
        raise LatexBlendError(f"{what} is refused: it {err}") from None
    except RecursionError:
        raise LatexBlendError(f"{what} is refused: it nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more digits than Python converts
        raise LatexBlendError(f"{what} is not valid JSON: {str(err)[:100]}") from None


def load_data(path: str | Path, what: str, max_bytes: int = MAX_DATA_BYTES, kind: str = "json") -> Any:
    """The JSON (``kind="json"``) or YAML document in ``path``, read with the limits above."""
    text = read_text(path, what, max_bytes)
    return (parse_json if kind == "json" else parse_yaml)(text, f"{what} {path}")


def load_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML or JSON settings file holding one mapping (at most :data:`MAX_SETTINGS_BYTES`); clear errors for
    missing, special, oversized or malformed files."""
    path = Path(path)
    data = parse_yaml(read_text(path, what, MAX_SETTINGS_BYTES), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LatexBlendError(f"{path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def key_value(item: str, what: str = "--set") -> tuple[str, Any]:
    """``"lr=1e-4"`` -> ``("lr", value read as YAML)``; no ``=``, no key or bad YAML is one error line
    naming ``what``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LatexBlendError(f"{what} takes KEY=VALUE, got '{shown(item)[1:-1]}'")
    try:
        return key.strip(), parse_yaml(value, f"{what} {key.strip()}")
    except LatexBlendError as err:
        raise LatexBlendError(f"{what} {shown(item)[1:-1]}: {shown(value)} is not a valid value "
                              f"({str(err).split(': ', 1)[-1]})") from None


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)`` for a message, at most ``width`` characters, without building the whole repr of a
    large value."""
    text = _REPR.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def flat_keys(cls: type) -> dict[str, tuple[str, str | None]]:
    """The flat settings keys of ``cls``: each plain field by its name (``(name, None)``), and the keys its
    ``FLAT_KEYS`` class attribute maps into nested option dataclasses (``"guidance_window": ("guidance",
    "window")``; ``(field, None)`` for a nested field is its on/off switch)."""
    keys = {f.name: (f.name, None) for f in dataclasses.fields(cls) if f.name not in _nested(cls)}
    return keys | dict(getattr(cls, "FLAT_KEYS", {}))


def _nested(cls: type) -> dict[str, type]:
    """Fields of ``cls`` holding an option dataclass (maybe ``| None``), with that class."""
    out = {}
    for name, kind in typing.get_type_hints(cls).items():
        options = [k for k in typing.get_args(kind) if k is not type(None)] if _is_union(kind) else [kind]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            out[name] = options[0]
    return out


def _key_type(cls: type, key: tuple[str, str | None]) -> Any:
    field, sub = key
    nested = _nested(cls)
    if field in nested:
        return bool if sub is None else typing.get_type_hints(nested[field])[sub]
    return typing.get_type_hints(cls)[field]


def merge(cls: type[T], *layers: dict[str, Any] | None, source: str = "settings") -> T:
    """Build ``cls`` from layered flat mappings (later wins; ``None`` values are skipped). Keys are those of
    :func:`flat_keys` (``-`` read as ``_``); unknown keys, values of the wrong type and non-finite numbers are
    refused with one line (:func:`coerce` says what is converted). The dataclasses validate themselves
    when built (their ``__post_init__``)."""
    known = flat_keys(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = str(key).replace("-", "_")
            if key not in known:
                raise LatexBlendError(f"unknown {source} key '{key}' (known: {', '.join(sorted(known))})")
            if value is not None:
                values[key] = coerce(value, _key_type(cls, known[key]), f"{source} {key}")
    return build(cls, values)


def build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from checked flat ``values`` (see :func:`flat_keys`): a nested option dataclass is built from its
    keys (so a bad value is refused even while its switch is off); an optional one is kept only when its
    switch is on (it is ``None`` otherwise)."""
    known, nested = flat_keys(cls), _nested(cls)
    top = {known[k][0]: v for k, v in values.items() if known[k][0] not in nested}
    for field, sub_cls in nested.items():
        subs = {known[k][1]: v for k, v in values.items() if known[k][0] == field and known[k][1] is not None}
        optional = _is_union(typing.get_type_hints(cls)[field])
        if subs or not optional or values.get(field):
            options = _construct(sub_cls, subs)
            if not optional or values.get(field):
                top[field] = options
    return _construct(cls, top)


def _construct(cls: type[T], values: dict[str, Any]) -> T:
    try:
        return cls(**values)
    except TypeError as err:
        raise LatexBlendError(f"bad {cls.__name__}: {err}") from err


def flat(obj) -> dict[str, Any]:
    """A settings dataclass as its flat ``key: value`` mapping (the inverse of :func:`merge`; an optional nested
    option that is off shows its switch ``False`` and its class's defaults), JSON-ready (paths as strings)."""
    cls = type(obj)
    out = {}
    for key, (field, sub) in flat_keys(cls).items():
        value = getattr(obj, field)
        if field in _nested(cls):
            if sub is None:
                value = value is not None
            else:
                value = getattr(value if value is not None else _nested(cls)[field](), sub)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def to_dict(obj) -> dict[str, Any]:
    """A dataclass as JSON-ready nested data (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of strings"}


def coerce(value: Any, kind: Any, what: str) -> Any:
    """``value`` as the field type ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list[str]``, each maybe
    ``| None``; ``bool | str`` takes either), else one clear error naming ``what``, the value and the type
    expected.

    Converted: a whole-number float or a numeric string to ``int`` (``3.0``, ``"3"``); an integer or a numeric
    string to ``float`` (YAML reads ``1e-5`` as a string); one string to a one-element list
    (``prompts: "a dog"``). Refused: ``nan`` / ``inf``, a fractional ``int`` (``2.5``), a bool where a number
    is expected, a number where a string or bool is expected.
    """
    options = [k for k in typing.get_args(kind) if k is not type(None)] if _is_union(kind) else [kind]
    bases = [typing.get_origin(o) or o for o in options]
    out = None
    for base in bases:
        out = _convert(value, base)
        if out is not None:
            break
    if out is None:
        expected = _TYPE_WORDS.get(bases[0], bases[0])
        raise LatexBlendError(f"{what} = {shown(value)} ({type(value).__name__}): expected {expected}")
    if isinstance(out, float) and not math.isfinite(out):
        raise LatexBlendError(f"{what} = {value!r}: expected a finite number")
    return out


def _convert(value: Any, base: type) -> Any:
    """``value`` converted to ``base``, or ``None`` when it cannot be (see :func:`coerce`)."""
    if isinstance(value, bool) or base is bool:
        return value if isinstance(value, bool) and base is bool else None
    if base is str:
        return value if isinstance(value, str) else None
    if base is list:
        items = [value] if isinstance(value, str) else value
        return list(items) if isinstance(items, list | tuple) and all(isinstance(i, str) for i in items) else None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    if base is float:
        return float(value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None if math.isfinite(value) else value
    return int(value)


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                open_lo: bool = False, open_hi: bool = False) -> None:
    """``value`` in ``[lo, hi]`` (``open_lo`` / ``open_hi``: that end excluded; ``None``: unbounded) and finite,
    else one line naming ``name``. Integers are compared exactly (a seed of 2**70 is never made a float)."""
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = bad or (lo is not None and (value <= lo if open_lo else value < lo))
    bad = bad or (hi is not None and (value >= hi if open_hi else value > hi))
    if bad:
        bounds = f"{'(' if open_lo else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}" \
                 f"{')' if open_hi else ']'}"
        raise LatexBlendError(f"{name} must be in {bounds}, got {shown(value)}")


#: The largest seed: every seed is a signed 64-bit integer, which every torch generator takes.
MAX_SEED = 2**63 - 1


def check_seed(name: str, seed: int, count: int = 1, what: str = "image") -> None:
    """``seed`` and the ``count - 1`` seeds after it (``seed + j`` for ``what`` ``j``) in ``[0, MAX_SEED]``."""
    check_range(name, seed, 0, MAX_SEED)
    if seed + count - 1 > MAX_SEED:
        raise LatexBlendError(f"{name} {seed} is too large for {count:,} {what}s ({what} j uses {name} + j): at "
                              f"most {MAX_SEED - count + 1}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SAFE_WITH_SPACES = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*")
MAX_NAME = 100


def safe_name(name: object, what: str = "concept name", spaces: bool = False) -> str:
    """``name`` if it is safe as one file or folder name, else one clear error.

    Every name that becomes part of a path (concept and bank names, also when read from a bank's metadata
    or a YAML file; class nouns used as prior folders with ``spaces=True``) goes through here: letters,
    digits, ``_``, ``-``, ``.`` (and spaces when allowed), starting with a letter or digit, at most
    :data:`MAX_NAME` characters. So no name can hold a separator, ``..`` as a whole, or start a hidden file.
    """
    pattern = _SAFE_WITH_SPACES if spaces else _SAFE_NAME
    text = name if isinstance(name, str) else ""
    if not pattern.fullmatch(text) or len(text) > MAX_NAME or text != text.strip():
        allowed = "letters, digits, spaces, '_', '-' and '.'" if spaces else "letters, digits, '_', '-' and '.'"
        raise LatexBlendError(f"{what} {shown(name)} is not allowed: use {allowed}, starting with a letter or digit "
                              f"(at most {MAX_NAME} characters)")
    return text
