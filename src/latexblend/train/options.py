"""Stage 1's options: :class:`TrainConfig`, validated when it is built, and the training defaults of each base
model (:data:`RECIPES`), which sit between the dataclass defaults and a user's YAML and flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from latexblend.errors import LatexBlendError
from latexblend.settings import check_range, check_seed, safe_name, shown

SHRINK = 2 / 3  # Custom Diffusion's share of shrink-and-paste augmentations

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CUDA_GRAPH = ("auto", "on", "off")


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
    steps: int | None = None  # None: 3000 // (processes x grad_accum)
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
    cuda_graph: bool | str = "auto"  # each step as one CUDA graph: auto (on CUDA when it can), on/true, off/false
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

    def __post_init__(self) -> None:
        self._check_text()
        self._check_numbers()

    def _check_text(self) -> None:
        for key in ("name", "images", "class_noun"):
            if not getattr(self, key):
                raise LatexBlendError(f"no {key.replace('_', ' ')} given (use --concept, or --images, "
                                      f"--class-noun and --name)")
        safe_name(self.name, "concept name")
        if not str(self.class_noun).strip():
            raise LatexBlendError("class noun is empty")
        if not self.token or any(c.isspace() for c in self.token):
            raise LatexBlendError(f"token must be one word without spaces, got {shown(self.token)}")
        if self.token in self.class_noun:
            raise LatexBlendError(f"class noun '{self.class_noun}' holds the identifier {self.token}: the class noun "
                                  f"names the class (e.g. dog), the identifier is added in front of it")
        if isinstance(self.cuda_graph, bool):  # YAML and --set read on/off as booleans
            self.cuda_graph = "on" if self.cuda_graph else "off"
        if self.cuda_graph not in CUDA_GRAPH:
            raise LatexBlendError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH)}, got {shown(self.cuda_graph)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise LatexBlendError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.bank_dtype not in BANK_DTYPES:
            raise LatexBlendError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {shown(self.bank_dtype)}")
        if "{token}" not in self.extract_prompt or "{noun}" not in self.extract_prompt:
            raise LatexBlendError("extract_prompt must contain {token} and {noun}")
        try:
            self.extract_prompt.format(token=self.token, noun=self.class_noun)
        except (KeyError, IndexError, ValueError) as err:
            raise LatexBlendError(f"extract_prompt {shown(self.extract_prompt)} may hold only the fields {{token}} "
                                  f"and {{noun}} (write {{{{ and }}}} for braces): {type(err).__name__} {err}") \
                from None

    def _check_numbers(self) -> None:
        """Each number in its documented range (:data:`RANGES`)."""
        if self.resolution is not None and (self.resolution % 8 or not 8 <= self.resolution <= MAX_RESOLUTION):
            raise LatexBlendError(f"resolution must be a multiple of 8 in [8, {MAX_RESOLUTION}], got "
                                  f"{self.resolution}")
        if self.steps is not None:
            check_range("steps", self.steps, 1, MAX_STEPS)
        if self.peak_tflops is not None:
            check_range("peak_tflops", self.peak_tflops, 0, 1e6, open_lo=True)
        for key, (lo, hi, open_lo, open_hi) in RANGES.items():
            check_range(key, getattr(self, key), lo, hi, open_lo=open_lo, open_hi=open_hi)
        check_seed("seed", self.seed)


MAX_STEPS = 1_000_000
MAX_RESOLUTION = 4096
#: The documented range of every other number of :class:`TrainConfig`: ``key: (lo, hi, lo excluded, hi
#: excluded)``. ``steps`` is in [1, 1,000,000], ``resolution`` a multiple of 8 in [8, 4096], ``peak_tflops``
#: in (0, 1e6] and ``seed`` in [0, 2**63 - 1].
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "batch_size": (1, 1024, False, False),
    "grad_accum": (1, 1024, False, False),
    "lr": (0, 1, False, False),
    "weight_decay": (0, 100, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_eps": (0, 1, True, False),
    "max_grad_norm": (0, 1e6, False, False),
    "prior_loss_weight": (0, 1e3, False, False),
    "augment_shrink": (0, 1, False, False),
    "kv_rank": (0, 4096, False, False),
    "checkpoint_every": (0, MAX_STEPS, False, False),
    "keep_checkpoints": (0, 1_000_000, False, False),
    "log_every": (1, MAX_STEPS, False, False),
}

#: What ``bank_dtype`` takes (``auto``: fp16 on CUDA, else the compute dtype).
BANK_DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


#: Training defaults per base model (a registry name), between the dataclass defaults and YAML/flags.
#: ``sdxl`` keeps the authors' recipe (the dataclass defaults); ``toy``'s was measured with the toy
#: fidelity benchmark (docs/TOY.md).
RECIPES: dict[str, dict[str, Any]] = {
    "toy": {"steps": 1500, "lr": 3e-4, "augment_shrink": 0.0, "augment_enlarge": False}}


def recipe(model: str) -> dict[str, Any]:
    """The training defaults of ``model`` (a registry name; other models get none)."""
    return dict(RECIPES.get(str(model), {}))
