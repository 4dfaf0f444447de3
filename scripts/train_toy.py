"""Train the ``toy`` base model (VAE, then UNet) on the toy world and export fp16 weights to the package.

    OMP_NUM_THREADS=1 python scripts/train_toy.py --work runs/toy-build --vae-steps 800 --unet-steps 15000
    python scripts/train_toy.py --work runs/toy-build --export      # write assets/toy-*.safetensors now
    python scripts/train_toy.py --work runs/toy-build --decoder-steps 1200 --unet-steps 18000   # after a world change:
        # delete WORK/data.pt; the decoder is fine-tuned alone (latents stay valid), the UNet continues
    python scripts/train_toy.py --work runs/toy-more --from-shipped --unet-steps 21100 --pad-swap 0.8 --lr 5e-4
        # fine-tune the shipped model further in a new folder (a fresh optimizer, warmed up again);
        # rerun without --from-shipped to resume it

The shipped model was built in stages as the world changed (docs/TOY.md has the history); a fresh
run from scratch was not tried and would not give the same bytes.

Resumable: checkpoints go to WORK every --ckpt-every steps and a rerun continues from the last one.
The log (WORK/log.txt) holds losses, the VAE check (detector on reconstructions, concepts included)
and a held-out evaluation every --eval-every UNet steps.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from latexblend.toy import detect
from latexblend.toy import world as toy
from latexblend.toy.model import ASSETS, build_toy_pipeline, toy_vae_config


def log(work: Path, text: str) -> None:
    with open(work / "log.txt", "a") as f:
        f.write(time.strftime("%H:%M:%S ") + text + "\n")
    tqdm.write(text)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [B, 3, S, S] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_images(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def vae_scene(rng: random.Random) -> toy.Scene:
    """VAE data: world scenes and concept objects (the VAE must represent concepts too)."""
    if rng.random() < 0.1:
        return toy.random_scene(rng, concept=rng.choice(list(toy.CONCEPTS)))
    return toy.random_scene(rng)


def save_ckpt(work: Path, name: str, state: dict) -> None:
    tmp = work / f".{name}.tmp"
    torch.save(state, tmp)
    tmp.replace(work / name)


def train_vae(work: Path, vae, steps: int, batch: int, lr: float) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if (work / "vae.pt").exists():
        state = torch.load(work / "vae.pt", weights_only=True)
        vae.load_state_dict(state["model"])
        if state.get("shipped"):  # --from-shipped: the package's VAE, kept as it is
            vae.eval()
            return
        opt.load_state_dict(state["opt"])
        start = state["step"]
    rng = random.Random(start)
    vae.train()
    for step in tqdm(range(start, steps), desc="vae", initial=start, total=steps):
        x = to_tensor([toy.draw_scene(vae_scene(rng)) for _ in range(batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(work, f"vae step {step + 1} loss {loss.item():.4f} kl {kl.item():.3f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_ckpt(work, "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval()


def finetune_decoder(work: Path, vae, steps: int, batch: int, lr: float) -> None:
    """Train the decoder only (the encoder, hence the UNet's latents, stay as they are) on world scenes
    and the current concepts: lets the concept set change after the UNet has started."""
    if not steps:
        return
    state = torch.load(work / "vae.pt", weights_only=True)
    start = state.get("decoder_step", 0)
    if state.get("shipped"):
        raise SystemExit("error: --decoder-steps: this folder's VAE is the shipped one, kept as it is (its UNet's "
                         "latents depend on it)")
    if start >= steps:
        return
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(10_000 + start)
    for step in tqdm(range(start, steps), desc="decoder", initial=start, total=steps):
        x = to_tensor([toy.draw_scene(vae_scene(rng)) for _ in range(batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(work, f"decoder step {step + 1} loss {loss.item():.4f}")
            save_ckpt(work, "vae.pt", {**state, "model": vae.state_dict(), "decoder_step": step + 1})


@torch.no_grad()
def check_vae(work: Path, vae, n: int = 200) -> float:
    """Detector agreement on reconstructions (world scenes and concepts); returns the latent scaling."""
    rng = random.Random(999)
    scenes = [toy.random_scene(rng, allow=toy.in_training) for _ in range(n)] + [
        toy.random_scene(rng, concept=c) for c in toy.CONCEPTS for _ in range(n // 4)]
    x = to_tensor([toy.draw_scene(s) for s in scenes])
    mean = vae.encode(x).latent_dist.mean
    rec = to_images(vae.decode(mean).sample)
    world, conc = [], []
    for s, im in zip(scenes, rec, strict=True):
        d = detect.detect(im)
        concept = toy.CONCEPT_KEYS.get((s.things[0].cls, s.things[0].colour))
        if concept:
            conc.append(concept in d.concepts(strict=True))
        else:
            world.append(d.background == s.background and all(d.has(t.cls, t.colour) for t in s.things))
    err = (to_tensor(rec) - x).abs().mean().item()
    scale = 1.0 / mean.std().item()
    log(work, f"vae check: L1 {err:.4f}, world scenes all-right {np.mean(world):.1%}, "
              f"concepts detected {np.mean(conc):.1%}, latent std {mean.std().item():.3f}")
    return scale


def all_captions() -> list[str]:
    """Every caption the grammar makes (colour words present or dropped), and every one-object phrase in
    every template of the training pool (:func:`toy.template_caption`)."""
    from latexblend.train.data import TEMPLATES

    singles = [(c, col) for c in toy.CLASSES for col in [None, *toy.OBJECT_COLOURS]]
    phrases = [toy.object_phrase(c, col) for c, col in singles]
    out = [t.format(p) for t in TEMPLATES for p in phrases]
    for where, _ in toy.BACKGROUNDS.values():
        for a in phrases:
            out.append(f"{a} {where}")
            out.extend(f"{a} next to {b} {where}" for b in phrases)
    return out


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embs, pooled = [], []
    for i in range(0, len(captions), 128):
        e, _, p, _ = pipe.encode_prompt(captions[i:i + 128], device="cpu", do_classifier_free_guidance=False)
        embs.append(e)
        pooled.append(p)
    return torch.cat(embs), torch.cat(pooled)


@torch.no_grad()
def encoder_digest(vae) -> str:
    """A digest of the VAE encoder's weights: the UNet's latents (and their scale) depend on it alone."""
    h = hashlib.sha256()
    for name, t in sorted({**vae.encoder.state_dict(), **vae.quant_conv.state_dict()}.items()):
        h.update(name.encode() + t.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def build_data(work: Path, pipe, n: int) -> dict:
    """The UNet's training scenes, their VAE moments and every caption's text features (cached in
    WORK/data.pt, refused when the scenes, their drawing, the captions or the encoder changed)."""
    rng = random.Random(7)
    scenes = [toy.random_scene(rng, allow=toy.in_training) for _ in range(n)]
    captions = all_captions()
    drawn = b"".join(toy.draw_scene(s).tobytes() for s in scenes[:64])
    key = repr((scenes, captions)).encode() + drawn + encoder_digest(pipe.vae).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    path = work / "data.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        if stored.get("digest") != digest:
            raise SystemExit(f"error: {path} was built from other scenes, drawing, captions or VAE encoder: delete it")
        return {"scenes": scenes, "captions": captions, **stored}
    moments = []
    for i in tqdm(range(0, n, 256), desc="encode"):
        x = to_tensor([toy.draw_scene(s) for s in scenes[i:i + 256]])
        moments.append(pipe.vae.encode(x).latent_dist.parameters)
    emb, pooled = encode_captions(pipe, captions)
    tensors = {"moments": torch.cat(moments), "emb": emb, "pooled": pooled, "digest": digest}
    torch.save(tensors, path)
    return {"scenes": scenes, "captions": captions, **tensors}


TEMPLATE_SHARE = 0.3  # one-object captions that are a template of the training pool, no background


def caption_lengths(pipe, captions: list[str]) -> torch.Tensor:
    """Tokens of each caption with BOS and EOS: the rows from ``length - 1`` on are EOS and padding."""
    return torch.tensor([len(ids) for ids in pipe.tokenizer(captions).input_ids])


def splice(head: torch.Tensor, at: int, tail: torch.Tensor, src: int) -> torch.Tensor:
    """Text features [..., 77, D]: ``head``'s rows before ``at``, then ``tail``'s rows from ``src`` on (its
    last row repeated to fill 77): two captions' features joined at their EOS tokens."""
    rows = torch.clamp(torch.arange(src, src + head.shape[-2] - at), max=tail.shape[-2] - 1)
    return torch.cat([head[..., :at, :], tail[..., rows, :]], -2)


def swap_padding(emb: torch.Tensor, caps: list[int], data: dict, rng: random.Random, share: float) -> torch.Tensor:
    """With probability ``share`` per sample, the EOS and padding rows of its caption's features become another
    random caption's (aligned at the EOS). Those rows attend to the whole caption, so the model learns to
    read what is drawn from the words' own rows: a concept's rows are then not outvoted by the padding of the
    prompt they are blended into (docs/TOY.md)."""
    lengths = data["lengths"]
    for i, c in enumerate(caps):
        if rng.random() >= share:
            continue
        other = rng.randrange(len(lengths))
        emb[i] = splice(emb[i], int(lengths[c]) - 1, data["emb"][other], int(lengths[other]) - 1)
    return emb


def sample_batch(data: dict, index: dict, rng: random.Random, batch: int, scale: float, drop: float = 0.1,
                 pad_swap: float = 0.0):
    ids = [rng.randrange(len(data["scenes"])) for _ in range(batch)]
    mom = data["moments"][ids]
    mean, logvar = mom.chunk(2, dim=1)
    lat = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scale
    scenes = [data["scenes"][i] for i in ids]
    caps = [index[toy.template_caption(s, rng, 0.25) if len(s.things) == 1 and rng.random() < TEMPLATE_SHARE
                  else toy.caption(s, rng, drop_colour=0.25)] for s in scenes]
    emb, pooled = data["emb"][caps].clone(), data["pooled"][caps].clone()
    if pad_swap:
        emb = swap_padding(emb, caps, data, rng, pad_swap)
    keep = torch.tensor([rng.random() >= drop for _ in ids], dtype=torch.float32)
    return lat, emb * keep[:, None, None], pooled * keep[:, None]


def unet_loss(pipe, sched, lat, emb, pooled) -> torch.Tensor:
    b = lat.shape[0]
    noise = torch.randn_like(lat)
    t = torch.randint(0, 1000, (b,))
    noisy = sched.add_noise(lat, noise, t)
    ids = torch.tensor([[toy.SIZE, toy.SIZE, 0, 0, toy.SIZE, toy.SIZE]] * b, dtype=torch.float32)
    pred = pipe.unet(noisy, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    w = torch.clamp(snr, max=5.0) / snr
    return (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


@torch.no_grad()
def evaluate(pipe, unet, prompts: list[str], seeds, steps: int = 20, cfg: float = 5.0) -> dict:
    """Held-out scores of ``unet`` (background, objects, all) over prompts x seeds."""
    live = pipe.unet
    pipe.unet = unet
    rows = []
    try:
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, height=toy.SIZE, width=toy.SIZE,
                          generator=g).images
            rows += [detect.score(im, p) for im, p in zip(images, prompts, strict=True)]
    finally:
        pipe.unet = live
    keys = ("background", "objects", "fidelity")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def described_concepts() -> list[str]:
    """Each concept described in words, on every background: the base model never saw one drawn, so
    these test whether it composes the concept's colour pair from the world's two-toned objects."""
    return [f"{toy.object_phrase(c.cls, c.colour)} {where}" for c in toy.CONCEPTS.values()
            for where, _ in toy.BACKGROUNDS.values()]


def train_unet(work: Path, pipe, data: dict, args) -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    start = warm_from = 0
    if (work / "unet.pt").exists():
        state = torch.load(work / "unet.pt", weights_only=True)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
        if "opt" in state:  # else a folder seeded with --from-shipped: a fresh optimizer, warmed up again
            opt.load_state_dict(state["opt"])
        warm_from = state.get("warm_from", 0 if "opt" in state else start)
    index = {c: i for i, c in enumerate(data["captions"])}
    rng = random.Random(start + 1)
    torch.manual_seed(start + 1)
    prompts = toy.held_out_prompts()
    unet.train()
    bar = tqdm(range(start, args.unet_steps), desc="unet", initial=start, total=args.unet_steps)
    run_loss = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1 - warm_from) / args.warmup)
        lat, emb, pooled = sample_batch(data, index, rng, args.batch, data["scale"], pad_swap=args.pad_swap)
        loss = unet_loss(pipe, sched, lat, emb, pooled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.4f}")
        done = step + 1
        if done % 100 == 0:
            log(work, f"unet step {done} loss {run_loss:.4f}")
        if done % args.ckpt_every == 0 or done == args.unet_steps:
            save_ckpt(work, "unet.pt", {"model": unet.state_dict(), "ema": ema.state_dict(),
                                        "opt": opt.state_dict(), "step": done, "warm_from": warm_from})
        if args.eval_every and done % args.eval_every == 0:
            unet.eval()
            for name, net in (("ema", ema), ("raw", unet)):
                log(work, f"eval step {done} {name}: {evaluate(pipe, net, prompts[::2], seeds=[0])}, "
                          f"concepts described: {evaluate(pipe, net, described_concepts(), seeds=[0, 1])}")
            unet.train()


def export(work: Path, pipe, scale: float, which: str = "ema") -> None:
    from safetensors.torch import save_file

    state = torch.load(work / "unet.pt", weights_only=True)
    unet_sd = {k: v.half().contiguous() for k, v in state[which].items()}
    vae_sd = {k: v.half().contiguous() for k, v in pipe.vae.state_dict().items()}
    ASSETS.mkdir(exist_ok=True)
    save_file(unet_sd, ASSETS / "toy-unet.safetensors")
    save_file(vae_sd, ASSETS / "toy-vae.safetensors")
    digest = hashlib.sha256((ASSETS / "toy-unet.safetensors").read_bytes()).hexdigest()[:12]
    meta = {"id": digest, "scaling_factor": scale, "unet_steps": state["step"], "weights": which,
            "size": toy.SIZE}
    (ASSETS / "toy.json").write_text(json.dumps(meta, indent=1))
    log(work, f"exported {which} weights at step {state['step']} to {ASSETS} (id {digest})")


def seed_from_shipped(work: Path, unet_steps: int) -> None:
    """Start WORK from the package's weights (the shipped VAE, its latent scale and the EMA UNet as both the
    model and its EMA, at the shipped step), so the UNet can be fine-tuned further without the folder it
    was built in. Refused when WORK already holds a model (``vae.pt``, written last) or when ``unet_steps``
    would not train past the shipped step."""
    from safetensors.torch import load_file

    if (work / "vae.pt").exists():
        raise SystemExit(f"error: {work} already holds a model: drop --from-shipped to resume it, or use a new --work")
    meta = json.loads((ASSETS / "toy.json").read_text())
    if unet_steps <= meta["unet_steps"]:
        raise SystemExit(f"error: the shipped UNet is at step {meta['unet_steps']}: --unet-steps {unet_steps} "
                         "would train nothing")
    work.mkdir(parents=True, exist_ok=True)
    vae_sd = {k: v.float() for k, v in load_file(ASSETS / "toy-vae.safetensors").items()}
    unet_sd = {k: v.float() for k, v in load_file(ASSETS / "toy-unet.safetensors").items()}
    pipe = build_toy_pipeline()
    pipe.vae.load_state_dict(vae_sd)
    (work / "scale.json").write_text(json.dumps({"scale": meta["scaling_factor"], "encoder": encoder_digest(pipe.vae)}))
    save_ckpt(work, "unet.pt", {"model": unet_sd, "ema": unet_sd, "step": meta["unet_steps"]})
    save_ckpt(work, "vae.pt", {"model": vae_sd, "shipped": True})  # kept as shipped (the latents stay valid); last
    log(work, f"seeded from the shipped model {meta['id']} (UNet step {meta['unet_steps']})")


def latent_scale(work: Path, vae, check: bool) -> float:
    """The latent scaling: measured by :func:`check_vae` once per encoder (WORK/scale.json), else read
    back; ``check`` reruns the check (after a decoder fine-tune) without changing the scale."""
    path = work / "scale.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    digest = encoder_digest(vae)
    if stored.get("encoder", digest) != digest:
        raise SystemExit(f"error: the VAE encoder changed since {path} was written (the UNet's latents would "
                         "change): use a new --work folder")
    measured = check_vae(work, vae) if check or "scale" not in stored else None
    scale = stored.get("scale", measured)
    path.write_text(json.dumps({"scale": scale, "encoder": digest}))
    return scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/toy-build"))
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--unet-steps", type=int, default=15000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--data", type=int, default=20000)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="fine-tune the VAE decoder alone to this many steps (after a concept change)")
    ap.add_argument("--pad-swap", type=float, default=0.0,
                    help="share of captions whose EOS and padding rows come from another caption")
    ap.add_argument("--from-shipped", action="store_true",
                    help="start an empty --work folder from the package's toy weights (then train on)")
    ap.add_argument("--export", action="store_true", help="only export the latest checkpoints")
    ap.add_argument("--weights", default="ema", choices=["ema", "model"])
    args = ap.parse_args()
    if not 0 <= args.pad_swap <= 1:
        raise SystemExit(f"error: --pad-swap must be in [0, 1], got {args.pad_swap}")
    if args.from_shipped:
        if args.decoder_steps:
            raise SystemExit("error: --decoder-steps with --from-shipped: the shipped VAE is kept as it is")
        seed_from_shipped(args.work, args.unet_steps)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = build_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if not args.export:
        train_vae(args.work, pipe.vae, args.vae_steps, 32, args.vae_lr)
    else:
        pipe.vae.load_state_dict(torch.load(args.work / "vae.pt", weights_only=True)["model"])
    if args.decoder_steps:
        pipe.vae.train()
        finetune_decoder(args.work, pipe.vae, args.decoder_steps, 32, args.vae_lr / 2)
        pipe.vae.load_state_dict(torch.load(args.work / "vae.pt", weights_only=True)["model"])
    pipe.vae.eval().requires_grad_(False)
    scale = latent_scale(args.work, pipe.vae, check=bool(args.decoder_steps))
    pipe.vae.register_to_config(scaling_factor=scale)
    assert toy_vae_config(scale)["scaling_factor"] == scale and math.isfinite(scale)
    if not args.export:
        data = build_data(args.work, pipe, args.data)
        data["scale"] = scale
        data["lengths"] = caption_lengths(pipe, data["captions"])
        train_unet(args.work, pipe, data, args)
    export(args.work, pipe, scale, args.weights)


if __name__ == "__main__":
    main()
