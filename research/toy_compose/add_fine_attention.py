"""Seed a scripts/train_toy.py work folder whose UNet has cross-attention at the 8x8 latent level too.

    python research/toy_compose/add_fine_attention.py runs/compose runs/compose-attn

Needs ``toy_unet_config()`` (src/latexblend/toy/model.py) changed to ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``
at all three levels first. Copies SRC's EMA UNet (the new attention blocks start with a zero output projection, so
the model draws as before), VAE, latent scale and data cache into DST; train_toy.py then continues DST with a fresh
optimizer.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from latexblend.toy.model import toy_unet_config


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    state = torch.load(src / "unet.pt", weights_only=True)
    unet = UNet2DConditionModel(**toy_unet_config())
    missing, unexpected = unet.load_state_dict(state["ema"], strict=False)
    if unexpected or not missing:
        raise SystemExit("error: change toy_unet_config() first (see this script's docstring)")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key in missing:
            if ".proj_out." in key:
                params[key].zero_()
    dst.mkdir(parents=True)
    weights = unet.state_dict()
    torch.save({"model": weights, "ema": weights, "step": state["step"]}, dst / "unet.pt")
    for name in ("vae.pt", "scale.json", "data.pt"):
        shutil.copy(src / name, dst / name)
    print(f"seeded {dst} at step {state['step']} ({len(missing)} new tensors)")


if __name__ == "__main__":
    main()
