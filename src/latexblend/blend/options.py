"""Stage 3's options, each validated once, when it is built: :class:`BlendOptions` (the method, METHOD.md
section 4), :class:`GuidanceOptions` (blending guidance, section 5), :class:`RectifyOptions` (self-attention
rectification, section 6), and :class:`GenerateConfig`, the settings of one ``generate`` run, which nests them.

On the command line and in YAML files every setting is one flat key (``--guidance-window`` /
``guidance_window:``); :data:`GenerateConfig.FLAT_KEYS` says where each lives in the nested options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from latexblend.errors import LatexBlendError
from latexblend.settings import check_range, check_seed, shown

#: Guidance layer sets: whole UNet parts by name.
BLOCKS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


@dataclass(frozen=True)
class BlendOptions:
    """``start``: replace a concept's rows while ``t/T < start`` (the first ~10% of the trajectory keeps the
    plain class noun and lays out the scene); ``bind``: the slot attends where the noun attends while
    blending (True), also before ``start`` as in the authors' release (``"always"``), or never (False)."""

    start: float = 0.9
    bind: bool | str = True

    def __post_init__(self) -> None:
        check_range("blend_start", self.start, 0, 1)
        if self.bind not in (True, False, "always"):
            raise LatexBlendError(f"bind must be True, False or 'always', got {self.bind!r}")


@dataclass(frozen=True)
class GuidanceOptions:
    """``window``: guide while ``t/T >= window`` (the unit of ``blend_start``; 0.8 = the release's first
    20 of 100 steps); ``step_size``: the update's scale; ``layers``: see
    :func:`~latexblend.blend.guidance.select_layers`; ``checkpointing``: gradient checkpointing in the guidance
    pass (less memory, one more forward); ``history``: keep each pass's ``t_frac``, loss and latent update of
    the last pipeline call (off: nothing is kept, so memory stays flat over many calls)."""

    window: float = 0.8
    step_size: float = 1.0
    layers: str = "all"
    checkpointing: bool = False
    history: bool = False

    def __post_init__(self) -> None:
        check_range("guidance_window", self.window, 0, 1)
        check_range("guidance_step_size", self.step_size, 0, 1e4, open_lo=True)
        check_layer_spec(self.layers)


@dataclass(frozen=True)
class RectifyOptions:
    """``start``: capture at the first step with ``t/T < start`` and rectify from then on (the unit of
    ``blend_start``; the release's 0.8); ``clusters``: spectral clusters; ``seed``: the clustering's seed."""

    start: float = 0.8
    clusters: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("rectify_start", self.start, 0, 1)
        check_range("rectify_clusters", self.clusters, 2, 64)
        check_seed("rectify seed", self.seed)


def check_layer_spec(spec: str) -> None:
    """``all``, or comma-separated ``down`` / ``mid`` / ``up`` / inner dims / block prefixes."""
    if spec.strip() == "all":
        return
    for item in (s.strip() for s in spec.split(",")):
        if not (item in BLOCKS or item.isdigit() or item.startswith(("down_blocks", "mid_block", "up_blocks"))):
            raise LatexBlendError(f"unknown guidance layer set '{item}': use all, down, mid, up, an inner dim "
                                  "(e.g. 640) or a block prefix (e.g. up_blocks.0)")


#: ``--scheduler`` names and the diffusers scheduler class each stands for (``default``: the model's own).
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
#: Bounds of one run: prompts, images per prompt, images in all (each image is one record of metadata.json),
#: and the image side in pixels.
MAX_PROMPTS = 10_000
MAX_IMAGES_PER_PROMPT = 10_000
MAX_IMAGES = 100_000
MAX_SIDE = 4096
#: Longer prompts cannot fit CLIP's 77 tokens; refused before anything tokenizes them.
MAX_PROMPT_CHARS = 4096


@dataclass
class GenerateConfig:
    """One ``generate`` run (Stage 3). Defaults are the paper's (Euler, 100 steps, CFG 6.0); ``guidance`` and
    ``rectify`` are off (``None``) unless given."""

    model: str = "tiny"
    concepts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    num_images: int = 1
    batch_size: int = 4
    seed: int = 0
    steps: int = 100
    cfg: float = 6.0
    height: int | None = None
    width: int | None = None
    scheduler: str = "default"
    device: str | None = None
    dtype: str = "auto"
    out: str | None = None
    bank_dir: str | None = None
    grid: bool = True
    save_maps: bool = False
    blend: BlendOptions = field(default_factory=BlendOptions)
    guidance: GuidanceOptions | None = None
    rectify: RectifyOptions | None = None

    #: Flat keys of the nested options (a key naming a nested field alone is its on/off switch).
    FLAT_KEYS: ClassVar[dict[str, tuple[str, str | None]]] = {
        "blend_start": ("blend", "start"), "bind": ("blend", "bind"),
        "guidance": ("guidance", None), "guidance_window": ("guidance", "window"),
        "guidance_step_size": ("guidance", "step_size"), "guidance_layers": ("guidance", "layers"),
        "guidance_checkpointing": ("guidance", "checkpointing"),
        "rectify": ("rectify", None), "rectify_start": ("rectify", "start"),
        "rectify_clusters": ("rectify", "clusters"),
    }

    def __post_init__(self) -> None:
        if not self.prompts:
            raise LatexBlendError("no prompt given (use --prompt, --prompts-file or --config)")
        check_range("number of prompts", len(self.prompts), 1, MAX_PROMPTS)
        for i, text in enumerate([*self.prompts, self.negative_prompt]):
            if len(text) > MAX_PROMPT_CHARS:
                what = "negative prompt" if i == len(self.prompts) else f"prompt {i}"
                raise LatexBlendError(f"{what} is {len(text):,} characters: CLIP reads at most 77 tokens (at most "
                                      f"{MAX_PROMPT_CHARS:,} characters are accepted); shorten it")
        check_range("num_images", self.num_images, 1, MAX_IMAGES_PER_PROMPT)
        if len(self.prompts) * self.num_images > MAX_IMAGES:
            raise LatexBlendError(f"{len(self.prompts):,} prompts x {self.num_images:,} images is over {MAX_IMAGES:,} "
                                  f"images in one run; split the prompts over several runs")
        check_range("batch_size", self.batch_size, 1, 1024)
        check_seed("seed", self.seed, self.num_images)
        check_range("steps", self.steps, 1, 1000)
        check_range("cfg", self.cfg, 0, 100)
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value % 8 or not 8 <= value <= MAX_SIDE):
                raise LatexBlendError(f"{side} must be a multiple of 8 in [8, {MAX_SIDE}], got {value}")
        if self.scheduler not in ("default", *SCHEDULERS):
            raise LatexBlendError(f"unknown scheduler {shown(self.scheduler)}; choose default, {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise LatexBlendError(f"unknown dtype {shown(self.dtype)}; choose one of auto, fp32, fp16, bf16")
