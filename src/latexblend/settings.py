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
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from latexblend.errors import LatexBlendError

T = TypeVar("T")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping; clear errors for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise LatexBlendError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LatexBlendError(f"{path} is not valid YAML/JSON: {first}") from err
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
        raise LatexBlendError(f"{what} takes KEY=VALUE, got '{item}'")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise LatexBlendError(f"{what} {item}: '{value}' is not a valid value ({str(err).splitlines()[0]})") from err


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
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        expected = _TYPE_WORDS.get(bases[0], bases[0])
        raise LatexBlendError(f"{what} = {shown} ({type(value).__name__}): expected {expected}")
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


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """``value`` in ``[lo, hi]`` (``None``: unbounded) and finite, else one line naming ``name``."""
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise LatexBlendError(f"{name} must be in {bounds}, got {value}")


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
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise LatexBlendError(f"{what} {shown} is not allowed: use {allowed}, starting with a letter or digit "
                              f"(at most {MAX_NAME} characters)")
    return text
