"""The paper's training ablation (full / no base flow / fixed template) on the embedded tiny model, on CPU.

Draws a few images of a procedural concept (a red disc with a blue bar and a yellow square, placed and
coloured differently on each background), generates a small prior set with the base model, trains the
three variants, extracts their banks, and measures the held-out denoising loss (epsilon MSE, fixed
noise and timesteps, DDPM forward noising as in training) of the concept images under prompts outside
the template pool, with each bank blended into the span ``a dog`` of the vanilla model versus the
plain prompt, with paired standard errors over the (prompt, image, timestep) samples. Prints a markdown table
and writes it with the raw numbers to ``<out>/ablation.json``.

    python scripts/ablation_tiny.py [--steps 300] [--lr 3e-3] [--out out/ablation_tiny]

A tiny random model shows that the mechanics work (the bank carries the concept into new prompts);
it says nothing about paper-level image quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latexblend.synthetic import draw_concept

HELD_OUT = ("a dog on the grass", "a dog in the snow at night", "a dog next to a red car")
VARIANTS = {"full": {}, "no-base-flow": {"base_flow": False}, "fixed-template": {"fixed_template": True}}


def held_out_loss(pipe, bank, images, timesteps, noise) -> torch.Tensor:
    """Epsilon MSE per (prompt, image, timestep) [P * N * T] of ``images`` over the held-out prompts, with
    ``bank`` blended at ``a dog`` (or not). Noised with the DDPM forward process training uses (never the
    pipeline's sampler, whose state after a generation would add no noise)."""
    from diffusers import DDPMScheduler

    from latexblend.attention import BlendProcessor, BlendState, install_processors
    from latexblend.data import _square, _to_tensor
    from latexblend.tokens import locate_spans, token_ids

    state = BlendState(t_frac=0.0)
    restore = install_processors(pipe.unet, lambda layer: BlendProcessor(layer, state))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([_to_tensor(_square(im, 64)) for im in images])
    with torch.no_grad():
        lat = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    n, t = len(images), len(timesteps)
    lat, ts = lat.repeat_interleave(t, 0), timesteps.repeat(n)
    noisy = torch.stack([sched.add_noise(x[None], e[None], s[None])[0] for x, e, s in zip(lat, noise, ts, strict=True)])
    losses = []
    try:
        for prompt in HELD_OUT:
            concepts = [("c", "dog", token_ids(pipe.tokenizer, "dog"))]
            _, spans = locate_spans(pipe.tokenizer, prompt, concepts)
            if bank is not None:
                state.rows["c"] = (bank.k, bank.v)
            state.reset([spans] * len(ts) if bank is not None else [[]] * len(ts))
            with torch.no_grad():
                ctx, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
                ctx, pooled = ctx.expand(len(ts), -1, -1), pooled.expand(len(ts), -1)
                time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(ts), dtype=torch.float32)
                pred = pipe.unet(noisy, ts, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            losses.append((pred - noise).pow(2).mean(dim=(1, 2, 3)))
    finally:
        restore()
    return torch.cat(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=Path("out/ablation_tiny"))
    args = ap.parse_args()

    from latexblend.bank import load_bank
    from latexblend.config import TrainConfig, merge
    from latexblend.data import generate_prior, open_image
    from latexblend.models import load_pipeline
    from latexblend.train import train

    out = args.out
    images_dir = draw_concept(out / "concept", "disc", num=5, size=96, seed=0)
    pipe = load_pipeline("tiny", device="cpu", dtype="fp32")
    generate_prior(pipe, "dog", 8, out / "prior", steps=10, progress=False)
    rows, timings = {}, {}
    for variant, extra in VARIANTS.items():
        cfg = merge(TrainConfig, dict(name=f"abl-{variant}", images=str(images_dir), class_noun="dog", model="tiny",
                                      prior=str(out / "prior"), steps=args.steps, lr=args.lr, checkpoint_every=0,
                                      log_every=args.steps, runs_dir=str(out / "runs"), bank_dir=str(out / "banks"),
                                      overwrite=True, **extra))
        t0 = time.perf_counter()
        train(cfg, progress=False)
        timings[variant] = time.perf_counter() - t0
        rows[variant] = load_bank(out / "banks" / f"abl-{variant}.safetensors")
    images = [open_image(p) for p in sorted(images_dir.glob("*.png"))]
    g = torch.Generator().manual_seed(1234)
    timesteps = torch.linspace(100, 900, 9).long()
    noise = torch.randn(len(images) * len(timesteps), 4, 8, 8, generator=g)
    plain = held_out_loss(pipe, None, images, timesteps, noise)
    table = {v: held_out_loss(pipe, bank, images, timesteps, noise) for v, bank in rows.items()}
    lines = ["| variant | held-out loss, no bank | with bank | change (± s.e., paired) | train time (s) |",
             "|---|---|---|---|---|"]
    result = {}
    for v, loss in table.items():
        diff = 100 * (loss - plain) / plain.mean()
        change, se = float(diff.mean()), float(diff.std() / len(diff) ** 0.5)
        result[v] = {"with_bank": float(loss.mean()), "change_pct": change, "se_pct": se}
        lines.append(f"| {v} | {float(plain.mean()):.5f} | {float(loss.mean()):.5f} | {change:+.2f}% ± {se:.2f} | "
                     f"{timings[v]:.0f} |")
    print("\n".join(lines))
    (out / "ablation.json").write_text(json.dumps({"steps": args.steps, "lr": args.lr, "plain": float(plain.mean()),
                                                    "variants": result, "samples": len(plain), "train_s": timings},
                                                   indent=2))


if __name__ == "__main__":
    main()
