"""FLOPs of one guidance pass against one plain denoising step, full SDXL architecture, any size.

Runs on the meta device (shapes only, no weights, no arithmetic: seconds on a laptop CPU) through the
same code as ``latexblend generate --guidance``: the UNet with latexblend's attn2 processors, the plain
step a classifier-free-guidance batch of 2 without grad, the guidance pass
(:func:`latexblend.blend.guidance.guidance_pass`) on the conditional sample with grad to the latent, maps
from all 70 attn2 layers. FLOPs from ``torch.utils.flop_counter`` (matmuls, convolutions, attention,
forward and backward). ``predicted`` = the generation's cost relative to plain blending if every FLOP
took equal time, with guidance on the first ``window`` share of steps (the release: 20 of 100).

    python -m benchmarks.guidance_flops --size 1024
"""

from __future__ import annotations

import argparse
import json

import torch

from latexblend.attention import install_processors
from latexblend.blend import guidance
from latexblend.blend.processor import BlendProcessor, BlendState
from latexblend.device import count_tflop
from latexblend.models import attn2_shapes, build_sdxl_random
from latexblend.tokens import Span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--guided-share", type=float, default=0.2, help="share of steps guided (release: 0.2)")
    args = parser.parse_args()
    unet = build_sdxl_random("meta", "bf16").unet
    shapes = attn2_shapes(unet)
    state = BlendState()
    state.reset([[Span("a", 2, 2), Span("b", 6, 2)]])  # "a <c1> dog and a <c2> cat": two concepts
    state.rows = {n: ({k: torch.randn(2, c, device="meta") for k, c in shapes.items()},
                      {k: torch.randn(2, c, device="meta") for k, c in shapes.items()}) for n in "ab"}
    install_processors(unet, lambda layer: BlendProcessor(layer, state))
    h = args.size // 8
    meta = {"device": "meta", "dtype": torch.bfloat16}
    context = torch.randn(2, 77, 2048, **meta)
    added = {"text_embeds": torch.randn(2, 1280, **meta), "time_ids": torch.randn(2, 6, **meta)}
    t = torch.tensor(900.0, device="meta")
    with torch.no_grad():
        step = count_tflop(lambda: unet(torch.randn(2, 4, h, h, **meta), t, context, added_cond_kwargs=added))
    cond = {k: v[:1] for k, v in added.items()}

    pass_tflop = count_tflop(lambda: guidance.guidance_pass(
        unet, torch.randn(1, 4, h, h, device="meta"), torch.ones(1, 1, 1, 1, device="meta"),
        lambda x: unet(x, t, context[:1], added_cond_kwargs=cond), state, list(shapes), state.row_spans, (h, h)))
    print(json.dumps({"size": args.size, "plain_step_tflop": round(step, 3),
                      "guidance_pass_tflop": round(pass_tflop, 3), "pass_over_step": round(pass_tflop / step, 4),
                      "predicted_vs_plain": round(1 + args.guided_share * pass_tflop / step, 4)}, indent=1))


if __name__ == "__main__":
    main()
