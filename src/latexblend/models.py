"""Base models: a registry of specs, the embedded tiny SDXL, loading, and ``attn2`` bookkeeping.

``--model`` accepts a registry name (``sdxl``, ``tiny``, ``toy``), a local diffusers folder, or a hub id.
``tiny`` is an SDXL-architecture model with seeded random weights and the real CLIP tokenizers that
the package builds offline, saves as an ordinary diffusers folder, and loads like any checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from latexblend.device import resolve_device
from latexblend.errors import LatexBlendError
from latexblend.settings import parse_json, shown
from latexblend.tokens import BOS_ID, EOS_ID, build_clip_tokenizer

TINY_VERSION = 1
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass(frozen=True)
class ModelSpec:
    """What the toolkit needs to know about a base model family."""

    name: str
    source: str  # hub id; "builtin": built by ``builder``; "memory": random weights built in memory, no folder
    attn2_dims: dict[int, int] = field(default_factory=dict)  # inner dim -> number of attn2 layers
    context_dim: int = 2048
    resolution: int = 1024
    builder: str | None = None  # "module:function" returning the built-in model's folder (built on first use)

    @property
    def num_attn2(self) -> int:
        return sum(self.attn2_dims.values())

    @property
    def values_per_token(self) -> int:
        """k and v values one concept token takes in a bank."""
        return 2 * sum(dim * n for dim, n in self.attn2_dims.items())


REGISTRY: dict[str, ModelSpec] = {
    "sdxl": ModelSpec("sdxl", SDXL_HUB_ID, {640: 10, 1280: 60}, 2048, 1024),
    "tiny": ModelSpec("tiny", "builtin", {48: 3, 64: 8}, 64, 64, builder="latexblend.models:tiny_model_dir"),
    "toy": ModelSpec("toy", "builtin", {64: 3, 96: 4}, 64, 32, builder="latexblend.toy.model:toy_model_dir"),
    "sdxl-random": ModelSpec("sdxl-random", "memory", {640: 10, 1280: 60}, 2048, 1024),
}


# --------------------------------------------------------------------------- the tiny model


def tiny_unet_config() -> dict:
    """SDXL's UNet layout (text-time conditioning, linear projections, 3 levels) at toy width."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 48, 64), norm_num_groups=16, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def sdxl_unet_config() -> dict:
    """SDXL-base 1.0's UNet configuration (for random-weight builds: benchmarks, shape checks)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), norm_num_groups=32, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def tiny_components() -> dict:
    """The tiny model's UNet, VAE and the two text encoders' configurations."""

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID, pad_token_id=1, projection_dim=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
               block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
    return dict(unet=tiny_unet_config(), vae=vae, text=text, text_2=text)


def sdxl_components() -> dict:
    """SDXL-base 1.0's UNet, VAE, CLIP ViT-L and OpenCLIP bigG configurations."""

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  pad_token_id=1, layer_norm_eps=1e-5)
    vae = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
               scaling_factor=0.13025, force_upcast=True)
    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                hidden_act="quick_gelu", projection_dim=768, **common)
    text_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  hidden_act="gelu", projection_dim=1280, **common)
    return dict(unet=sdxl_unet_config(), vae=vae, text=text, text_2=text_2)


def build_random_pipeline(components: dict, seed: int = 0, device: str = "cpu") -> StableDiffusionXLPipeline:
    """An SDXL pipeline of ``components`` (:func:`tiny_components`, :func:`sdxl_components`) with seeded
    random weights built on ``device`` (component ``i`` of UNet, VAE, text encoders seeded ``seed + i``),
    the real CLIP tokenizers and SDXL's Euler scheduler."""

    builders = ((UNet2DConditionModel, components["unet"]), (AutoencoderKL, components["vae"]),
                (CLIPTextModel, CLIPTextConfig(**components["text"])),
                (CLIPTextModelWithProjection, CLIPTextConfig(**components["text_2"])))
    models = []
    with torch.device(device):
        for i, (cls, config) in enumerate(builders):
            torch.manual_seed(seed + i)
            models.append(cls(**config) if isinstance(config, dict) else cls(config))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok1, tok2 = build_clip_tokenizer(Path(tmp) / "t1"), build_clip_tokenizer(Path(tmp) / "t2", pad_token="!")
    unet, vae, te1, te2 = models
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """All seven SDXL components at toy size, seeded, with the real CLIP tokenizers (~1 s on CPU)."""
    return build_random_pipeline(tiny_components(), seed)


def build_sdxl_random(device: str = "cuda", dtype: str = "bf16", seed: int = 0) -> StableDiffusionXLPipeline:
    """The full SDXL-base architecture (UNet, VAE, CLIP-L and bigG encoders) with random weights,
    built directly on ``device``: speed and memory figures without a checkpoint."""
    pipe = build_random_pipeline(sdxl_components(), seed, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, resolve_dtype(dtype, device))


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder, atomically (a complete folder or none)."""
    marker = {"latexblend_tiny.json": json.dumps({"version": TINY_VERSION, "seed": seed})}
    return write_model_folder(out_dir, lambda: build_tiny_pipeline(seed), marker)


def write_model_folder(out_dir: str | Path, build, files: dict[str, str]) -> Path:
    """Save the pipeline ``build()`` makes, plus text ``files``, as a diffusers folder, atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LatexBlendError(f"{out_dir} is a file, not a folder; choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LatexBlendError(f"{out_dir} exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build().save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cache_home() -> Path:
    """Where latexblend keeps what it builds (``$LATEXBLEND_HOME``, else ``~/.cache/latexblend``)."""
    return Path(os.environ.get("LATEXBLEND_HOME", Path.home() / ".cache" / "latexblend"))


def cached_model_dir(name: str, save) -> Path:
    """``cache_home()/name``, written by ``save(path)`` on first use. Processes that start together (the
    demo trains two concepts at once) take turns on a lock file: one builds, the others wait and use it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock (each build is still all or nothing)
        fcntl = None
    path = cache_home() / name
    if (path / "model_index.json").exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{name}.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "model_index.json").exists():
                shutil.rmtree(path, ignore_errors=True)  # a build that was cut short
                save(path)
    except OSError as err:
        raise LatexBlendError(f"cannot build the model in {path}: {err}") from err
    return path


def tiny_model_dir() -> Path:
    """The cached tiny-model folder, built on first use."""
    return cached_model_dir(f"tiny-sdxl-v{TINY_VERSION}", save_tiny_model)


# --------------------------------------------------------------------------- loading


def resolve_model(model: str) -> str:
    """A registry name, local folder or hub id -> what ``from_pretrained`` takes."""
    spec = REGISTRY.get(model)
    if spec is not None and spec.builder:  # "module:function", imported here: the registry names its builder
        module, _, function = spec.builder.partition(":")
        return str(getattr(importlib.import_module(module), function)())
    if spec is not None and spec.source == "memory":
        raise LatexBlendError(f"'{model}' has no files (random weights built in memory): it works with "
                              "train, generate and the benchmarks, not with commands that read a model folder")
    if spec is not None:
        return spec.source
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise LatexBlendError(f"model folder {path} has no model_index.json: not a diffusers SDXL folder")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise LatexBlendError(f"model '{model}' is neither a local folder nor a hub id (owner/name)")
    return model


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bf16 on CUDA when supported (else fp16) and fp32 on CPU."""

    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise LatexBlendError(f"unknown dtype '{dtype}'; choose one of auto, fp32, fp16, bf16")
    return names[dtype]


def load_pipeline(model: str = "tiny", device: str | None = None, dtype: str = "auto") -> StableDiffusionXLPipeline:
    """The stock ``StableDiffusionXLPipeline`` for ``model`` on ``device`` in ``dtype``.

    ``sdxl-random`` builds the full SDXL-base architecture with random weights on the device.

    A hub id that is not in the local cache (offline machine, typo, gated repo) is one clear error
    naming the model and how to provide it as a local folder.
    """

    device = resolve_device(device)
    if model == "sdxl-random":
        return build_sdxl_random(device=device, dtype=dtype)
    source = resolve_model(model)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=torch_dtype)
    except Exception as err:  # hub, file-system and format errors all mean the same to a user
        raise load_error(model, source, err) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_error(model: str, source: str, err: Exception, flag: str = "--model") -> LatexBlendError:
    """One-line error for a model that failed to load, naming it and what fixes it: a damaged cached built-in
    model is deleted (it is built again), a local folder saved again, a hub id downloaded and passed as a
    folder with ``flag``."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    spec = REGISTRY.get(model)
    if spec is not None and spec.builder:
        return LatexBlendError(f"cannot load model '{model}' from its cache folder {source} ({type(err).__name__}: "
                               f"{first}): the cached copy is damaged; delete that folder and it is built again on "
                               "next use")
    if Path(source).is_dir():
        return LatexBlendError(f"cannot load model folder {source} ({type(err).__name__}: {first}): it is incomplete "
                               "or damaged; download or save it again")
    return LatexBlendError(
        f"cannot load model '{model}' ({type(err).__name__}: {first}); download it with "
        f"`hf download {source} --local-dir DIR` on a machine with network and pass {flag} DIR"
    )


def load_unet_and_tokenizer(model: str, device: str = "cpu", dtype: str = "fp32"):
    """Only the UNet and the first tokenizer of ``model`` (what bank verification needs)."""

    source = resolve_model(model)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=resolve_dtype(dtype, device))
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except Exception as err:
        raise load_error(model, source, err) from err
    return unet.to(device), tokenizer


def shipped_tokenizer():
    """SDXL's first tokenizer, built from the vocabulary shipped with the package (no model needed)."""

    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(tmp)


# --------------------------------------------------------------------------- attn2 layers and fingerprint


def attn2_modules(unet: UNet2DConditionModel) -> dict[str, torch.nn.Module]:
    """Every cross-attention module (``...attn2``) of ``unet`` by name, in module order."""
    layers = {name: mod for name, mod in unet.named_modules() if name.endswith("attn2")}
    if not layers:
        raise LatexBlendError("this UNet has no cross-attention (attn2) layers: not an SDXL-style model")
    return layers


def attn2_shapes(unet: UNet2DConditionModel) -> dict[str, int]:
    """Inner dim (rows of ``to_k``) of every attn2 layer."""
    return {name: int(mod.to_k.weight.shape[0]) for name, mod in attn2_modules(unet).items()}


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a base model's ``to_k`` weights, robust to the dtype the model is loaded in.

    ``norms`` are the Frobenius norms of every attn2 ``to_k`` weight (computed in float64); ``digest``
    is a short hash of them at 3 significant digits, for display.
    """

    norms: tuple[float, ...]

    @property
    def digest(self) -> str:
        text = json.dumps([float(f"{n:.3g}") for n in self.norms])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def matches(self, other: Fingerprint, rtol: float = 2e-3) -> bool:
        if len(self.norms) != len(other.norms):
            return False
        pairs = zip(self.norms, other.norms, strict=True)
        return all(abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12) for a, b in pairs)

    def to_json(self) -> str:
        return json.dumps([float(f"{n:.7g}") for n in self.norms])

    @classmethod
    def from_json(cls, text: str, what: str = "fingerprint") -> Fingerprint:
        """The fingerprint :meth:`to_json` wrote; anything else (not a non-empty list of finite numbers >= 0) is
        one line naming ``what``."""
        norms = parse_json(text, what)
        if not (isinstance(norms, list) and norms and all(
                type(n) in (int, float) and math.isfinite(n) and n >= 0 for n in norms)):
            raise LatexBlendError(f"{what} must be a JSON list of weight norms (numbers >= 0), got {shown(text)}")
        return cls(tuple(float(n) for n in norms))


def model_fingerprint(model: str, layers: list[str]) -> Fingerprint:
    """The :class:`Fingerprint` of ``model``'s UNet over the attn2 ``layers`` (in their order), read from the
    UNet's safetensors file when it is local or cached (only the ``to_k`` tensors), else from the loaded UNet."""
    norms = _file_norms(resolve_model(model), [f"{layer}.to_k.weight" for layer in layers])
    if norms is not None:
        return Fingerprint(norms)
    unet = load_unet_and_tokenizer(model)[0]
    modules = attn2_modules(unet)
    with torch.no_grad():
        return Fingerprint(tuple(float(modules[layer].to_k.weight.detach().double().norm()) for layer in layers
                                 if layer in modules))


def _file_norms(source: str, keys: list[str]) -> tuple[float, ...] | None:
    """Norms of ``keys`` in the UNet weights file of ``source`` (a folder or a cached hub id); ``None`` when the
    file is not at hand, is sharded or lacks a key."""
    name = "unet/diffusion_pytorch_model.safetensors"
    path = Path(source) / name
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache  # a dependency of diffusers

            cached = try_to_load_from_cache(source, name)
        except Exception:  # not a valid repo id
            return None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if not set(keys) <= set(f.keys()):
                return None
            return tuple(float(f.get_tensor(key).double().norm()) for key in keys)
    except Exception:  # unreadable here: loading the UNet gives the clear error
        return None


def fingerprint(unet: UNet2DConditionModel) -> Fingerprint:
    """:class:`Fingerprint` of ``unet``'s attn2 ``to_k`` weights."""

    with torch.no_grad():
        norms = tuple(float(m.to_k.weight.detach().double().norm()) for m in attn2_modules(unet).values())
    return Fingerprint(norms)
