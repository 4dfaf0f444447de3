"""Shared fixtures: everything offline, the tiny model built once per session in a temp folder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """The module ``scripts/<name>.py`` (scripts are not a package), imported as a script runs: with
    ``scripts/`` on the path, so one script can import another."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep the tiny-model cache and concept banks of the tests out of the user's folders."""
    home = tmp_path_factory.mktemp("latexblend-home")
    old = {k: os.environ.get(k) for k in ("LATEXBLEND_HOME", "LATEXBLEND_BANK")}
    os.environ["LATEXBLEND_HOME"] = str(home)
    os.environ["LATEXBLEND_BANK"] = str(home / "concept_bank")
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_dir(_isolated_home):
    """The tiny model as a diffusers folder (the same folder `--model tiny` resolves to)."""
    from latexblend.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    """The stock SDXL pipeline loaded from the tiny folder (shared: tests must not modify it)."""
    from latexblend.models import load_pipeline

    return load_pipeline(str(tiny_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tokenizer(tiny_pipe):
    return tiny_pipe.tokenizer


def random_bank(unet, name="corgi", noun="dog", noun_ids=(1929,), seed=0, with_fingerprint=True):
    """A bank with random rows shaped for ``unet``."""
    from latexblend.bank.format import ConceptBank
    from latexblend.models import attn2_shapes, fingerprint

    g = torch.Generator().manual_seed(seed)
    shapes = attn2_shapes(unet)
    rows = 1 + len(noun_ids)
    k = {n: torch.randn(rows, c, generator=g) for n, c in shapes.items()}
    v = {n: torch.randn(rows, c, generator=g) for n, c in shapes.items()}
    fp = fingerprint(unet).to_json() if with_fingerprint else None
    return ConceptBank(name=name, class_noun=noun, noun_ids=list(noun_ids), k=k, v=v,
                       extraction_prompt=f"photo of <new1> {noun}", base_model="tiny", fingerprint=fp,
                       training={"steps": 0})


@pytest.fixture(scope="session")
def eval_model_dirs(tmp_path_factory):
    """A tiny random CLIP (real 49,408-token tokenizer) and a tiny DINO-shaped ViT, saved as folders."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from latexblend.tokens import write_clip_tokenizer_files

    root = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **small),
                        vision_config=dict(image_size=224, patch_size=32, **small), projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(root / "vocab"))).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=224, patch_size=16, **small)).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def launch_two(args, env=None, timeout=300, script=None):
    """``accelerate launch`` two CPU processes (gloo) of ``python -m latexblend ARGS`` (or of ``python SCRIPT
    ARGS``); returns the result."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           *(["-m", "latexblend"] if script is None else [str(script)]), *map(str, args)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
