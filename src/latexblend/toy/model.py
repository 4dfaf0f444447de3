"""The ``toy`` base model: a small SDXL-format text-to-image model trained on the toy world.

Text encoders and tokenizers are the embedded ``tiny`` model's (seeded, frozen); the UNet and the
AutoencoderKL were trained by ``scripts/train_toy.py`` on :mod:`latexblend.toy.world` scenes and ship with
the package in fp16 (``assets/toy-unet.safetensors``, ``assets/toy-vae.safetensors``,
``assets/toy.json``). :func:`save_toy_model` assembles an ordinary diffusers folder that
``StableDiffusionXLPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from latexblend.errors import LatexBlendError
from latexblend.models import build_tiny_pipeline, cached_model_dir, tiny_unet_config, write_model_folder
from latexblend.toy.world import SIZE

ASSETS = Path(__file__).parents[1] / "assets"


def toy_unet_config() -> dict:
    """``tiny``'s SDXL layout, wider, for 8x8 latents (2.75 M parameters)."""
    return tiny_unet_config() | dict(sample_size=SIZE // 4, block_out_channels=(32, 64, 96),
                                     attention_head_dim=(4, 4, 4), transformer_layers_per_block=(1, 1, 1))


def toy_vae_config(scaling_factor: float = 1.0) -> dict:
    """A 4x AutoencoderKL (3 levels, no mid-block attention) for 32 px images."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, norm_num_groups=8,
        block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False, scaling_factor=scaling_factor,
    )


def toy_scheduler_config() -> dict:
    """Linear betas (1e-4..0.02): terminal SNR ~4e-5, so the start noise carries almost no image
    signal and the background must come from the prompt (SDXL's scaled-linear leaves 7% of it).
    The pipeline samples with Euler ancestral (held-out objects right 55% vs Euler's 30% at 2,800
    UNet steps, 20 prompts, 20 steps)."""
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                timestep_spacing="trailing", prediction_type="epsilon")


def build_toy_pipeline(unet=None, vae=None, seed: int = 0):
    """The toy pipeline: ``tiny``'s text side with the given (or freshly initialised) UNet and VAE."""

    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 10)
    unet = unet if unet is not None else UNet2DConditionModel(**toy_unet_config())
    vae = vae if vae is not None else AutoencoderKL(**toy_vae_config())
    pipe.register_modules(unet=unet, vae=vae, scheduler=EulerAncestralDiscreteScheduler(**toy_scheduler_config()))
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pipe.image_processor.config.vae_scale_factor = pipe.vae_scale_factor
    pipe.default_sample_size = unet.config.sample_size
    return pipe


def load_shipped_toy():
    """The toy pipeline with the shipped trained weights (fp32 in memory)."""

    meta_path = ASSETS / "toy.json"
    if not meta_path.exists():
        raise LatexBlendError("this install has no trained toy weights (assets/toy-*.safetensors); "
                              "build them with scripts/train_toy.py")
    meta = json.loads(meta_path.read_text())
    unet = UNet2DConditionModel(**toy_unet_config())
    vae = AutoencoderKL(**toy_vae_config(meta["scaling_factor"]))
    unet.load_state_dict({k: v.float() for k, v in load_file(ASSETS / "toy-unet.safetensors").items()})
    vae.load_state_dict({k: v.float() for k, v in load_file(ASSETS / "toy-vae.safetensors").items()})
    return build_toy_pipeline(unet.eval(), vae.eval())


def save_toy_model(out_dir: str | Path) -> Path:
    """Write the toy model as a diffusers folder, atomically (a complete folder or none)."""
    return write_model_folder(out_dir, load_shipped_toy, {"latexblend_toy.json": (ASSETS / "toy.json").read_text()})


def toy_model_dir() -> Path:
    """The cached toy-model folder, built on first use (a new folder when the shipped weights change)."""

    meta = json.loads((ASSETS / "toy.json").read_text()) if (ASSETS / "toy.json").exists() else {}
    return cached_model_dir(f"toy-sdxl-{meta.get('id', 'none')}", save_toy_model)
