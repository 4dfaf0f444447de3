"""``sdxl-slim``: SDXL-base's exact module graph (UNet: 3 levels, 2 resnets per level, 1/2/10 transformer
layers, 70 attn2 layers; VAE: 4 levels of 2 resnets; CLIP-L with 12 layers and bigG with 32) at toy widths.

Its operator count per step equals the full model's (the same modules call the same operators in the same
order; only the tensor sizes differ), in a few hundred MB and seconds per step on a CPU: what op-count
evidence is measured on without a GPU. Built once into the cache folder as a diffusers folder, like ``tiny``.
"""

from __future__ import annotations

from latexblend.models import build_random_pipeline, cached_model_dir, sdxl_components, write_model_folder

NAME = "sdxl-slim"
VERSION = 1


def slim_components() -> dict:
    """:func:`latexblend.models.sdxl_components` with every width divided down (layers, blocks and kinds kept)."""
    full = sdxl_components()
    unet = {**full["unet"], "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
            "cross_attention_dim": 64, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32}
    vae = {**full["vae"], "block_out_channels": (32, 32, 32, 32)}
    narrow = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
    return dict(unet=unet, vae=vae, text={**full["text"], **narrow}, text_2={**full["text_2"], **narrow})


def slim_model_dir():
    """The cached ``sdxl-slim`` folder, built on first use (a few seconds)."""
    marker = {"latexblend_slim.json": f'{{"version": {VERSION}}}'}
    return cached_model_dir(f"{NAME}-v{VERSION}",
                            lambda path: write_model_folder(path, lambda: build_random_pipeline(slim_components()),
                                                            marker))


def resolve(model: str) -> str:
    """``model``, with ``sdxl-slim`` replaced by its folder (every other name passes through)."""
    return str(slim_model_dir()) if model == NAME else model
