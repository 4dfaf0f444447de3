"""The training run folder, the one writer and reader of its files.

```
runs/<name>/
  config.yaml                 resolved settings (defaults < YAML < flags), written at the start
  run.json                    versions, device, wall time, steps/s, MFU, peak memory, final loss (at the end)
  kv.safetensors              trainable attn2 to_k/to_v weights (fp32) or LoRA factors, with metadata
  tokens.safetensors          the identifier's learned embedding row per text encoder
  checkpoints/step_<N>/       kv + tokens as above, optimizer.pt (tensors only), state.json (step, config hash)
  tb/                         tensorboard events (--log-tensorboard)
```
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from latexblend.bank.extract import bank_dtype, extract_bank
from latexblend.bank.format import SUFFIX, bank_dir, save_bank
from latexblend.device import resolve_device
from latexblend.errors import LatexBlendError
from latexblend.fileio import check_output_folder, read_safetensors, save_safetensors, write_text_atomic
from latexblend.models import Fingerprint, attn2_modules, fingerprint, load_unet_and_tokenizer, model_fingerprint
from latexblend.settings import MAX_SETTINGS_BYTES, load_data, load_mapping, merge, parse_json, shown, to_dict
from latexblend.text import load_text_side, set_identifier_rows
from latexblend.train.model import merge_lora
from latexblend.train.options import TrainConfig

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
KV_FILE = "kv.safetensors"
TOKENS_FILE = "tokens.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"

#: Settings that do not change what a step computes (may differ when resuming).
NOT_HASHED = ("steps", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "log_every", "log_tensorboard",
              "runs_dir", "bank_dir", "bank_dtype", "extract_prompt", "gradient_checkpointing", "cache_prior",
              "compile_unet", "compile_backend", "peak_tflops", "cuda_graph")
#: Settings added after runs existed, with their defaults: hashed only when set otherwise, so a run
#: started before they existed still resumes.
HASHED_WHEN_SET = {"crop_time_ids": TrainConfig.crop_time_ids, "augment_shrink": TrainConfig.augment_shrink,
                   "augment_enlarge": TrainConfig.augment_enlarge}


def hashed_settings(cfg: TrainConfig) -> dict:
    """The settings that change what a training step computes (a checkpoint records them; resume refuses others)."""
    return {k: v for k, v in to_dict(cfg).items()
            if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}


def config_hash(cfg: TrainConfig) -> str:
    """A digest of :func:`hashed_settings` (resume refuses a mismatch)."""
    return hashlib.sha256(json.dumps(hashed_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def check_run_folder(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint to resume from)``; refuses to clobber a run or a bank by accident. A run
    folder without weights (stopped before its first checkpoint) holds nothing to keep or resume: it is
    started again from step 0, also under ``--resume latest``."""

    run, bank = check_outputs(cfg)
    kept = _has_weights(run)
    if cfg.resume and (cfg.resume != "latest" or kept):
        checkpoint = find_checkpoint(run, cfg.resume)
        read_state(checkpoint, cfg)  # other settings are refused before any model loads
        return run, checkpoint
    if kept and not cfg.overwrite:
        if _finished(run) and not _bank_written(run):
            raise LatexBlendError(f"{run} holds a finished training whose bank was not written; write it with "
                                  f"`latexblend extract --run {run}`, or pass --overwrite to train again")
        raise LatexBlendError(f"{run} already exists; continue it with --resume latest, or pass --overwrite")
    if bank.exists() and not cfg.overwrite:
        raise LatexBlendError(f"{bank} already exists; pass --overwrite or choose another --name")
    if run.exists() and any(run.iterdir()) and not kept and not cfg.overwrite:
        print(f"{run} holds no checkpoint (an earlier run stopped before its first one): starting it from step 0")
    return run, None


def check_outputs(cfg: TrainConfig) -> tuple[Path, Path]:
    """``(run folder, bank file)``, once the runs folder and the bank folder are folders this process can write in
    (or create) and the bank file is not a folder: checked before any work, so a run never trains for nothing."""
    runs = check_output_folder(cfg.runs_dir, "runs folder")
    folder = check_output_folder(bank_dir(cfg.bank_dir), "bank folder")
    bank = folder / f"{cfg.name}{SUFFIX}"
    if bank.is_dir():
        raise LatexBlendError(f"{bank} is a folder, so the bank cannot be written there; move it or choose another "
                              "--name")
    run = runs / cfg.name
    if run.exists() and not run.is_dir():
        raise LatexBlendError(f"run folder {run} is a file; move it or choose another --name")
    if run.is_dir() and any(run.iterdir()) and not (run / CONFIG_FILE).is_file():
        raise LatexBlendError(f"{run} exists and is not a training run folder (no {CONFIG_FILE}); latexblend would "
                              "replace it: choose another --name or --runs-dir")
    return run, bank


def _finished(run: Path) -> bool:
    """Does ``run`` hold final weights (the training finished)?"""
    return (run / KV_FILE).is_file() and (run / TOKENS_FILE).is_file()


def _bank_written(run: Path) -> bool:
    """Did the finished run write its bank? Its run.json names the bank once written; no run.json means it
    stopped before (the weights are written first); a run.json that cannot be read counts as yes."""
    if not (run / RUN_FILE).exists():
        return False
    try:
        info = load_data(run / RUN_FILE, "run file", MAX_SETTINGS_BYTES)
    except LatexBlendError:
        return True
    return not isinstance(info, dict) or info.get("bank") is not None


def _has_weights(run: Path) -> bool:
    """Does ``run`` hold final weights or a checkpoint (anything worth keeping)?"""
    return (run / KV_FILE).is_file() or any((p / STATE_FILE).is_file() for p in run.glob("checkpoints/step_*"))


def _checkpoints(folder: Path, complete: bool) -> list[Path]:
    """``folder/checkpoints/step_<N>`` in step order (``complete``: only those with a state.json)."""
    steps = (p for p in (folder / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    return sorted((p for p in steps if not complete or (p / STATE_FILE).is_file()), key=lambda p: int(p.name[5:]))


def find_checkpoint(run: Path, which: str) -> Path:
    """``latest`` -> the newest ``run/checkpoints/step_<N>``; a path -> that checkpoint (or a run's newest)."""
    path = run if which == "latest" else Path(which)
    if not path.exists():
        raise LatexBlendError(f"--resume {which}: {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    steps = _checkpoints(path, complete=True)
    if not steps and _finished(path):
        raise LatexBlendError(f"--resume {which}: {path} finished training and keeps no checkpoint to continue from; "
                              f"if its bank is missing, write it with `latexblend extract --run {path}`")
    if not steps:
        raise LatexBlendError(f"--resume {which}: no checkpoint in {path} (looked for checkpoints/step_<N>/state.json)")
    return steps[-1]


def start_run_folder(cfg: TrainConfig, run: Path, resume_from: Path | None) -> None:
    """Empty the folder for a fresh run (``--overwrite``, checked up-front) and write ``config.yaml``."""

    if resume_from is None and run.exists():
        shutil.rmtree(run)
    resolved = {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")}
    write_text_atomic(run / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))


def read_config(run: Path) -> TrainConfig:
    """The settings a run was trained with (its ``config.yaml``)."""
    if not (run / CONFIG_FILE).is_file():
        raise LatexBlendError(f"{run} is not a training run folder (no {CONFIG_FILE})")
    return merge(TrainConfig, load_mapping(run / CONFIG_FILE), source=f"{run}/{CONFIG_FILE}")


def write_run_info(run: Path, info: dict) -> Path:
    return write_text_atomic(run / RUN_FILE, json.dumps(info, indent=2))


# --------------------------------------------------------------------------- weights and checkpoints


def write_weights(folder: Path, kv: dict[str, torch.Tensor], kv_meta: dict[str, str], rows: dict[str, torch.Tensor],
                  rows_meta: dict[str, str]) -> None:
    """``kv.safetensors`` and ``tokens.safetensors`` in ``folder`` (each written atomically, metadata sorted:
    identical runs give identical bytes)."""
    for name, tensors, meta in ((KV_FILE, kv, kv_meta), (TOKENS_FILE, rows, rows_meta)):
        save_safetensors({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, folder / name, meta)


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(kv tensors, identifier rows)`` of a run folder or checkpoint."""

    return tuple(read_safetensors(folder / name, "weights file")[0] for name in (KV_FILE, TOKENS_FILE))


def checkpoint_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step}"


def write_checkpoint(run: Path, step: int, write, optimizer_state: dict, cfg: TrainConfig) -> Path:
    """``checkpoints/step_<step>/``: ``write(folder)`` writes the weights, then the optimizer state and
    ``state.json`` (the step, the settings a step depends on and their hash). Built in a temporary folder and
    renamed, so a checkpoint is complete or absent."""

    final = checkpoint_path(run, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    state = {"step": step, "config_hash": config_hash(cfg), "settings": hashed_settings(cfg)}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``run`` (``keep`` 0: keep all); returns the deleted."""
    steps = _checkpoints(run, complete=False)
    old = steps[:-keep] if keep else []
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def read_state(folder: Path, cfg: TrainConfig) -> int:
    """The step of checkpoint ``folder``; refused, naming the settings that differ, when it was written with
    other settings than ``cfg``'s (:func:`hashed_settings`)."""
    state = load_data(folder / STATE_FILE, "checkpoint state", MAX_SETTINGS_BYTES)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "config_hash" not in state:
        raise LatexBlendError(f"{folder / STATE_FILE} is damaged (no step or config_hash); resume from another "
                              "checkpoint")
    if state["config_hash"] != config_hash(cfg):
        recorded, ours = state.get("settings"), hashed_settings(cfg)
        if isinstance(recorded, dict):
            names = sorted(k for k in {*recorded, *ours} if recorded.get(k) != ours.get(k))
            changed = ", ".join(f"{k} {shown(recorded.get(k), 30)} -> {shown(ours.get(k), 30)}" for k in names)
        else:
            changed = "this checkpoint does not record which"
        raise LatexBlendError(f"{folder} was written with other training settings ({changed}); resume with the "
                              f"settings of its run's {CONFIG_FILE}, or pass --overwrite to start again")
    return state["step"]


def read_checkpoint(folder: Path, cfg: TrainConfig) -> tuple[int, dict, dict, dict]:
    """``(step, kv tensors, identifier rows, optimizer state)``; refuses a checkpoint of other settings."""
    step = read_state(folder, cfg)
    kv, rows = read_weights(folder)
    try:
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, or holding more than tensors: all mean a damaged checkpoint
        raise LatexBlendError(f"{folder / OPTIMIZER_FILE} cannot be read ({type(err).__name__}); resume from "
                              "another checkpoint") from None
    return step, kv, rows, optimizer


def checkpoint_folder(run: Path, checkpoint: int | None) -> Path:
    """The run folder itself (final weights) or ``checkpoints/step_<N>``; refused, naming the missing
    file(s), when its weights are incomplete."""
    folder = run if checkpoint is None else checkpoint_path(run, checkpoint)
    missing = [name for name in (KV_FILE, TOKENS_FILE) if not (folder / name).is_file()]
    if missing:
        what = "final weights (the run did not finish; pass --checkpoint N)" if checkpoint is None else \
            f"checkpoint {checkpoint}"
        raise LatexBlendError(f"{run} has no {what}: {' and '.join(str(folder / m) for m in missing)} missing")
    return folder


def kv_metadata(path: Path) -> dict:
    """The safetensors metadata of a ``kv.safetensors`` (kind ``full`` or ``lora``, layers, fingerprint...)."""

    return read_safetensors(path, "weights file", tensors=False)[1]


def kv_weights(path: Path, base_unet=None) -> tuple[dict, dict]:
    """``({layer: (W_k, W_v)}, metadata)`` from a ``kv.safetensors`` (full weights or LoRA factors; LoRA
    needs ``base_unet`` for ``W0``)."""

    tensors, meta = read_safetensors(path, "weights file")
    layers = parse_json(meta.get("layers") or "null", f"{path}: metadata layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(x, str) for x in layers)):
        raise LatexBlendError(f"{path}: metadata layers must be a list of layer names")
    layers = layers or list(dict.fromkeys(k.split(".to_")[0] for k in tensors))
    kind = meta.get("kind")
    names = ("lora_A", "lora_B") if kind == "lora" else ("weight",)
    missing = [f"{layer}.{proj}.{n}" for layer in layers for proj in ("to_k", "to_v") for n in names
               if f"{layer}.{proj}.{n}" not in tensors]
    if missing or not layers:
        what = f"{missing[0]!r} missing" if missing else "no layers"
        raise LatexBlendError(f"{path} does not hold latexblend to_k/to_v weights: {what} (a damaged or foreign file)")
    if kind != "lora":
        return {layer: (tensors[f"{layer}.to_k.weight"], tensors[f"{layer}.to_v.weight"]) for layer in layers}, meta

    if base_unet is None:
        raise LatexBlendError(f"{path} holds LoRA factors; the base UNet is needed to merge them")
    mods = attn2_modules(base_unet)

    def merged(layer: str, proj: str):
        w0 = getattr(mods[layer], proj).weight.detach().cpu()
        return merge_lora(w0, tensors[f"{layer}.{proj}.lora_A"], tensors[f"{layer}.{proj}.lora_B"])

    return {layer: (merged(layer, "to_k"), merged(layer, "to_v")) for layer in layers}, meta


# --------------------------------------------------------------------------- re-extraction (Stage 2 of a run)


def check_base_model(run: Path, model: str, kv_path: Path, meta: dict, base_unet=None) -> None:
    """The weights in ``kv_path`` were trained on ``model`` as it is now: the base fingerprint they record
    matches the model's (read from its weights file, or ``base_unet``). Otherwise the bank would carry the
    model's name over rows of another model, and fail only later, at verify or generate."""
    recorded = meta.get("base_fingerprint")
    if not recorded:
        raise LatexBlendError(f"{kv_path} records no base_fingerprint: not the weights of a latexblend run")
    theirs = Fingerprint.from_json(recorded, f"{kv_path}: metadata base_fingerprint")
    layers = parse_json(meta.get("layers") or "[]", f"{kv_path}: metadata layers")
    if base_unet is not None:
        ours = fingerprint(base_unet)
    elif isinstance(layers, list) and len(layers) == len(theirs.norms):
        ours = model_fingerprint(model, [str(layer) for layer in layers])
    else:
        ours = fingerprint(load_unet_and_tokenizer(model)[0])
    if not theirs.matches(ours):
        raise LatexBlendError(f"{run} was trained on another base model than '{model}' as it is now (fingerprint "
                              f"{theirs.digest} in {kv_path.name}, {ours.digest} for '{model}'): a bank made now "
                              f"would not fit the model; set 'model' in {run / CONFIG_FILE} to the model it was "
                              "trained on")


def extract_run(run: str | Path, checkpoint: int | None = None, prompt: str | None = None,
                out: str | Path | None = None, device: str | None = None, dtype: str = "auto",
                overwrite: bool = False) -> tuple:
    """Re-extract a trained run (``runs/<name>``) into the bank. Returns ``(bank, path)``. An existing bank
    file is replaced only with ``overwrite``."""
    run = Path(run)
    cfg = read_config(run)
    folder = checkpoint_folder(run, checkpoint)
    path = Path(out) if out else bank_dir(cfg.bank_dir) / f"{cfg.name}{SUFFIX}"
    if path.exists() and not overwrite:
        raise LatexBlendError(f"{path} already exists; pass --overwrite to replace it, or --out FILE")
    if path.is_dir():
        raise LatexBlendError(f"{path} is a folder; --out names the bank file to write")
    check_output_folder(path.parent, "bank folder")  # before any model loads
    device = resolve_device(device)
    rows_dtype = bank_dtype(dtype, device, None)  # a bad --dtype is refused before anything loads
    meta = kv_metadata(folder / KV_FILE)
    base_unet = load_unet_and_tokenizer(cfg.model, device="cpu")[0] if meta.get("kind") == "lora" else None
    weights, meta = kv_weights(folder / KV_FILE, base_unet)
    check_base_model(run, cfg.model, folder / KV_FILE, meta, base_unet)
    weights = {k: (wk.to(device), wv.to(device)) for k, (wk, wv) in weights.items()}
    tokenizers, encoders = load_text_side(cfg.model, device, "fp32")
    token_id = set_identifier_rows(tokenizers, encoders, folder / TOKENS_FILE, cfg.token, cfg.init_token)
    prompt = prompt or cfg.extract_prompt.format(token=cfg.token, noun=cfg.class_noun)
    training = parse_json(meta.get("training") or "{}", f"{folder / KV_FILE}: metadata training")
    if not isinstance(training, dict):
        raise LatexBlendError(f"{folder / KV_FILE}: metadata training must be a JSON object")
    training["checkpoint"] = "final" if checkpoint is None else checkpoint
    bank = extract_bank(tokenizers, encoders, weights, name=cfg.name, class_noun=cfg.class_noun, token_id=token_id,
                        prompt=prompt, base_model=cfg.model, fingerprint=meta["base_fingerprint"],
                        training=training, dtype=rows_dtype)
    return bank, save_bank(bank, path)
