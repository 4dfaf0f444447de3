"""Bad inputs and the one line each must give: the single list behind ``tests/test_errors.py`` and
``docs/ERRORS.md`` (written by ``python scripts/errors_doc.py``; a test checks that the file is current).

A case builds its inputs in a fresh folder (``make(tmp, patch)``, ``patch`` a pytest ``MonkeyPatch``)
and returns the command line. ``message`` is the whole expected output: ``{tmp}`` stands for that
folder, ``…`` for any text. Every case must print exactly that one ``error:`` line, exit with ``code``,
show no traceback, and leave the paths in ``absent`` unwritten.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # what class of problem it is: a key of KINDS
    bad_input: str  # what the user did, in words
    make: Callable  # (tmp: Path, patch) -> list[str], the command line after `latexblend`
    message: str
    code: int = 2
    absent: tuple[str, ...] = ()  # paths under tmp that must not exist afterwards
    program: str = "latexblend"  # or "benchmarks" (``python -m benchmarks``)


# --------------------------------------------------------------------------- input builders


def write_png(path: Path, value: int = 128, size: int = 64) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 40, 200)).save(path)
    return path


def png_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims ``side`` x ``side`` pixels (10 gigapixels), a few dozen bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_bank(path: Path, name: str = "corgi", fill: float = 0.5, **meta: str) -> Path:
    """A bank file of two layers ``[2, 8]`` with every value ``fill``; ``meta`` overrides metadata fields."""
    import torch
    from safetensors.torch import save_file

    metadata = {"format": "latexblend-bank", "format_version": "1", "name": name, "class_noun": "dog",
                "noun_token_ids": "[1929]", "num_tokens": "2", "dtype": "float32", "training": "{}", **meta}
    tensors = {f"layer{i}.attn2.{kv}": torch.full((2, 8), fill) for i in range(2) for kv in ("k", "v")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def scaled_bank(path: Path, factor: float) -> Path:
    """A bank of the tiny model (its own fingerprint) with random rows multiplied by ``factor``."""
    import torch

    from latexblend.bank.format import ConceptBank, save_bank
    from latexblend.models import attn2_shapes, fingerprint, load_unet_and_tokenizer

    unet, _ = load_unet_and_tokenizer("tiny")
    g = torch.Generator().manual_seed(0)
    rows = {n: (factor * torch.randn(2, c, generator=g), factor * torch.randn(2, c, generator=g))
            for n, c in attn2_shapes(unet).items()}
    bank = ConceptBank(name="corgi", class_noun="dog", noun_ids=[1929], k={n: r[0] for n, r in rows.items()},
                       v={n: r[1] for n, r in rows.items()}, base_model="tiny",
                       fingerprint=fingerprint(unet).to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_bank(bank, path)


def concept_yaml(tmp: Path, text: str, name: str = "rex") -> list[str]:
    """A concept file (with images) holding ``text``; returns the train arguments that read it."""
    write_png(tmp / "images" / "a.png")
    (tmp / "concepts").mkdir(exist_ok=True)
    (tmp / "concepts" / f"{name}.yaml").write_text(f"images: {tmp / 'images'}\nclass_noun: dog\n{text}\n")
    return ["train", "--concept", name, "--concepts-dir", str(tmp / "concepts"), "--no-prior",
            "--runs-dir", str(tmp / "runs"), "--bank-dir", str(tmp / "banks")]


def train_flags(tmp: Path, *extra: str) -> list[str]:
    write_png(tmp / "images" / "a.png")
    return ["train", "--images", str(tmp / "images"), "--class-noun", "dog", "--name", "rex", "--no-prior",
            "--runs-dir", str(tmp / "runs"), "--bank-dir", str(tmp / "banks"), *extra]


def fake_run(tmp: Path, files: tuple[str, ...] = ("kv.safetensors", "tokens.safetensors")) -> Path:
    """A run folder with a valid config.yaml and placeholder weight files."""
    run = tmp / "runs" / "rex"
    run.mkdir(parents=True)
    config = {"name": "rex", "images": str(tmp / "images"), "class_noun": "dog", "bank_dir": str(tmp / "banks")}
    (run / "config.yaml").write_text(json.dumps(config))
    for name in files:
        (run / name).write_bytes(b"placeholder")
    return run


def foreign_kv_run(tmp: Path) -> Path:
    """A run folder whose ``kv.safetensors`` is a valid safetensors file of other tensors."""
    import torch
    from safetensors.torch import save_file

    run = fake_run(tmp, files=("tokens.safetensors",))
    save_file({"foo": torch.zeros(2, 2)}, str(run / "kv.safetensors"))
    return run


def other_model_run(tmp: Path) -> Path:
    """A run folder of the tiny model whose kv.safetensors was trained on another base model (its recorded
    fingerprint is the toy model's)."""
    from safetensors.torch import save_file

    from latexblend.models import attn2_modules, fingerprint, load_unet_and_tokenizer

    tiny, toy = load_unet_and_tokenizer("tiny")[0], load_unet_and_tokenizer("toy")[0]
    import torch

    run = fake_run(tmp, files=())
    save_file({"text_encoder": torch.zeros(32), "text_encoder_2": torch.zeros(32)}, str(run / "tokens.safetensors"))
    layers = list(attn2_modules(tiny))
    tensors = {f"{n}.{p}.weight": getattr(m, p).weight.detach().contiguous() for n, m in attn2_modules(tiny).items()
               for p in ("to_k", "to_v")}
    fp = fingerprint(toy).norms
    meta = {"kind": "full", "rank": "0", "layers": json.dumps(layers), "training": "{}",
            "base_fingerprint": json.dumps(list(fp[:1]) * len(layers))}
    save_file(tensors, str(run / "kv.safetensors"), metadata=meta)
    return run


def damaged_tiny_cache(tmp: Path, patch) -> Path:
    """A latexblend home whose cached tiny model has a truncated UNet weights file; returns the cache folder."""
    import shutil

    from latexblend.models import tiny_model_dir

    folder = tmp / "home" / tiny_model_dir().name
    shutil.copytree(tiny_model_dir(), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    patch.setenv("LATEXBLEND_HOME", str(tmp / "home"))
    return folder


def checkpointed_run(tmp: Path) -> list[str]:
    """A run folder whose checkpoint step_1 was written with `train_flags(tmp)` at lr 1e-5; returns the command
    that resumes it at lr 2e-5."""
    from latexblend.config import train_settings
    from latexblend.train.runfolder import config_hash, hashed_settings

    args = train_flags(tmp, "--steps", "3")
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    cfg = train_settings(None, tmp, {"name": "rex", "images": flags["--images"], "class_noun": "dog",
                                     "use_prior": False, "lr": 1e-5})
    run = fake_run(tmp, files=())
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    state = {"step": 1, "config_hash": config_hash(cfg), "settings": hashed_settings(cfg)}
    (run / "checkpoints" / "step_1" / "state.json").write_text(json.dumps(state))
    return [*args, "--resume", "latest", "--lr", "2e-5"]


class _Payload:  # a pickle that would run a (harmless) command if it were unpickled without weights_only
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def release_pt(tmp: Path, content) -> list[str]:
    """A release-style ``.pt`` (``content``: bytes written as they are, or an object for ``torch.save``);
    returns the ``bank import`` command line for it."""
    import torch

    path = tmp / "release.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return ["bank", "import", str(path), "--class-noun", "dog", "--dir", str(tmp / "banks")]


def _entry(k=None, v=None) -> dict:
    import torch

    return {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor":
            {"k": torch.zeros(2, 8) if k is None else k, "v": torch.zeros(2, 8) if v is None else v}}


def no_cuda(patch) -> None:
    import torch

    patch.setattr(torch.cuda, "is_available", lambda: False)


def busy_out(tmp: Path) -> list[str]:
    """An output folder locked by a live process (this test's parent) that is not this one."""
    import os

    (tmp / "out").mkdir()
    (tmp / "out" / ".latexblend.lock").write_text(f"{os.getppid()}\n")
    return _generate(tmp)


def locked_out(tmp: Path, **record) -> list[str]:
    """An output folder locked by ``record`` (a latexblend lock file's JSON: pid, host, started, ...)."""
    (tmp / "out").mkdir()
    (tmp / "out" / ".latexblend.lock").write_text(json.dumps(record))
    return _generate(tmp)


def no_model(patch) -> None:
    """Loading a model fails the test: the case must be refused before any model loads."""
    def refuse(*args, **kwargs):
        raise RuntimeError("a model was loaded before the input was checked")

    for module in ("latexblend.blend.generate", "latexblend.train.setup"):
        patch.setattr(f"{module}.load_pipeline", refuse)


def _prior(tmp: Path, *extra: str) -> list[str]:
    return ["prior", "--class-noun", "dog", "--num", "1", "--out", str(tmp / "prior"), *extra]


def alias_bomb(path: Path, prefix: str = "") -> Path:
    """A "billion laughs" YAML of a few hundred bytes: nine levels of nine aliases, 9**9 strings expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prefix + "\n".join(lines) + "\nprompts: [*a8]\n")
    return path


def deep_json(path: Path, depth: int = 100_000, mapping: bool = True) -> Path:
    """JSON nested ``depth`` levels deep (objects ``{"a": ...}``, or lists ``[[...]]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"a": ' * depth + "1" + "}" * depth if mapping else "[" * depth + "]" * depth)
    return path


def fifo(path: Path) -> Path:
    """A named pipe: reading it would wait for a writer forever."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _generate(tmp: Path, *extra: str) -> list[str]:
    return ["generate", "-p", "a dog on the grass", "--steps", "2", "--out", str(tmp / "out"), *extra]


# --------------------------------------------------------------------------- the cases

_TYPE_CASES = [
    Case("yaml-steps-word", "types", "concept YAML `steps: \"many\"`", lambda t, p: concept_yaml(t, 'steps: "many"'),
         "error: training setting steps = 'many' (str): expected an integer", absent=("runs", "banks")),
    Case("yaml-lr-word", "types", "concept YAML `lr: fast`", lambda t, p: concept_yaml(t, "lr: fast"),
         "error: training setting lr = 'fast' (str): expected a number", absent=("runs", "banks")),
    Case("yaml-steps-fraction", "types", "concept YAML `steps: 2.5`", lambda t, p: concept_yaml(t, "steps: 2.5"),
         "error: training setting steps = 2.5 (float): expected an integer", absent=("runs", "banks")),
    Case("yaml-name-number", "types", "concept YAML `name: 42`", lambda t, p: concept_yaml(t, "name: 42"),
         "error: training setting name = 42 (int): expected a string", absent=("runs", "banks")),
    Case("yaml-switch-word", "types", "concept YAML `use_prior: maybe`",
         lambda t, p: concept_yaml(t, "use_prior: maybe"),
         "error: training setting use_prior = 'maybe' (str): expected true or false", absent=("runs", "banks")),
    Case("set-lr-word", "types", "`train --set lr=abc`", lambda t, p: train_flags(t, "--set", "lr=abc"),
         "error: training setting lr = 'abc' (str): expected a number", absent=("runs", "banks")),
    Case("set-shrink-range", "types", "`train --set augment_shrink=1.5`",
         lambda t, p: train_flags(t, "--set", "augment_shrink=1.5"),
         "error: augment_shrink must be in [0, 1], got 1.5", absent=("runs", "banks")),
    Case("set-broken-yaml", "types", "`train --set 'lr=[1,'`", lambda t, p: train_flags(t, "--set", "lr=[1,"),
         "error: --set lr=[1,: '[1,' is not a valid value (while parsing a flow node)", absent=("runs", "banks")),
    Case("cc101-dir-number", "types", "CustomConcept101 `dataset.json` with `instance_data_dir: 42`",
         lambda t, p: (t / "dataset.json").write_text(json.dumps([{"instance_data_dir": 42, "class_prompt": "cat",
                                                                    "prompt_filename": "p.txt"}]))
         and ["cc101", "jobs", "--root", str(t), "--out", str(t / "jobs.json"), "--concepts", "all"],
         "error: dataset.json[0]: instance_data_dir must be a string, got 42", absent=("jobs.json",)),
    Case("release-json-count-word", "types", "authors' inference JSON with `concept_num: \"two\"`",
         lambda t, p: (t / "inference.json").write_text(json.dumps([{"prompt": "a dog", "concept_num": "two"}]))
         and ["generate", "--config", str(t / "inference.json"), "--out", str(t / "out")],
         "error: {tmp}/inference.json: concept_num must be a whole number, got 'two'", absent=("out",)),
    Case("generate-yaml-list-of-numbers", "types", "generate `--config` with `prompts: [1, 2]`",
         lambda t, p: (t / "g.yaml").write_text("prompts: [1, 2]\n") and ["generate", "--config", str(t / "g.yaml")],
         "error: generate setting prompts = [1, 2] (list): expected a list of strings"),
]

_LOCK_CASES = [
    Case("out-in-use", "locks", "`generate --out DIR` while another generate writes into DIR", lambda t, p: busy_out(t),
         "error: {tmp}/out is in use by another generate (pid …); wait for it to finish or choose another folder; if "
         "no such run is active, delete {tmp}/out/.latexblend.lock"),
]

_LOCK_CASES += [
    Case("out-locked-on-other-host", "locks", "`generate --out DIR` while a run on another host (shared file system) "
         "holds DIR, its pid dead here (used to be taken over)",
         lambda t, p: locked_out(t, pid=2**22 + 17, host="node-other-7", started="2026-12-04 10:00:00 UTC"),
         "error: {tmp}/out is in use by another generate (pid 4194321 on host node-other-7, since 2026-12-04 "
         "10:00:00 UTC); wait for it to finish or choose another folder; if no such run is active, delete "
         "{tmp}/out/.latexblend.lock"),
    Case("out-lock-not-a-lock", "locks", "`generate --out DIR` whose lock file holds no pid",
         lambda t, p: (t / "out").mkdir() or (t / "out" / ".latexblend.lock").write_text("hello")
         and _generate(t),
         "error: {tmp}/out/.latexblend.lock is not a latexblend lock file (it holds no pid); delete it if no run is "
         "writing into {tmp}/out"),
]

_NONFINITE_CASES = [
    Case("cfg-nan", "non-finite", "`generate --cfg nan`", lambda t, p: _generate(t, "--cfg", "nan"),
         "error: generate setting cfg = nan: expected a finite number", absent=("out",)),
    Case("cfg-inf", "non-finite", "`generate --cfg inf`", lambda t, p: _generate(t, "--cfg", "inf"),
         "error: generate setting cfg = inf: expected a finite number", absent=("out",)),
    Case("prior-cfg-nan", "non-finite", "`prior --cfg nan`", lambda t, p: _prior(t, "--cfg", "nan"),
         "error: --cfg must be in [0, 100], got nan", absent=("prior",)),
    Case("train-lr-inf", "non-finite", "`train --lr inf`", lambda t, p: train_flags(t, "--lr", "inf"),
         "error: training setting lr = inf: expected a finite number", absent=("runs", "banks")),
    Case("yaml-lr-nan", "non-finite", "concept YAML `lr: .nan`", lambda t, p: concept_yaml(t, "lr: .nan"),
         "error: training setting lr = nan: expected a finite number", absent=("runs", "banks")),
    Case("bank-nan-generate", "non-finite", "`generate` with a bank holding NaN",
         lambda t, p: _generate(t, "--concepts", str(write_bank(t / "b" / "corgi.safetensors", fill=float("nan")))),
         "error: bank 'corgi', layer layer0.attn2: holds NaN or infinite values (a diverged training or a damaged "
         "file); retrain or re-extract it", absent=("out",)),
    Case("bank-inf-verify", "non-finite", "`bank verify` of a bank holding Inf",
         lambda t, p: ["bank", "verify", str(write_bank(t / "corgi.safetensors", fill=float("inf")))],
         "error: bank 'corgi', layer layer0.attn2: holds NaN or infinite values (a diverged training or a damaged "
         "file); retrain or re-extract it"),
]

_NAME_CASES = [
    Case("bank-name-escapes", "names", "a bank whose metadata name is `../../../escaped` (`generate --save-maps`)",
         lambda t, p: _generate(t, "--save-maps", "--concepts",
                                str(write_bank(t / "b" / "x.safetensors", name="../../../escaped"))),
         "error: {tmp}/b/x.safetensors: bank name '../../../escaped' is not allowed: use letters, digits, '_', "
         "'-' and '.', starting with a letter or digit (at most 100 characters)", absent=("out",)),
    Case("prior-noun-path", "names", "`prior --class-noun ../../escaped` (the noun names the default folder)",
         lambda t, p: ["prior", "--class-noun", "../../escaped", "--num", "1"],
         "error: class noun (the default prior folder's name; pass a folder to use another) '../../escaped' is not "
         "allowed: use letters, digits, spaces, '_', '-' and '.', starting with a letter or digit (at most 100 "
         "characters)", absent=("reg_data",)),
    Case("cc101-job-name-path", "names", "a cc101 jobs file whose job name is `../../escaped`",
         lambda t, p: (t / "jobs.json").write_text(json.dumps([{
             "name": "../../escaped", "concepts": ["cat"], "prompts": ["a cat"], "references": {},
             "out": str(t / "samples" / "x")}])) and ["cc101", "run", "--jobs", str(t / "jobs.json"), "--no-evaluate"],
         "error: {tmp}/jobs.json: job 0 name part '../../escaped' is not allowed: use letters, digits, '_', '-' and "
         "'.', starting with a letter or digit (at most 100 characters)", absent=("samples",)),
    Case("yaml-name-path", "names", "concept YAML `name: ../../outside`",
         lambda t, p: concept_yaml(t, "name: ../../outside"),
         "error: concept name '../../outside' is not allowed: use letters, digits, '_', '-' and '.', starting with "
         "a letter or digit (at most 100 characters)", absent=("runs", "banks")),
]

_TRACEBACK_CASES = [
    Case("png-bomb", "no traceback", "a PNG decompression bomb among the training images",
         lambda t, p: png_bomb(t / "images" / "bomb.png") and train_flags(t),
         "error: {tmp}/images/bomb.png is refused: too many pixels to decode safely (a decompression bomb?); "
         "… pixels at most", absent=("runs", "banks")),
    Case("device-cuda-on-cpu", "no traceback", "`prior --device cuda` on a machine without CUDA",
         lambda t, p: no_cuda(p) or ["prior", "--class-noun", "dog", "--num", "1", "--device", "cuda",
                                     "--out", str(t / "prior")],
         "error: device 'cuda': this machine has no CUDA GPU that torch … can use; pass --device cpu",
         absent=("prior",)),
    Case("device-bogus", "no traceback", "`prior --device bogus`", lambda t, p: _prior(t, "--device", "bogus"),
         "error: unknown device 'bogus': use cpu, cuda, cuda:N or mps", absent=("prior",)),
    Case("generate-device-cuda-on-cpu", "no traceback", "`generate --device cuda` on a machine without CUDA",
         lambda t, p: no_cuda(p) or _generate(t, "--device", "cuda"),
         "error: device 'cuda': this machine has no CUDA GPU that torch … can use; pass --device cpu", absent=("out",)),
    Case("generate-device-bogus", "no traceback", "`generate --device bogus`",
         lambda t, p: _generate(t, "--device", "bogus"),
         "error: unknown device 'bogus': use cpu, cuda, cuda:N or mps", absent=("out",)),
    Case("prior-steps-0", "no traceback", "`prior --steps 0`", lambda t, p: _prior(t, "--steps", "0"),
         "error: --steps must be in [1, 1000], got 0", absent=("prior",)),
    Case("fp16-on-cpu", "no traceback", "`train --mixed-precision fp16` on a machine without CUDA",
         lambda t, p: no_cuda(p) or train_flags(t, "--mixed-precision", "fp16"),
         "error: mixed precision fp16 needs a CUDA GPU and this machine has none; use auto, no or bf16",
         absent=("runs", "banks")),
    Case("bank-format-version-word", "no traceback", "a bank with `format_version: \"x\"` (`bank inspect`)",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors", format_version="x"))],
         "error: {tmp}/corgi.safetensors: bank metadata format_version is 'x', not a whole number"),
    Case("bank-noun-ids-number", "no traceback", "a bank with `noun_token_ids: 5` (`bank inspect`)",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors", noun_token_ids="5"))],
         "error: {tmp}/corgi.safetensors: bank metadata noun_token_ids must be a non-empty list of token ids"),
    Case("bench-steps-0", "no traceback", "`python -m benchmarks generate --steps 0`",
         lambda t, p: ["generate", "--steps", "0", "--out", str(t / "b.json")],
         "error: --steps must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("bench-repeats-0", "no traceback", "`python -m benchmarks generate --repeats 0`",
         lambda t, p: ["generate", "--repeats", "0", "--out", str(t / "b.json")],
         "error: --repeats must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("bench-modes-steps-0", "no traceback", "`python -m benchmarks modes --steps 0`",
         lambda t, p: ["modes", "--steps", "0", "--out", str(t / "b.json")],
         "error: --steps must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("tiny-model-onto-file", "no traceback", "`tiny-model FILE` (an existing file)",
         lambda t, p: (t / "f").write_text("x") and ["tiny-model", str(t / "f")],
         "error: {tmp}/f is a file, not a folder; choose a new folder"),
]

def farm_clash(tmp: Path) -> list[str]:
    """Two concept files naming their concept 'rex', from different images and class nouns."""
    concept_yaml(tmp, "")
    write_png(tmp / "cats" / "a.png")
    (tmp / "concepts" / "rex2.yaml").write_text(f"name: rex\nimages: {tmp / 'cats'}\nclass_noun: cat\n")
    return ["train", "--concepts-dir", str(tmp / "concepts"), "--index", "1", "--runs-dir", str(tmp / "runs"),
            "--bank-dir", str(tmp / "banks")]


def user_folder(tmp: Path, *names: str) -> Path:
    """A folder of the user's own files."""
    folder = tmp / "mine"
    for name in names:
        write_png(folder / name)
    return folder


def stopped_prior(tmp: Path, complete: bool = False) -> Path:
    """A prior folder of ``prior --class-noun dog`` (seed 0, the tiny model): image 1 of 2 written, or
    (``complete``) the whole of ``--num 1``."""
    folder = tmp / "prior"
    write_png(folder / ("00000.png" if complete else "00001.png"))
    if complete:
        (folder / "captions.txt").write_text("dog\n")
    settings = {"class_noun": "dog", "model": "tiny", "seed": 0, "steps": 50, "cfg": 6.0, "resolution": None}
    (folder / ".latexblend-prior.json").write_text(json.dumps({"settings": settings}))
    return folder


def unfinished_out(tmp: Path) -> list[str]:
    """An output folder left by an interrupted generation of seed 0 (its record of settings and one image)."""
    from latexblend.blend.generate import run_identity
    from latexblend.blend.options import GenerateConfig

    (tmp / "out").mkdir()
    settings = run_identity(GenerateConfig(prompts=["a dog on the grass"], steps=2, seed=0))
    (tmp / "out" / ".latexblend-unfinished.json").write_text(json.dumps({"settings": settings}))
    write_png(tmp / "out" / "p000_s0000000.png")
    return _generate(tmp, "--seed", "5")


_SILENT_CASES = [
    Case("concepts-empty", "silent",
         "`generate --concepts \"\"` (an unset shell variable; used to run without concepts)",
         lambda t, p: _generate(t, "--concepts", ""),
         "error: --concepts '' names no concept; leave the option out to generate without concepts", absent=("out",)),
    Case("concepts-commas", "silent", "`generate --concepts ',,,'`", lambda t, p: _generate(t, "--concepts", ",,,"),
         "error: --concepts ',,,' names no concept; leave the option out to generate without concepts",
         absent=("out",)),
    Case("placeholder-unclosed", "silent", "`generate -p 'a <rex on grass'` (a typo; used to run without concepts)",
         lambda t, p: ["generate", "-p", "a <rex on grass", "--steps", "2", "--out", str(t / "out")],
         "error: prompt 'a <rex on grass' has an unmatched '<' at '<rex': write a concept as <name>", absent=("out",)),
    Case("placeholder-unopened", "silent", "`generate -p 'a rex> on grass'`",
         lambda t, p: ["generate", "-p", "a rex> on grass", "--steps", "2", "--out", str(t / "out")],
         "error: prompt 'a rex> on grass' has an unmatched '>' at 'rex>': write a concept as <name>", absent=("out",)),
    Case("out-holds-user-files", "silent", "`generate --out DIR` where DIR holds the user's own files",
         lambda t, p: _generate(t, "--out", str(user_folder(t, "holiday.png"))),
         "error: {tmp}/mine holds files that latexblend generate did not write (e.g. 'holiday.png'); choose an "
         "empty or new --out"),
    Case("out-holds-user-image-of-our-name", "silent",
         "`generate --out DIR` where DIR holds the user's own `p000_s0000000.png` (used to be written over)",
         lambda t, p: _generate(t, "--out", str(user_folder(t, "p000_s0000000.png"))),
         "error: {tmp}/mine holds images of an unknown generation (e.g. 'p000_s0000000.png'); choose an empty or new "
         "--out"),
    Case("out-unfinished-other-settings", "silent",
         "`generate --out DIR --seed 5` where an interrupted generation of seed 0 left DIR (used to mix the two)",
         lambda t, p: unfinished_out(t),
         "error: {tmp}/out holds an unfinished generation of other settings (different seed); choose another "
         "--out, or delete the folder to start again"),
    Case("train-runs-folder-not-a-run", "silent",
         "`train --runs-dir . --name src` where ./src is not a run folder (used to be deleted and replaced)",
         lambda t, p: (write_png(t / "src" / "keep.png"), p.chdir(t)) and train_flags(t, "--steps", "1")[:-4] + [
             "--runs-dir", ".", "--name", "src", "--bank-dir", str(t / "banks")],
         "error: src exists and is not a training run folder (no config.yaml); latexblend would replace it: "
         "choose another --name or --runs-dir", absent=("banks",)),
    Case("prior-out-holds-user-files", "silent", "`prior --out DIR` where DIR holds the user's own files",
         lambda t, p: _prior(t)[:-2] + ["--out", str(user_folder(t, "holiday.png"))],
         "error: prior folder {tmp}/mine holds files that latexblend prior did not write (e.g. 'holiday.png'); "
         "choose an empty or new --out"),
    Case("prior-out-unrecorded-images", "silent", "`prior --out DIR` where DIR holds the user's own `00000.png` "
         "(used to be kept as the first prior image)",
         lambda t, p: _prior(t)[:-2] + ["--out", str(user_folder(t, "00000.png"))],
         "error: prior folder {tmp}/mine holds images with no record of what made them (.latexblend-prior.json): "
         "they may be another tool's or an earlier run's; choose an empty or new --out"),
    Case("prior-resume-other-seed", "silent", "`prior --seed 5` continuing a stopped run of seed 0 (used to mix "
         "the two)", lambda t, p: (stopped_prior(t), _prior(t, "--seed", "5", "--num", "2"))[1],
         "error: prior folder {tmp}/prior holds images made with other settings (different seed); choose another "
         "--out, or delete the folder to start again"),
    Case("prior-complete-other-seed", "silent", "`prior --seed 5` on a complete prior folder of seed 0 (used to "
         "say 'nothing to do')", lambda t, p: (stopped_prior(t, complete=True), _prior(t, "--seed", "5"))[1],
         "error: prior folder {tmp}/prior holds images made with other settings (different seed); choose another "
         "--out, or delete the folder to start again"),
    Case("extract-other-base-model", "silent", "`extract` of a run whose weights were trained on another base model",
         lambda t, p: ["extract", "--run", str(other_model_run(t))],
         "error: {tmp}/runs/rex was trained on another base model than 'tiny' as it is now (fingerprint … in "
         "kv.safetensors, … for 'tiny'): a bank made now would not fit the model; set 'model' in "
         "{tmp}/runs/rex/config.yaml to the model it was trained on", absent=("banks",)),
    Case("farm-name-clash", "silent", "a farm of two concept files with the same `name` (used to skip the second)",
         lambda t, p: no_model(p) or farm_clash(t),
         "error: concept files rex2.yaml and rex.yaml in {tmp}/concepts all name their concept 'rex' (one run folder "
         "and bank): give each its own name", absent=("runs", "banks")),
    Case("bank-rows-1e30-verify", "silent", "`bank verify` of a bank whose rows were multiplied by 1e30",
         lambda t, p: ["bank", "verify", str(scaled_bank(t / "corgi.safetensors", 1e30))],
         "error: bank 'corgi', layer …: its K rows are … times the norm of this model's own rows of 'a dog' (at most "
         "100): a damaged bank, or one of another model; retrain or re-extract it"),
    Case("bank-rows-1e5-generate", "silent", "`generate` with a bank whose rows were multiplied by 1e5",
         lambda t, p: _generate(t, "--concepts", str(scaled_bank(t / "b" / "corgi.safetensors", 1e5))),
         "error: bank 'corgi', layer …: its K rows are … times the norm of this model's own rows of 'a dog' (at most "
         "100): a damaged bank, or one of another model; retrain or re-extract it", absent=("out",)),
    Case("prior-empty-noun", "silent", "`prior --class-noun \"\"`",
         lambda t, p: ["prior", "--class-noun", "", "--num", "1", "--out", str(t / "prior")],
         "error: class noun is empty: the prior images and their captions would have no subject", absent=("prior",)),
    Case("extract-over-bank", "silent", "`extract` onto an existing bank, without `--overwrite`",
         lambda t, p: (fake_run(t), (t / "banks").mkdir(), (t / "banks" / "rex.safetensors").write_text("x"))
         and ["extract", "--run", str(t / "runs" / "rex")],
         "error: {tmp}/banks/rex.safetensors already exists; pass --overwrite to replace it, or --out FILE"),
    Case("noun-holds-identifier", "silent", "`train --class-noun '<new1> dog'`",
         lambda t, p: ["train", *train_flags(t)[1:], "--class-noun", "<new1> dog"],
         "error: class noun '<new1> dog' holds the identifier <new1>: the class noun names the class (e.g. dog), "
         "the identifier is added in front of it", absent=("runs", "banks")),
]

_IMPORT_CASES = [
    Case("import-pickle-code", "unsafe files", "`bank import` of a .pt whose pickle would run code",
         lambda t, p: release_pt(t, _entry(k=_Payload())),
         "error: {tmp}/release.pt is refused as unsafe: it holds objects other than tensors, which could run code "
         "when loaded; only plain tensor banks are imported", absent=("banks",)),
    Case("import-text", "unsafe files", "`bank import` of a text file", lambda t, p: release_pt(t, b"hello world"),
         "error: {tmp}/release.pt is not a torch.save file (corrupt or another format; KeyError)", absent=("banks",)),
    Case("import-empty", "unsafe files", "`bank import` of an empty file", lambda t, p: release_pt(t, b""),
         "error: {tmp}/release.pt is empty; not a release concept bank", absent=("banks",)),
    Case("import-list-rows", "unsafe files", "`bank import` of a .pt whose k is a list",
         lambda t, p: release_pt(t, _entry(k=[1.0, 2.0])),
         "error: {tmp}/release.pt: entry 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor': k is a "
         "list, not a tensor", absent=("banks",)),
    Case("import-nan", "non-finite", "`bank import` of a .pt holding NaN",
         lambda t, p: release_pt(t, _entry(v=__import__("torch").full((2, 8), float("nan")))),
         "error: bank 'release', layer down_blocks.1.attentions.0.transformer_blocks.0.attn2: holds NaN or infinite "
         "values (a diverged training or a damaged file); retrain or re-extract it", absent=("banks",)),
]

_MESSAGE_CASES = [
    Case("extract-dtype-bogus", "clear message", "`extract --dtype bogus`",
         lambda t, p: ["extract", "--run", str(fake_run(t)), "--dtype", "bogus"],
         "error: unknown dtype 'bogus'; choose one of auto, fp32, fp16, bf16", absent=("banks",)),
    Case("prior-captions-not-utf8", "clear message", "a prior folder whose `captions.txt` is not UTF-8 text",
         lambda t, p: (write_png(t / "prior" / "a.png").with_name("captions.txt").write_bytes(b"\xff\xfe dog")
                       and train_flags(t, "--use-prior", "--prior", str(t / "prior"))),
         "error: prior captions file {tmp}/prior/captions.txt is not UTF-8 text (invalid start byte at byte 0)",
         absent=("runs", "banks")),
    Case("config-json-not-utf8", "clear message", "`generate --config X.json` of a file that is not UTF-8 text",
         lambda t, p: (t / "c.json").write_bytes(b"\xff\xfe[1]") and _generate(t, "--config", str(t / "c.json")),
         "error: config file {tmp}/c.json is not UTF-8 text (invalid start byte at byte 0)", absent=("out",)),
    Case("prompts-file-not-utf8", "clear message", "`generate --prompts-file` of a file that is not UTF-8 text",
         lambda t, p: (t / "p.txt").write_bytes(b"\xff\xfe a dog") and _generate(t, "--prompts-file", str(t / "p.txt")),
         "error: prompts file {tmp}/p.txt is not UTF-8 text (invalid start byte at byte 0)", absent=("out",)),
    Case("model-cache-damaged", "clear message", "a damaged cached tiny model (used to advise `hf download`)",
         lambda t, p: damaged_tiny_cache(t, p) and _generate(t),
         "error: cannot load model 'tiny' from its cache folder {tmp}/home/tiny-sdxl-v1 (…): the cached copy is "
         "damaged; delete that folder and it is built again on next use", absent=("out",)),
    Case("model-folder-damaged", "clear message", "`generate --model DIR` of a damaged local model folder",
         lambda t, p: (t / "m").mkdir() or (t / "m" / "model_index.json").write_text("{}") and _generate(
             t, "--model", str(t / "m")),
         "error: cannot load model folder {tmp}/m (…): it is incomplete or damaged; download or save it again",
         absent=("out",)),
    Case("resume-changed-setting", "clear message", "`train --resume latest --lr 2e-5` of a run trained at 1e-5 "
         "(used to say only 'different training settings', after loading the model)",
         lambda t, p: checkpointed_run(t),
         "error: {tmp}/runs/rex/checkpoints/step_1 was written with other training settings (lr 1e-05 -> 2e-05); "
         "resume with the settings of its run's config.yaml, or pass --overwrite to start again"),
    Case("train-images-file", "clear message", "`train --images FILE` (used to say the folder does not exist)",
         lambda t, p: train_flags(t)[:1] + ["--images", str(write_png(t / "a.png"))] + train_flags(t)[3:],
         "error: instance image folder {tmp}/a.png is a file, not a folder", absent=("runs", "banks")),
    Case("bank-ls-dir-file", "clear message", "`bank ls --dir FILE` (used to say there are no banks)",
         lambda t, p: (t / "f").write_text("x") and ["bank", "ls", "--dir", str(t / "f")],
         "error: bank folder {tmp}/f is a file, not a folder"),
    Case("evaluate-samples-file", "clear message", "`evaluate --samples FILE`",
         lambda t, p: (t / "f").write_text("x") and ["evaluate", "--samples", str(t / "f")],
         "error: samples folder {tmp}/f is a file, not a folder"),
    Case("generate-refused-leaves-no-folder", "clear message",
         "`generate --out NEW` with a bank that does not fit the model",
         lambda t, p: _generate(t, "--concepts", str(write_bank(t / "b" / "corgi.safetensors"))),
         "error: bank 'corgi' does not fit this model: … attn2 layers missing from the bank, 2 bank layers not in "
         "the model (e.g. …)", absent=("out",)),
    Case("extract-foreign-kv", "clear message", "`extract` of a run whose kv.safetensors holds other tensors",
         lambda t, p: ["extract", "--run", str(foreign_kv_run(t))],
         "error: {tmp}/runs/rex/kv.safetensors does not hold latexblend to_k/to_v weights: 'foo.to_k.weight' "
         "missing (a damaged or foreign file)", absent=("banks",)),
    Case("extract-missing-tokens", "clear message", "`extract` of a run whose tokens.safetensors is gone",
         lambda t, p: ["extract", "--run", str(fake_run(t, files=("kv.safetensors",)))],
         "error: {tmp}/runs/rex has no final weights (the run did not finish; pass --checkpoint N): "
         "{tmp}/runs/rex/tokens.safetensors missing", absent=("banks",)),
]

_LIMIT_CASES = [
    Case("negative-prompt-too-long", "silent", "`generate --negative-prompt` of 100 words (used to be cut silently)",
         lambda t, p: _generate(t, "--negative-prompt", " ".join(["blurry"] * 100)),
         "error: negative prompt is 102 tokens, over CLIP's limit of 77: shorten it", absent=("out",)),
    Case("prompt-huge", "limits", "`generate -p` of 100,000 characters",
         lambda t, p: ["generate", "-p", "a dog " * 16_667, "--out", str(t / "out")],
         "error: prompt 0 is 100,002 characters: CLIP reads at most 77 tokens (at most 4,096 characters are "
         "accepted); shorten it", absent=("out",)),
    Case("config-alias-bomb", "limits", "a 400-byte YAML alias bomb (\"billion laughs\") as `generate --config`",
         lambda t, p: _generate(t, "--config", str(alias_bomb(t / "bomb.yaml"))),
         "error: {tmp}/bomb.yaml is refused: it holds more than 100,000 values (aliases expanded)", absent=("out",)),
    Case("concept-alias-bomb", "limits", "a YAML alias bomb as a concept file",
         lambda t, p: concept_yaml(t, alias_bomb(t / "x.yaml").read_text().replace("prompts", "extra")),
         "error: {tmp}/concepts/rex.yaml is refused: it holds more than 100,000 values (aliases expanded)",
         absent=("runs", "banks")),
    Case("set-alias-bomb", "limits", "a 300-byte alias bomb in `train --set`",
         lambda t, p: train_flags(t, "--set", "lr=[&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
             f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]"),
         "error: --set lr=[&a0 …: '[&a0 …' is not a valid value (it holds more than 100,000 values (aliases "
         "expanded))", absent=("runs", "banks")),
    Case("config-json-deep", "limits", "`generate --config` of JSON nested 100,000 deep",
         lambda t, p: _generate(t, "--config", str(deep_json(t / "deep.json"))),
         "error: {tmp}/deep.json is refused: it nests deeper than 64 levels", absent=("out",)),
    Case("release-json-deep", "limits", "an inference JSON (a list) nested 100,000 deep",
         lambda t, p: _generate(t, "--config", str(deep_json(t / "deep.json", mapping=False))),
         "error: release config {tmp}/deep.json is refused: it nests deeper than 64 levels", absent=("out",)),
    Case("config-directory", "limits", "`generate --config DIR`",
         lambda t, p: (t / "cfg").mkdir() or _generate(t, "--config", str(t / "cfg")),
         "error: config file {tmp}/cfg is a directory, not a file", absent=("out",)),
    Case("config-too-large", "limits", "`generate --config` of a 2 MB file",
         lambda t, p: (t / "big.yaml").write_text("#" * 2_000_000) and _generate(t, "--config", str(t / "big.yaml")),
         "error: config file {tmp}/big.yaml is too large (2,000,000 bytes; at most 1,048,576)", absent=("out",)),
    Case("prompts-file-fifo", "limits", "`generate --prompts-file` of a named pipe",
         lambda t, p: _generate(t, "--prompts-file", str(fifo(t / "p.txt"))),
         "error: prompts file {tmp}/p.txt is not a regular file (a device, pipe or socket)", absent=("out",)),
    Case("bank-fifo", "limits", "`bank inspect` of a named pipe",
         lambda t, p: ["bank", "inspect", str(fifo(t / "corgi.safetensors"))],
         "error: {tmp}/corgi.safetensors is not a regular file (a device, pipe or socket); expected a .safetensors "
         "bank file"),
    Case("bank-training-deep", "limits", "a bank whose metadata `training` is JSON nested 100,000 deep",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors",
                                                         training='{"a": ' * 100_000 + "1" + "}" * 100_000))],
         "error: {tmp}/corgi.safetensors: bank metadata training is refused: it nests deeper than 64 levels"),
    Case("samples-metadata-deep", "limits", "`evaluate` of an output folder whose metadata.json is nested 100,000 deep",
         lambda t, p: ["evaluate", "--samples", str(deep_json(t / "s" / "metadata.json").parent)],
         "error: samples metadata {tmp}/s/metadata.json is refused: it nests deeper than 64 levels"),
    Case("cc101-dataset-deep", "limits", "a CustomConcept101 `dataset.json` nested 100,000 deep",
         lambda t, p: ["cc101", "jobs", "--root", str(deep_json(t / "dataset.json", mapping=False).parent),
                       "--out", str(t / "jobs.json"), "--concepts", "all"],
         "error: benchmark file {tmp}/dataset.json is refused: it nests deeper than 64 levels", absent=("jobs.json",)),
]

def many_images(tmp: Path, n: int) -> Path:
    from PIL import Image

    (tmp / "many").mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8)).save(tmp / "many" / f"{i:05d}.png")
    return tmp / "many"


def samples_with(tmp: Path, **entry) -> Path:
    """An output folder whose metadata.json lists one image entry with ``entry``'s fields."""
    (tmp / "s").mkdir()
    meta = {"format": "latexblend-samples", "images": [{"file": "a.png", "prompt": "a dog", **entry}]}
    (tmp / "s" / "metadata.json").write_text(json.dumps(meta))
    return tmp / "s"


_BANK_METADATA_CASES = [
    Case("train-too-many-images", "bounds", "`train --images DIR` of 1,001 images (all are kept in memory)",
         lambda t, p: no_model(p) or train_flags(t)[:1] + ["--images", str(many_images(t, 1001))] + train_flags(t)[3:],
         "error: instance image folder {tmp}/many holds 1,001 images; at most 1,000 are accepted",
         absent=("runs", "banks")),
    Case("samples-prompt-index-word", "no traceback", "`evaluate` of a metadata.json whose `prompt_index` is \"x\"",
         lambda t, p: ["evaluate", "--samples", str(samples_with(t, prompt_index="x"))],
         "error: {tmp}/s/metadata.json: image a.png: prompt_index and seed must be whole numbers"),
    Case("samples-concepts-string", "silent", "`evaluate` of a metadata.json whose `concepts` is a string (used to be "
         "read letter by letter)",
         lambda t, p: ["evaluate", "--samples", str(samples_with(t, concepts="corgi"))],
         "error: {tmp}/s/metadata.json: image a.png: 'concepts' must be a list of names"),
    Case("cc101-job-reference-number", "no traceback", "a cc101 jobs file whose reference folder is a number",
         lambda t, p: (t / "jobs.json").write_text(json.dumps([{
             "name": "cat", "concepts": ["cat"], "prompts": ["a <cat>"], "references": {"cat": 5},
             "out": str(t / "samples" / "cat")}])) and ["cc101", "run", "--jobs", str(t / "jobs.json")],
         "error: {tmp}/jobs.json: job 0 needs a string name and out, lists of strings concepts and prompts, and a "
         "references mapping of names to folders", absent=("samples",)),
    Case("bank-fingerprint-word", "no traceback", "a bank with `base_fingerprint_norms: abc` (`bank inspect`)",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors", base_fingerprint_norms="abc"))],
         "error: {tmp}/corgi.safetensors: bank metadata base_fingerprint_norms is not valid JSON: Expecting value: "
         "line 1 column 1 (char 0)"),
    Case("bank-fingerprint-negative", "no traceback", "a bank with `base_fingerprint_norms: [1, -2]` (`generate`)",
         lambda t, p: _generate(t, "--concepts", str(write_bank(t / "b" / "corgi.safetensors",
                                                                base_fingerprint_norms="[1, -2]"))),
         "error: {tmp}/b/corgi.safetensors: bank metadata base_fingerprint_norms must be a JSON list of weight norms "
         "(numbers >= 0), got '[1, -2]'", absent=("out",)),
]

_BOUND_CASES = [
    Case("generate-num-images-huge", "bounds", "`generate --num-images 1000000000`",
         lambda t, p: _generate(t, "--num-images", "1000000000"),
         "error: num_images must be in [1, 10000], got 1000000000", absent=("out",)),
    Case("generate-images-in-all", "bounds", "`generate` of 20 prompts x 10,000 images",
         lambda t, p: no_model(p) or ["generate", *[a for i in range(20) for a in ("-p", f"a dog {i}")],
                                      "--num-images", "10000", "--out", str(t / "out")],
         "error: 20 prompts x 10,000 images is over 100,000 images in one run; split the prompts over several runs",
         absent=("out",)),
    Case("prior-num-huge", "bounds", "`prior --num 1000000000`", lambda t, p: _prior(t)[:3] + [
        "--num", "1000000000", "--out", str(t / "prior")],
         "error: --num must be in [1, 100000], got 1000000000", absent=("prior",)),
    Case("generate-seed-huge", "bounds", "`generate --seed 2**70`", lambda t, p: _generate(t, "--seed", str(2**70)),
         "error: seed must be in [0, 9223372036854775807], got 1180591620717411303424", absent=("out",)),
    Case("generate-seed-plus-j", "bounds", "`generate --seed 2**63-1 --num-images 2` (image 1 would take seed 2**63)",
         lambda t, p: _generate(t, "--seed", str(2**63 - 1), "--num-images", "2"),
         "error: seed 9223372036854775807 is too large for 2 images (image j uses seed + j): at most "
         "9223372036854775806", absent=("out",)),
    Case("generate-seed-json-float", "bounds", "`\"seed\": 1e30` in a `generate --config` JSON",
         lambda t, p: (t / "c.json").write_text('{"seed": 1e30}') and _generate(t, "--config", str(t / "c.json")),
         "error: seed must be in [0, 9223372036854775807], got 1000000000000000019884624838656", absent=("out",)),
    Case("train-seed-huge", "bounds", "`train --seed 2**70`", lambda t, p: train_flags(t, "--seed", str(2**70)),
         "error: seed must be in [0, 9223372036854775807], got 1180591620717411303424", absent=("runs", "banks")),
    Case("prior-seed-plus-i", "bounds", "`prior --seed 2**63-1 --num 2`",
         lambda t, p: _prior(t)[:3] + ["--num", "2", "--seed", str(2**63 - 1), "--out", str(t / "prior")],
         "error: --seed 9223372036854775807 is too large for 2 images (image j uses --seed + j): at most "
         "9223372036854775806", absent=("prior",)),
    Case("tiny-model-seed-huge", "bounds", "`tiny-model DIR --seed 2**64`",
         lambda t, p: ["tiny-model", str(t / "m"), "--seed", str(2**64)],
         "error: --seed must be in [0, 9223372036854775807], got 18446744073709551616", absent=("m",)),
    Case("train-adam-beta1", "bounds", "`train --set adam_beta1=2`",
         lambda t, p: train_flags(t, "--set", "adam_beta1=2"),
         "error: adam_beta1 must be in [0, 1), got 2.0", absent=("runs", "banks")),
    Case("train-weight-decay", "bounds", "`train --set weight_decay=-1`",
         lambda t, p: train_flags(t, "--set", "weight_decay=-1"),
         "error: weight_decay must be in [0, 100], got -1.0", absent=("runs", "banks")),
    Case("train-adam-eps-0", "bounds", "`train --set adam_eps=0`", lambda t, p: train_flags(t, "--set", "adam_eps=0"),
         "error: adam_eps must be in (0, 1], got 0.0", absent=("runs", "banks")),
    Case("train-steps-huge", "bounds", "`train --steps 10000000000`",
         lambda t, p: no_model(p) or train_flags(t, "--steps", "10000000000"),
         "error: steps must be in [1, 1000000], got 10000000000", absent=("runs", "banks")),
    Case("train-resolution-huge", "bounds", "`train --resolution 1000000`",
         lambda t, p: train_flags(t, "--resolution", "1000000"),
         "error: resolution must be a multiple of 8 in [8, 4096], got 1000000", absent=("runs", "banks")),
    Case("generate-height-huge", "bounds", "`generate --height 100000`",
         lambda t, p: _generate(t, "--height", "100000"),
         "error: height must be a multiple of 8 in [8, 4096], got 100000", absent=("out",)),
    Case("generate-cfg-huge", "bounds", "`generate --cfg 1e9`", lambda t, p: _generate(t, "--cfg", "1e9"),
         "error: cfg must be in [0, 100], got 1000000000.0", absent=("out",)),
]

_EARLY_CASES = [
    Case("train-bank-dtype", "checked before work", "`train --set bank_dtype=int8` (used to be refused after training)",
         lambda t, p: no_model(p) or train_flags(t, "--set", "bank_dtype=int8"),
         "error: bank_dtype must be one of auto, fp32, fp16, bf16, float32, float16, bfloat16, got 'int8'",
         absent=("runs", "banks")),
    Case("train-extract-prompt-field", "checked before work",
         "`train --set \"extract_prompt='a {token} {noun} {x}'\"` (used to be refused after training)",
         lambda t, p: no_model(p) or train_flags(t, "--set", "extract_prompt='a {token} {noun} {x}'"),
         "error: extract_prompt 'a {token} {noun} {x}' may hold only the fields {token} and {noun} (write {{ and }} "
         "for braces): KeyError 'x'", absent=("runs", "banks")),
    Case("train-bank-dir-file", "checked before work", "`train --bank-dir FILE` (used to be refused after training)",
         lambda t, p: (t / "f").write_text("x") and train_flags(t, "--steps", "1")[:-2] + ["--bank-dir", str(t / "f")],
         "error: bank folder {tmp}/f is a file, not a folder", absent=("runs",)),
    Case("train-bank-dir-under-file", "checked before work", "`train --bank-dir FILE/sub`",
         lambda t, p: (t / "f").write_text("x") and train_flags(t, "--steps", "1")[:-2] + [
             "--bank-dir", str(t / "f" / "sub")],
         "error: bank folder {tmp}/f/sub is not a folder ({tmp}/f is a file); choose another", absent=("runs",)),
    Case("train-bank-file-is-folder", "checked before work", "`train` whose bank file path is a folder",
         lambda t, p: (t / "banks" / "rex.safetensors").mkdir(parents=True) or train_flags(t, "--steps", "1"),
         "error: {tmp}/banks/rex.safetensors is a folder, so the bank cannot be written there; move it or choose "
         "another --name", absent=("runs",)),
    Case("train-runs-dir-file", "checked before work", "`train --runs-dir FILE`",
         lambda t, p: (t / "f").write_text("x") and train_flags(t, "--steps", "1", "--runs-dir", str(t / "f")),
         "error: runs folder {tmp}/f is not a folder; choose another", absent=("banks",)),
    Case("train-extract-prompt-order", "checked before work",
         "`train --set \"extract_prompt='a {noun} of {token}'\"` (the noun must follow the identifier)",
         lambda t, p: train_flags(t, "--steps", "1", "--set", "extract_prompt='a {noun} of {token}'"),
         "error: extract_prompt 'a dog of <new1>' cannot be used: the class noun 'dog' (tokens [1929]) does not follow "
         "its slot in the tokenized prompt 'a dog of <new1>' (…); choose a plain class noun", absent=("runs", "banks")),
    Case("extract-out-folder", "checked before work", "`extract --out DIR --overwrite` (used to end in a traceback "
         "after the extraction)",
         lambda t, p: (t / "d").mkdir() or ["extract", "--run", str(fake_run(t)), "--out", str(t / "d"),
                                            "--overwrite"],
         "error: {tmp}/d is a folder; --out names the bank file to write"),
    Case("prior-out-unwritable", "checked before work", "`prior --out FILE/sub` (used to load the model first)",
         lambda t, p: (t / "f").write_text("x") and _prior(t)[:-2] + ["--out", str(t / "f" / "sub")],
         "error: prior folder {tmp}/f/sub is not a folder ({tmp}/f is a file); choose another"),
    Case("generate-scheduler-bogus", "checked before work",
         "`generate --scheduler bogus` (used to load the model first)",
         lambda t, p: no_model(p) or _generate(t, "--scheduler", "bogus"),
         "error: unknown scheduler 'bogus'; choose default, euler, euler_a, ddim, dpmpp_2m, unipc", absent=("out",)),
    Case("generate-dtype-bogus", "checked before work", "`generate --dtype fp8`",
         lambda t, p: no_model(p) or _generate(t, "--dtype", "fp8"),
         "error: unknown dtype 'fp8'; choose one of auto, fp32, fp16, bf16", absent=("out",)),
]

CASES: list[Case] = [
    *_EARLY_CASES, *_BOUND_CASES, *_LIMIT_CASES, *_BANK_METADATA_CASES, *_NAME_CASES, *_LOCK_CASES,
    *_NONFINITE_CASES, *_TYPE_CASES, *_TRACEBACK_CASES, *_SILENT_CASES, *_IMPORT_CASES, *_MESSAGE_CASES]


# --------------------------------------------------------------------------- the document

#: The classes of bad input, in the order the document lists them.
KINDS = {
    "names": "a name that becomes part of a path",
    "locks": "a folder another run holds",
    "bounds": "a count, seed or setting outside its range",
    "limits": "a file too large, too deep or of the wrong kind (YAML alias bombs, devices, folders)",
    "non-finite": "NaN or infinite numbers",
    "types": "a setting of the wrong type",
    "checked before work": "a problem found before any model loads or any step runs",
    "silent": "what would otherwise give a wrong result without a word",
    "unsafe files": "files that could run code or are not what they claim",
    "no traceback": "what used to end in a traceback",
    "clear message": "what used to give a misleading message",
}

#: Behaviours that are not one error line, tested where they live.
BEHAVIOURS = [
    ("limits", "YAML aliases are counted expanded, JSON by size and depth, pipes and folders refused",
     "tests/test_fileio.py::test_documents_are_read_within_limits"),
    ("bounds", "the toy drawing scripts bound their counts", "tests/test_synthetic.py::test_drawing_scripts_bound_"
     "their_counts"),
    ("bounds", "memory stays flat over guided calls",
     "tests/test_guidance.py::test_memory_is_flat_over_many_guided_calls"),
    ("locks", "a lock records host and start time; a reused pid is not a live run; another host's lock is kept",
     "tests/test_fileio.py::test_a_lock_records_host_and_start_and_a_reused_pid_is_not_a_live_run"),
    ("checked before work", "a bank that fails to be written keeps the weights and says how to finish "
     "(`extract --run`)", "tests/test_train.py::test_a_bank_that_fails_to_be_written_keeps_the_weights_and_says_"
     "how_to_finish"),
    ("silent", "bank rows over 100 times the model's own are refused by verify and every Blender",
     "tests/test_generate.py::test_bank_rows_far_larger_than_the_models_own_are_refused"),
    ("no traceback", "a process of a multi-process generate failing while sampling stops every process with one "
     "line; a re-run finishes the folder",
     "tests/test_generate.py::test_a_process_failing_while_sampling_stops_the_others"),
    ("silent", "an image holding NaN is an error and the folder is not marked finished",
     "tests/test_generate.py::test_an_image_holding_nan_is_an_error_and_the_folder_is_not_finished"),
    ("silent", "an interrupted generation is continued only with the same settings",
     "tests/test_generate.py::test_an_interrupted_generation_is_continued_only_with_the_same_settings"),
    ("silent", "two concept files of one name are an error in a farm, not a skip",
     "tests/test_farm.py::test_two_concept_files_of_one_name_are_an_error_not_a_skip"),
    ("silent", "an unmatched placeholder is an error", "tests/test_tokens.py::test_an_unmatched_placeholder_is_an_"
     "error"),
    ("silent", "a 16-bit PNG is scaled, not read as white",
     "tests/test_train.py::test_deep_greyscale_images_are_scaled_not_clipped_to_white"),
    ("silent", "a run stopped before its first checkpoint starts again, the newest `--keep-checkpoints` are kept, "
               "identical runs write identical files",
     "tests/test_train.py::test_a_run_stopped_before_its_first_checkpoint_starts_again_and_identical_runs_give_"
     "identical_files, tests/test_fileio.py, tests/test_bank.py"),
    ("no traceback", "one bank with a malformed metadata field is listed as unreadable by `bank ls`; inspect and "
     "verify refuse it in one line", "tests/test_bank.py::test_one_bad_file_does_not_break_bank_ls"),
    ("clear message", "the README's commands refer to things that exist", "tests/test_docs.py"),
]


def render(cases: list[Case] = CASES) -> str:
    """``docs/ERRORS.md``: one row per case, grouped by kind (in :data:`KINDS` order)."""
    order = list(KINDS)
    lines = [
        "# Bad input: one line, exit 2",
        "",
        "Generated by `python scripts/errors_doc.py` from `tests/error_cases.py`: every row is a test",
        "(`tests/test_errors.py`) that runs the command and checks the whole output is this one line on",
        "stderr, the exit code, that no traceback is shown and that nothing is left half-written. `{tmp}`",
        "is the folder the test built its inputs in, `…` any text. The kinds:",
        "",
        *(f"- **{kind}**: {text}" for kind, text in KINDS.items()),
        "",
        "Behaviours rather than messages are tested where they live:",
        "",
        *(f"- {kind}: {text} (`{where}`)" for kind, text, where in sorted(BEHAVIOURS, key=lambda b: order.index(
            b[0]))),
        "",
        "| kind | bad input | message | exit |",
        "| --- | --- | --- | --- |",
    ]
    for case in sorted(cases, key=lambda c: order.index(c.kind)):  # stable: a kind's cases in list order
        message = case.message.replace("|", "\\|")
        code = f"`` {message} ``" if "`" in message else f"`{message}`"
        lines.append(f"| {case.kind} | {case.bad_input.replace('|', chr(92) + '|')} | {code} | {case.code} |")
    return "\n".join(lines) + "\n"
