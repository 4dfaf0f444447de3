"""A run's settings from their sources: defaults < the model's recipe < YAML file < ``--set KEY=VALUE`` <
command-line flags (flags left unset are ``None`` and do not override).

The options themselves belong to their stages (:mod:`latexblend.train.options`,
:mod:`latexblend.blend.options`); this module only layers where they come from: concept YAML files and
farm indices for training, settings files (ours or the authors' inference JSON) for generation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from latexblend.bank.format import bank_complete, bank_file
from latexblend.bank.release import settings_file
from latexblend.blend.options import GenerateConfig
from latexblend.errors import LatexBlendError
from latexblend.settings import key_value, load_mapping, merge, read_text
from latexblend.train.options import TrainConfig, recipe


def concept_settings(name: str, concepts_dir: str | Path = "configs/concepts") -> dict[str, Any]:
    """The settings in ``<concepts_dir>/<name>.yaml`` (``name`` defaults to the file's stem)."""
    path = Path(concepts_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path(concepts_dir).glob("*.yaml"))) or "none"
        raise LatexBlendError(f"unknown concept '{name}': no {path} (concepts there: {known})")
    data = load_mapping(path, "concept file")
    data.setdefault("name", path.stem)
    return data


def farm_concept(concepts_dir: str | Path, index: int) -> str:
    """The ``index``-th concept (0-based) of ``concepts_dir``, its ``*.yaml`` files in sorted order."""
    names = sorted(p.stem for p in Path(concepts_dir).glob("*.yaml"))
    if not names:
        raise LatexBlendError(f"no concept files (*.yaml) in {concepts_dir}")
    if not 0 <= index < len(names):
        raise LatexBlendError(f"--index {index} is out of range: {concepts_dir} holds {len(names)} concepts "
                              f"(0-{len(names) - 1})")
    return names[index]


def farm_index(index: int | None, concept: str | None, images: str | None) -> int | None:
    """The farm index: ``index``, else ``$SLURM_ARRAY_TASK_ID`` when no concept is named; never together
    with a named concept or images."""
    if index is None and concept is None and images is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        try:
            index = int(os.environ["SLURM_ARRAY_TASK_ID"])
        except ValueError as err:
            task = os.environ["SLURM_ARRAY_TASK_ID"]
            raise LatexBlendError(f"SLURM_ARRAY_TASK_ID is not an integer: {task}") from err
    if index is not None and (concept or images):
        raise LatexBlendError("--index picks a concept from --concepts-dir; do not combine it with --concept/--images")
    return index


def finished_bank(cfg: TrainConfig) -> Path | None:
    """The concept's bank when it already loads and checks (a farm re-run skips it), else ``None``."""
    path = bank_file(cfg.name, cfg.bank_dir)
    return path if bank_complete(path) else None


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompts file: one per line, blank lines and ``#`` lines skipped."""
    path = Path(path)
    lines = read_text(path, "prompts file").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LatexBlendError(f"prompts file {path} has no prompts")
    return prompts


def train_settings(concept: str | None, concepts_dir: str | Path, flags: dict[str, Any],
                   sets: list[str] | None = None) -> TrainConfig:
    """Defaults < ``<concepts_dir>/<concept>.yaml`` < ``--set key=value`` < explicit flags."""
    layers: list[dict[str, Any]] = [concept_settings(concept, concepts_dir) if concept else {}]
    extra = dict(key_value(item) for item in sets or [])
    model = next((layer["model"] for layer in (flags, extra, *layers[::-1]) if layer.get("model")), TrainConfig.model)
    return merge(TrainConfig, recipe(model), *layers, extra, flags, source="training setting")


def generate_settings(config: str | Path | None, flags: dict[str, Any], prompts_file: str | Path | None = None
                      ) -> GenerateConfig:
    """Defaults < the ``--config`` file (ours, or the authors' inference JSON) < flags; the prompts of
    ``prompts_file`` are added to the flags' prompts."""
    flags = dict(flags)
    if prompts_file is not None:
        flags["prompts"] = (flags.get("prompts") or []) + read_prompts(prompts_file)
    file_settings = settings_file(config, flags.get("bank_dir")) if config is not None else {}
    return merge(GenerateConfig, file_settings, flags, source="generate setting")
