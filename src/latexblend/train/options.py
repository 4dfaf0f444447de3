"""Stage 1's options: :class:`TrainConfig`, validated when it is built, and the training defaults of each base
model (:data:`RECIPES`), which sit between the dataclass defaults and a user's YAML and flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from latexblend.errors import LatexBlendError
from latexblend.settings import check_range, safe_name

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
        for key in ("name", "images", "class_noun"):
            if not getattr(self, key):
                raise LatexBlendError(f"no {key.replace('_', ' ')} given (use --concept, or --images, "
                                      f"--class-noun and --name)")
        safe_name(self.name, "concept name")
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
        if isinstance(self.cuda_graph, bool):  # YAML and --set read on/off as booleans
            self.cuda_graph = "on" if self.cuda_graph else "off"
        if self.cuda_graph not in CUDA_GRAPH:
            raise LatexBlendError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH)}, got '{self.cuda_graph}'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise LatexBlendError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if "{token}" not in self.extract_prompt or "{noun}" not in self.extract_prompt:
            raise LatexBlendError("extract_prompt must contain {token} and {noun}")


#: Training defaults per base model (a registry name), between the dataclass defaults and YAML/flags.
#: ``sdxl`` keeps the authors' recipe (the dataclass defaults); ``toy``'s was measured with the toy
#: fidelity benchmark (docs/TOY.md).
RECIPES: dict[str, dict[str, Any]] = {
    "toy": {"steps": 1500, "lr": 3e-4, "augment_shrink": 0.0, "augment_enlarge": False}}


def recipe(model: str) -> dict[str, Any]:
    """The training defaults of ``model`` (a registry name; other models get none)."""
    return dict(RECIPES.get(str(model), {}))
