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
    item: int  # the item of issue 12 it comes from (0: older cases kept here too)
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


def _prior(tmp: Path, *extra: str) -> list[str]:
    return ["prior", "--class-noun", "dog", "--num", "1", "--out", str(tmp / "prior"), *extra]


def _generate(tmp: Path, *extra: str) -> list[str]:
    return ["generate", "-p", "a dog on the grass", "--steps", "2", "--out", str(tmp / "out"), *extra]


# --------------------------------------------------------------------------- the cases

_TYPE_CASES = [
    Case("yaml-steps-word", 4, "concept YAML `steps: \"many\"`", lambda t, p: concept_yaml(t, 'steps: "many"'),
         "error: training setting steps = 'many' (str): expected an integer", absent=("runs", "banks")),
    Case("yaml-lr-word", 4, "concept YAML `lr: fast`", lambda t, p: concept_yaml(t, "lr: fast"),
         "error: training setting lr = 'fast' (str): expected a number", absent=("runs", "banks")),
    Case("yaml-steps-fraction", 4, "concept YAML `steps: 2.5`", lambda t, p: concept_yaml(t, "steps: 2.5"),
         "error: training setting steps = 2.5 (float): expected an integer", absent=("runs", "banks")),
    Case("yaml-name-number", 4, "concept YAML `name: 42`", lambda t, p: concept_yaml(t, "name: 42"),
         "error: training setting name = 42 (int): expected a string", absent=("runs", "banks")),
    Case("yaml-switch-word", 4, "concept YAML `use_prior: maybe`", lambda t, p: concept_yaml(t, "use_prior: maybe"),
         "error: training setting use_prior = 'maybe' (str): expected true or false", absent=("runs", "banks")),
    Case("set-lr-word", 4, "`train --set lr=abc`", lambda t, p: train_flags(t, "--set", "lr=abc"),
         "error: training setting lr = 'abc' (str): expected a number", absent=("runs", "banks")),
    Case("set-shrink-range", 4, "`train --set augment_shrink=1.5`",
         lambda t, p: train_flags(t, "--set", "augment_shrink=1.5"),
         "error: augment_shrink must be in [0, 1], got 1.5", absent=("runs", "banks")),
    Case("set-broken-yaml", 4, "`train --set 'lr=[1,'`", lambda t, p: train_flags(t, "--set", "lr=[1,"),
         "error: --set lr=[1,: '[1,' is not a valid value (while parsing a flow node)", absent=("runs", "banks")),
    Case("cc101-dir-number", 4, "CustomConcept101 `dataset.json` with `instance_data_dir: 42`",
         lambda t, p: (t / "dataset.json").write_text(json.dumps([{"instance_data_dir": 42, "class_prompt": "cat",
                                                                    "prompt_filename": "p.txt"}]))
         and ["cc101", "jobs", "--root", str(t), "--out", str(t / "jobs.json"), "--concepts", "all"],
         "error: dataset.json[0]: instance_data_dir must be a string, got 42", absent=("jobs.json",)),
    Case("release-json-count-word", 4, "authors' inference JSON with `concept_num: \"two\"`",
         lambda t, p: (t / "inference.json").write_text(json.dumps([{"prompt": "a dog", "concept_num": "two"}]))
         and ["generate", "--config", str(t / "inference.json"), "--out", str(t / "out")],
         "error: {tmp}/inference.json: concept_num must be a whole number, got 'two'", absent=("out",)),
    Case("generate-yaml-list-of-numbers", 4, "generate `--config` with `prompts: [1, 2]`",
         lambda t, p: (t / "g.yaml").write_text("prompts: [1, 2]\n") and ["generate", "--config", str(t / "g.yaml")],
         "error: generate setting prompts = [1, 2] (list): expected a list of strings"),
]

_LOCK_CASES = [
    Case("out-in-use", 2, "`generate --out DIR` while another generate writes into DIR", lambda t, p: busy_out(t),
         "error: {tmp}/out is in use by another generate (pid …); wait for it to finish or choose another folder"),
]

_NONFINITE_CASES = [
    Case("cfg-nan", 3, "`generate --cfg nan`", lambda t, p: _generate(t, "--cfg", "nan"),
         "error: generate setting cfg = nan: expected a finite number", absent=("out",)),
    Case("cfg-inf", 3, "`generate --cfg inf`", lambda t, p: _generate(t, "--cfg", "inf"),
         "error: generate setting cfg = inf: expected a finite number", absent=("out",)),
    Case("prior-cfg-nan", 3, "`prior --cfg nan`", lambda t, p: _prior(t, "--cfg", "nan"),
         "error: --cfg must be a finite number >= 0, got nan", absent=("prior",)),
    Case("train-lr-inf", 3, "`train --lr inf`", lambda t, p: train_flags(t, "--lr", "inf"),
         "error: training setting lr = inf: expected a finite number", absent=("runs", "banks")),
    Case("yaml-lr-nan", 3, "concept YAML `lr: .nan`", lambda t, p: concept_yaml(t, "lr: .nan"),
         "error: training setting lr = nan: expected a finite number", absent=("runs", "banks")),
    Case("bank-nan-generate", 3, "`generate` with a bank holding NaN",
         lambda t, p: _generate(t, "--concepts", str(write_bank(t / "b" / "corgi.safetensors", fill=float("nan")))),
         "error: bank 'corgi', layer layer0.attn2: holds NaN or infinite values (a diverged training or a damaged "
         "file); retrain or re-extract it", absent=("out",)),
    Case("bank-inf-verify", 3, "`bank verify` of a bank holding Inf",
         lambda t, p: ["bank", "verify", str(write_bank(t / "corgi.safetensors", fill=float("inf")))],
         "error: bank 'corgi', layer layer0.attn2: holds NaN or infinite values (a diverged training or a damaged "
         "file); retrain or re-extract it"),
]

_NAME_CASES = [
    Case("bank-name-escapes", 1, "a bank whose metadata name is `../../../escaped` (`generate --save-maps`)",
         lambda t, p: _generate(t, "--save-maps", "--concepts",
                                str(write_bank(t / "b" / "x.safetensors", name="../../../escaped"))),
         "error: {tmp}/b/x.safetensors: bank name '../../../escaped' is not allowed: use letters, digits, '_', "
         "'-' and '.', starting with a letter or digit (at most 100 characters)", absent=("out",)),
    Case("prior-noun-path", 1, "`prior --class-noun ../../escaped` (the noun names the default folder)",
         lambda t, p: ["prior", "--class-noun", "../../escaped", "--num", "1"],
         "error: class noun (the default prior folder's name; pass a folder to use another) '../../escaped' is not "
         "allowed: use letters, digits, spaces, '_', '-' and '.', starting with a letter or digit (at most 100 "
         "characters)", absent=("reg_data",)),
    Case("cc101-job-name-path", 1, "a cc101 jobs file whose job name is `../../escaped`",
         lambda t, p: (t / "jobs.json").write_text(json.dumps([{
             "name": "../../escaped", "concepts": ["cat"], "prompts": ["a cat"], "references": {},
             "out": str(t / "samples" / "x")}])) and ["cc101", "run", "--jobs", str(t / "jobs.json"), "--no-evaluate"],
         "error: {tmp}/jobs.json: job 0 name part '../../escaped' is not allowed: use letters, digits, '_', '-' and "
         "'.', starting with a letter or digit (at most 100 characters)", absent=("samples",)),
    Case("yaml-name-path", 1, "concept YAML `name: ../../outside`", lambda t, p: concept_yaml(t, "name: ../../outside"),
         "error: concept name '../../outside' is not allowed: use letters, digits, '_', '-' and '.', starting with "
         "a letter or digit (at most 100 characters)", absent=("runs", "banks")),
]

_TRACEBACK_CASES = [
    Case("png-bomb", 5, "a PNG decompression bomb among the training images",
         lambda t, p: png_bomb(t / "images" / "bomb.png") and train_flags(t),
         "error: {tmp}/images/bomb.png is refused: too many pixels to decode safely (a decompression bomb?); "
         "… pixels at most", absent=("runs", "banks")),
    Case("device-cuda-on-cpu", 5, "`prior --device cuda` on a machine without CUDA",
         lambda t, p: no_cuda(p) or ["prior", "--class-noun", "dog", "--num", "1", "--device", "cuda",
                                     "--out", str(t / "prior")],
         "error: device 'cuda': this machine has no CUDA GPU that torch … can use; pass --device cpu",
         absent=("prior",)),
    Case("device-bogus", 5, "`prior --device bogus`", lambda t, p: _prior(t, "--device", "bogus"),
         "error: unknown device 'bogus': use cpu, cuda, cuda:N or mps", absent=("prior",)),
    Case("generate-device-cuda-on-cpu", 5, "`generate --device cuda` on a machine without CUDA",
         lambda t, p: no_cuda(p) or _generate(t, "--device", "cuda"),
         "error: device 'cuda': this machine has no CUDA GPU that torch … can use; pass --device cpu", absent=("out",)),
    Case("generate-device-bogus", 5, "`generate --device bogus`", lambda t, p: _generate(t, "--device", "bogus"),
         "error: unknown device 'bogus': use cpu, cuda, cuda:N or mps", absent=("out",)),
    Case("prior-steps-0", 5, "`prior --steps 0`", lambda t, p: _prior(t, "--steps", "0"),
         "error: --steps must be at least 1, got 0", absent=("prior",)),
    Case("fp16-on-cpu", 5, "`train --mixed-precision fp16` on a machine without CUDA",
         lambda t, p: no_cuda(p) or train_flags(t, "--mixed-precision", "fp16"),
         "error: mixed precision fp16 needs a CUDA GPU and this machine has none; use auto, no or bf16",
         absent=("runs", "banks")),
    Case("bank-format-version-word", 5, "a bank with `format_version: \"x\"` (`bank inspect`)",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors", format_version="x"))],
         "error: {tmp}/corgi.safetensors: bank metadata format_version is 'x', not a whole number"),
    Case("bank-noun-ids-number", 5, "a bank with `noun_token_ids: 5` (`bank inspect`)",
         lambda t, p: ["bank", "inspect", str(write_bank(t / "corgi.safetensors", noun_token_ids="5"))],
         "error: {tmp}/corgi.safetensors: bank metadata noun_token_ids must be a non-empty list of token ids"),
    Case("bench-steps-0", 5, "`python -m benchmarks generate --steps 0`",
         lambda t, p: ["generate", "--steps", "0", "--out", str(t / "b.json")],
         "error: --steps must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("bench-repeats-0", 5, "`python -m benchmarks generate --repeats 0`",
         lambda t, p: ["generate", "--repeats", "0", "--out", str(t / "b.json")],
         "error: --repeats must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("bench-modes-steps-0", 5, "`python -m benchmarks modes --steps 0`",
         lambda t, p: ["modes", "--steps", "0", "--out", str(t / "b.json")],
         "error: --steps must be at least 1, got 0", absent=("b.json",), program="benchmarks"),
    Case("tiny-model-onto-file", 5, "`tiny-model FILE` (an existing file)",
         lambda t, p: (t / "f").write_text("x") and ["tiny-model", str(t / "f")],
         "error: {tmp}/f is a file, not a folder; choose a new folder"),
]

_SILENT_CASES = [
    Case("prior-empty-noun", 6, "`prior --class-noun \"\"`",
         lambda t, p: ["prior", "--class-noun", "", "--num", "1", "--out", str(t / "prior")],
         "error: class noun is empty: the prior images and their captions would have no subject", absent=("prior",)),
    Case("extract-over-bank", 6, "`extract` onto an existing bank, without `--overwrite`",
         lambda t, p: (fake_run(t), (t / "banks").mkdir(), (t / "banks" / "rex.safetensors").write_text("x"))
         and ["extract", "--run", str(t / "runs" / "rex")],
         "error: {tmp}/banks/rex.safetensors already exists; pass --overwrite to replace it, or --out FILE"),
    Case("noun-holds-identifier", 6, "`train --class-noun '<new1> dog'`",
         lambda t, p: ["train", *train_flags(t)[1:], "--class-noun", "<new1> dog"],
         "error: class noun '<new1> dog' holds the identifier <new1>: the class noun names the class (e.g. dog), "
         "the identifier is added in front of it", absent=("runs", "banks")),
]

_IMPORT_CASES = [
    Case("import-pickle-code", 8, "`bank import` of a .pt whose pickle would run code",
         lambda t, p: release_pt(t, _entry(k=_Payload())),
         "error: {tmp}/release.pt is refused as unsafe: it holds objects other than tensors, which could run code "
         "when loaded; only plain tensor banks are imported", absent=("banks",)),
    Case("import-text", 8, "`bank import` of a text file", lambda t, p: release_pt(t, b"hello world"),
         "error: {tmp}/release.pt is not a torch.save file (corrupt or another format; KeyError)", absent=("banks",)),
    Case("import-empty", 8, "`bank import` of an empty file", lambda t, p: release_pt(t, b""),
         "error: {tmp}/release.pt is empty; not a release concept bank", absent=("banks",)),
    Case("import-list-rows", 8, "`bank import` of a .pt whose k is a list",
         lambda t, p: release_pt(t, _entry(k=[1.0, 2.0])),
         "error: {tmp}/release.pt: entry 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor': k is a "
         "list, not a tensor", absent=("banks",)),
    Case("import-nan", 3, "`bank import` of a .pt holding NaN",
         lambda t, p: release_pt(t, _entry(v=__import__("torch").full((2, 8), float("nan")))),
         "error: bank 'release', layer down_blocks.1.attentions.0.transformer_blocks.0.attn2: holds NaN or infinite "
         "values (a diverged training or a damaged file); retrain or re-extract it", absent=("banks",)),
]

_MESSAGE_CASES = [
    Case("extract-dtype-bogus", 8, "`extract --dtype bogus`",
         lambda t, p: ["extract", "--run", str(fake_run(t)), "--dtype", "bogus"],
         "error: unknown dtype 'bogus'; choose one of auto, fp32, fp16, bf16", absent=("banks",)),
    Case("prior-captions-not-utf8", 8, "a prior folder whose `captions.txt` is not UTF-8 text",
         lambda t, p: (write_png(t / "prior" / "a.png").with_name("captions.txt").write_bytes(b"\xff\xfe dog")
                       and train_flags(t, "--use-prior", "--prior", str(t / "prior"))),
         "error: {tmp}/prior/captions.txt is not UTF-8 text: invalid start byte at byte 0", absent=("runs", "banks")),
    Case("config-json-not-utf8", 8, "`generate --config X.json` of a file that is not UTF-8 text",
         lambda t, p: (t / "c.json").write_bytes(b"\xff\xfe[1]") and _generate(t, "--config", str(t / "c.json")),
         "error: {tmp}/c.json is not valid YAML/JSON: …", absent=("out",)),
    Case("prompts-file-not-utf8", 8, "`generate --prompts-file` of a file that is not UTF-8 text",
         lambda t, p: (t / "p.txt").write_bytes(b"\xff\xfe a dog") and _generate(t, "--prompts-file", str(t / "p.txt")),
         "error: cannot read prompts file {tmp}/p.txt: not UTF-8 text", absent=("out",)),
    Case("generate-refused-leaves-no-folder", 8, "`generate --out NEW` with a bank that does not fit the model",
         lambda t, p: _generate(t, "--concepts", str(write_bank(t / "b" / "corgi.safetensors"))),
         "error: bank 'corgi' does not fit this model: … attn2 layers missing from the bank, 2 bank layers not in "
         "the model (e.g. …)", absent=("out",)),
    Case("extract-foreign-kv", 8, "`extract` of a run whose kv.safetensors holds other tensors",
         lambda t, p: ["extract", "--run", str(foreign_kv_run(t))],
         "error: {tmp}/runs/rex/kv.safetensors does not hold latexblend to_k/to_v weights: 'foo.to_k.weight' "
         "missing (a damaged or foreign file)", absent=("banks",)),
    Case("extract-missing-tokens", 8, "`extract` of a run whose tokens.safetensors is gone",
         lambda t, p: ["extract", "--run", str(fake_run(t, files=("kv.safetensors",)))],
         "error: {tmp}/runs/rex has no final weights (the run did not finish; pass --checkpoint N): "
         "{tmp}/runs/rex/tokens.safetensors missing", absent=("banks",)),
]

CASES: list[Case] = [*_NAME_CASES, *_LOCK_CASES, *_NONFINITE_CASES, *_TYPE_CASES, *_TRACEBACK_CASES, *_SILENT_CASES,
                     *_IMPORT_CASES, *_MESSAGE_CASES]


# --------------------------------------------------------------------------- the document


def render(cases: list[Case] = CASES) -> str:
    """``docs/ERRORS.md``: one row per case, in item order."""
    lines = [
        "# Bad input: one line, exit 2",
        "",
        "Generated by `python scripts/errors_doc.py` from `tests/error_cases.py`: every row is a test",
        "(`tests/test_errors.py`) that runs the command and checks the whole output is this one line on",
        "stderr, the exit code, that no traceback is shown and that nothing is left half-written. `{tmp}`",
        "is the folder the test built its inputs in, `…` any text. Item numbers refer to issue 12.",
        "",
        "The items of issue 12 that are behaviours rather than messages are tested where they live: 6, a",
        "16-bit PNG is scaled, not read as white (`tests/test_train.py::test_deep_greyscale_images_are_scaled_not_"
        "clipped_to_white`); 7 and 10, a run stopped before its first checkpoint starts again, the newest",
        "`--keep-checkpoints` are kept, identical runs write identical files (`tests/test_train.py::test_a_run_"
        "stopped_before_its_first_checkpoint_starts_again_and_identical_runs_give_identical_files`,",
        "`tests/test_fileio.py`, `tests/test_bank.py`); 9, memory stays flat over guided calls",
        "(`tests/test_guidance.py::test_memory_is_flat_over_many_guided_calls`); 11, the README's commands",
        "(`tests/test_docs.py`).",
        "",
        "| item | bad input | message | exit |",
        "| --- | --- | --- | --- |",
    ]
    for case in sorted(cases, key=lambda c: c.item):
        message = case.message.replace("|", "\\|")
        code = f"`` {message} ``" if "`" in message else f"`{message}`"
        lines.append(f"| {case.item} | {case.bad_input.replace('|', chr(92) + '|')} | {code} | {case.code} |")
    return "\n".join(lines) + "\n"
