"""Typed settings for each stage, with YAML loading and one-line validation errors.

Precedence everywhere: dataclass defaults < YAML file < command-line flags (flags left unset are
``None`` and do not override).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from latexblend.errors import LatexBlendError

T = TypeVar("T")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping; clear errors for missing or malformed files."""
    import yaml

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


def merge(cls: type[T], *layers: dict[str, Any] | None, source: str = "settings") -> T:
    """Build ``cls`` from layered dicts (later wins; ``None`` values are skipped); unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in names:
                raise LatexBlendError(f"unknown {source} key '{key}' (known: {', '.join(sorted(names))})")
            if value is not None:
                values[key] = value
    try:
        obj = cls(**values)
    except TypeError as err:
        raise LatexBlendError(f"bad {source}: {err}") from err
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def to_dict(obj) -> dict[str, Any]:
    """A dataclass as JSON-ready data (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise LatexBlendError(f"{name} must be in {bounds}, got {value}")


def check_layer_spec(spec: str) -> None:
    """``all``, or comma-separated ``down`` / ``mid`` / ``up`` / inner dims / block prefixes."""
    if spec.strip() == "all":
        return
    for item in (s.strip() for s in spec.split(",")):
        if not (item in ("down", "mid", "up") or item.isdigit()
                or item.startswith(("down_blocks", "mid_block", "up_blocks"))):
            raise LatexBlendError(f"unknown guidance layer set '{item}': use all, down, mid, up, an inner dim "
                                  "(e.g. 640) or a block prefix (e.g. up_blocks.0)")


@dataclasses.dataclass
class GenerateConfig:
    """Stage 3 settings (METHOD section 4). Defaults are the paper's (Euler, 100 steps, CFG 6.0)."""

    model: str = "tiny"
    concepts: list[str] = dataclasses.field(default_factory=list)
    prompts: list[str] = dataclasses.field(default_factory=list)
    negative_prompt: str = ""
    num_images: int = 1
    batch_size: int = 4
    seed: int = 0
    steps: int = 100
    cfg: float = 6.0
    height: int | None = None
    width: int | None = None
    scheduler: str = "default"
    blend_start: float = 0.9
    bind: bool = True
    device: str | None = None
    dtype: str = "auto"
    out: str | None = None
    bank_dir: str | None = None
    grid: bool = True
    guidance: bool = False
    guidance_window: float = 0.8
    guidance_step_size: float = 1.0
    guidance_layers: str = "all"
    guidance_checkpointing: bool = False
    rectify: bool = False
    rectify_start: float = 0.8
    rectify_clusters: int = 8
    save_maps: bool = False

    def validate(self) -> None:
        if not self.prompts:
            raise LatexBlendError("no prompt given (use --prompt, --prompts-file or --config)")
        check_range("num_images", self.num_images, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("steps", self.steps, 1, 1000)
        check_range("cfg", self.cfg, 0)
        check_range("blend_start", self.blend_start, 0, 1)
        check_range("guidance_window", self.guidance_window, 0, 1)
        if not self.guidance_step_size > 0:
            raise LatexBlendError(f"guidance_step_size must be > 0, got {self.guidance_step_size}")
        check_layer_spec(self.guidance_layers)
        check_range("rectify_start", self.rectify_start, 0, 1)
        check_range("rectify_clusters", self.rectify_clusters, 2, 64)
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value <= 0 or value % 8):
                raise LatexBlendError(f"{side} must be a positive multiple of 8, got {value}")
