"""Typed settings for each stage, with YAML loading and one-line validation errors.

Precedence everywhere: dataclass defaults < YAML file < command-line flags (flags left unset are
``None`` and do not override).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from latexblend.errors import LatexBlendError
from latexblend.train.data import SHRINK

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
    """Build ``cls`` from layered dicts (later wins; ``None`` values are skipped). Unknown keys, values of the
    wrong type and non-finite numbers are refused with one line; see :func:`coerce` for what is converted."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise LatexBlendError(f"unknown {source} key '{key}' (known: {', '.join(sorted(names))})")
            if value is not None:
                values[key] = coerce(value, hints[key], f"{source} {key}")
    try:
        obj = cls(**values)
    except TypeError as err:
        raise LatexBlendError(f"bad {source}: {err}") from err
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of strings"}


def coerce(value: Any, kind: Any, what: str) -> Any:
    """``value`` as the field type ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list[str]``, each maybe
    ``| None``), else one clear error naming ``what``, the value and the type expected.

    Converted: a whole-number float or a numeric string to ``int`` (``3.0``, ``"3"``); an integer or a numeric
    string to ``float`` (YAML reads ``1e-5`` as a string); one string to a one-element list
    (``prompts: "a dog"``). Refused: ``nan`` / ``inf``, a fractional ``int`` (``2.5``), a bool where a number
    is expected, a number where a string or bool is expected.
    """
    import types
    import typing

    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    options = [k for k in typing.get_args(kind) if k is not type(None)] if union else [kind]
    base = typing.get_origin(options[0]) or options[0]
    out = _convert(value, base)
    if out is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise LatexBlendError(f"{what} = {shown} ({type(value).__name__}): expected {_TYPE_WORDS.get(base, base)}")
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


def to_dict(obj) -> dict[str, Any]:
    """A dataclass as JSON-ready data (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """``value`` in ``[lo, hi]`` (``None``: unbounded) and finite, else one line naming ``name``."""
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise LatexBlendError(f"{name} must be in {bounds}, got {value}")


def check_guidance(window: float, step_size: float, layers: str) -> None:
    """The bounds of the blending-guidance options, for settings and :class:`~latexblend.guidance.GuidanceOptions`."""
    check_range("guidance_window", window, 0, 1)
    if not step_size > 0:
        raise LatexBlendError(f"guidance_step_size must be > 0, got {step_size}")
    check_layer_spec(layers)


def check_rectify(start: float, clusters: int) -> None:
    """The bounds of the rectification options, for settings and :class:`~latexblend.rectify.RectifyOptions`."""
    check_range("rectify_start", start, 0, 1)
    check_range("rectify_clusters", clusters, 2, 64)


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
        check_guidance(self.guidance_window, self.guidance_step_size, self.guidance_layers)
        check_rectify(self.rectify_start, self.rectify_clusters)
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value <= 0 or value % 8):
                raise LatexBlendError(f"{side} must be a positive multiple of 8, got {value}")


# --------------------------------------------------------------------------- training (METHOD sections 2-3)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig:
    """Stage 1 settings. Defaults are the authors' recipe (METHOD section 2): lr 1e-5 scaled by the
    batch (instance + prior), the number of processes and ``grad_accum``, AdamW, constant schedule, grad
    clip 1.0, 3000 steps on one process (1500 on two, or with ``grad_accum`` 2), seed 42, 512 px on SDXL
    (64 px on the tiny model)."""

    name: str | None = None
    images: str | None = None
    class_noun: str | None = None
    prior: str | None = None  # prior folder [default: reg_data/<class_noun>]
    prior_captions: str | None = None
    use_prior: bool = True
    model: str = "tiny"
    resolution: int | None = None  # None: min(512, the UNet's native size)
    steps: int | None = None  # None: 3000 // processes
    batch_size: int = 1  # instance images per process (and as many prior images)
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch x processes x grad_accum)
    lr: float = 1e-5
    scale_lr: bool = True
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    prior_loss_weight: float = 1.0
    crop_time_ids: bool = True  # SDXL time ids carry each image's crop; False: (size, size, 0, 0, size, size)
    augment_shrink: float = SHRINK  # share of instance samples shrunk and pasted on a blank canvas (Custom Diffusion)
    augment_enlarge: bool = True  # the other instance samples enlarged 1.2-1.4x and cropped; False: kept at full size
    seed: int = 42
    base_flow: bool = True
    fixed_template: bool = False
    token: str = "<new1>"
    init_token: str = "pll"
    kv_rank: int = 0  # > 0: LoRA of this rank on to_k/to_v instead of full weights
    gradient_checkpointing: bool = False
    compile_unet: bool = False  # torch.compile the UNet (the first step compiles)
    compile_backend: str = "inductor"  # torch.compile backend of compile_unet ("eager": graph capture only)
    cache_prior: bool = True  # keep prior images' VAE moments and captions' text features after first use
    use_8bit_adam: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU
    checkpoint_every: int = 500  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2  # the newest K checkpoints are kept, older ones deleted (0: keep all)
    log_every: int = 10
    log_tensorboard: bool = False
    peak_tflops: float | None = None  # the device's peak TFLOP/s for MFU [default: known GPUs' datasheet bf16]
    runs_dir: str = "runs"
    bank_dir: str | None = None  # [default: $LATEXBLEND_BANK or ./concept_bank]
    extract_prompt: str = "photo of {token} {noun}"
    bank_dtype: str = "auto"  # auto: fp16 on CUDA, else the compute dtype
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False

    def validate(self) -> None:
        from latexblend.bank.format import check_name

        for key in ("name", "images", "class_noun"):
            if not getattr(self, key):
                raise LatexBlendError(f"no {key.replace('_', ' ')} given (use --concept, or --images, "
                                      f"--class-noun and --name)")
        check_name(self.name)
        if not str(self.class_noun).strip():
            raise LatexBlendError("class noun is empty")
        if self.token in self.class_noun:
            raise LatexBlendError(f"class noun '{self.class_noun}' holds the identifier {self.token}: the class noun "
                                  f"names the class (e.g. dog), the identifier is added in front of it")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise LatexBlendError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.steps is not None:
            check_range("steps", self.steps, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("grad_accum", self.grad_accum, 1, 1024)
        if self.peak_tflops is not None:
            check_range("peak_tflops", self.peak_tflops, 1e-6)
        check_range("lr", self.lr, 0)
        check_range("kv_rank", self.kv_rank, 0)
        check_range("checkpoint_every", self.checkpoint_every, 0)
        check_range("keep_checkpoints", self.keep_checkpoints, 0)
        check_range("log_every", self.log_every, 1)
        check_range("prior_loss_weight", self.prior_loss_weight, 0)
        check_range("augment_shrink", self.augment_shrink, 0, 1)
        check_range("max_grad_norm", self.max_grad_norm, 0)
        if self.mixed_precision not in MIXED_PRECISION:
            raise LatexBlendError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if "{token}" not in self.extract_prompt or "{noun}" not in self.extract_prompt:
            raise LatexBlendError("extract_prompt must contain {token} and {noun}")


def concept_settings(name: str, concepts_dir: str | Path = "configs/concepts") -> dict[str, Any]:
    """The settings in ``<concepts_dir>/<name>.yaml`` (``name`` defaults to the file's stem)."""
    path = Path(concepts_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path(concepts_dir).glob("*.yaml"))) or "none"
        raise LatexBlendError(f"unknown concept '{name}': no {path} (concepts there: {known})")
    data = load_mapping(path)
    data.setdefault("name", path.stem)
    return data


def farm_concept(concepts_dir: str | Path, index: int) -> str:
    """The ``index``-th concept (0-based) of ``concepts_dir``, its ``*.yaml`` files in sorted order."""
    names = sorted(p.stem for p in Path(concepts_dir).glob("*.yaml"))
    if not names:
        raise LatexBlendError(f"no concept files (*.yaml) in {concepts_dir}")
    if not 0 <= index < len(names):
        raise LatexBlendError(f"--index {index} is out of range: {concepts_dir} holds {len(names)} concepts "
                              f"(0-{len(names) - 1})")
    return names[index]


def farm_index(index: int | None, concept: str | None, images: str | None) -> int | None:
    """The farm index: ``index``, else ``$SLURM_ARRAY_TASK_ID`` when no concept is named; never together
    with a named concept or images."""
    import os

    if index is None and concept is None and images is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        try:
            index = int(os.environ["SLURM_ARRAY_TASK_ID"])
        except ValueError as err:
            task = os.environ["SLURM_ARRAY_TASK_ID"]
            raise LatexBlendError(f"SLURM_ARRAY_TASK_ID is not an integer: {task}") from err
    if index is not None and (concept or images):
        raise LatexBlendError("--index picks a concept from --concepts-dir; do not combine it with --concept/--images")
    return index


def finished_bank(cfg: TrainConfig) -> Path | None:
    """The concept's bank when it already loads and checks (a farm re-run skips it), else ``None``."""
    from latexblend.bank.format import bank_complete, bank_file

    path = bank_file(cfg.name, cfg.bank_dir)
    return path if bank_complete(path) else None


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompts file: one per line, blank lines and ``#`` lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror or err
        raise LatexBlendError(f"cannot read prompts file {path}: {reason}") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LatexBlendError(f"prompts file {path} has no prompts")
    return prompts


def key_value(item: str, what: str = "--set") -> tuple[str, Any]:
    """``"lr=1e-4"`` -> ``("lr", value read as YAML)``; no ``=``, no key or bad YAML is one error line
    naming ``what``."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LatexBlendError(f"{what} takes KEY=VALUE, got '{item}'")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise LatexBlendError(f"{what} {item}: '{value}' is not a valid value ({str(err).splitlines()[0]})") from err


def train_settings(concept: str | None, concepts_dir: str | Path, flags: dict[str, Any],
                   sets: list[str] | None = None) -> TrainConfig:
    """Defaults < ``<concepts_dir>/<concept>.yaml`` < ``--set key=value`` < explicit flags."""
    layers: list[dict[str, Any]] = [concept_settings(concept, concepts_dir) if concept else {}]
    extra = dict(key_value(item) for item in sets or [])
    model = next((layer["model"] for layer in (flags, extra, *layers[::-1]) if layer.get("model")), TrainConfig.model)
    return merge(TrainConfig, model_recipe(model), *layers, extra, flags, source="training setting")


#: Training defaults per base model, between the dataclass defaults and YAML/flags. ``sdxl`` keeps the
#: authors' recipe (the dataclass defaults); ``toy``'s was measured with ``latexblend bench fidelity``.
TRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "toy": {"steps": 1500, "lr": 3e-4, "augment_shrink": 0.0, "augment_enlarge": False}}


def model_recipe(model: str) -> dict[str, Any]:
    """The training defaults of ``model`` (a registry name; other models get none)."""
    return dict(TRAIN_RECIPES.get(str(model), {}))
