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

from latexblend.bank.format import bank_complete, bank_file, load_bank
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
    """The ``index``-th concept (0-based) of ``concepts_dir``, its ``*.yaml`` files in sorted order. Refused when
    another file of the folder gives its concept the same name (both would write one run folder and bank)."""
    names = sorted(p.stem for p in Path(concepts_dir).glob("*.yaml"))
    if not names:
        raise LatexBlendError(f"no concept files (*.yaml) in {concepts_dir}")
    if not 0 <= index < len(names):
        raise LatexBlendError(f"--index {index} is out of range: {concepts_dir} holds {len(names)} concepts "
                              f"(0-{len(names) - 1})")
    _check_unique_name(Path(concepts_dir), names[index], names)
    return names[index]


def _check_unique_name(concepts_dir: Path, stem: str, stems: list[str]) -> None:
    """No other concept file of the folder names its concept as ``stem``'s does (files that cannot be read are
    left to their own jobs to report)."""
    def name_of(other: str) -> object:
        try:
            return concept_settings(other, concepts_dir)["name"]
        except LatexBlendError:
            return None

    name = name_of(stem)
    clash = [f"{other}.yaml" for other in stems if other != stem and name is not None and name_of(other) == name]
    if clash:
        raise LatexBlendError(f"concept files {stem}.yaml and {', '.join(clash)} in {concepts_dir} all name their "
                              f"concept '{name}' (one run folder and bank): give each its own name")


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
    """The concept's bank when it already loads and checks (a farm re-run skips it), else ``None``; refused when
    that bank was trained from another class noun or other images (a name used twice)."""
    path = bank_file(cfg.name, cfg.bank_dir)
    if not bank_complete(path):
        return None
    bank = load_bank(path)
    images = bank.training.get("images")
    theirs, ours = (bank.class_noun, images), (cfg.class_noun, str(Path(cfg.images).resolve()) if images else None)
    if theirs != ours:
        raise LatexBlendError(f"{path} holds a concept '{cfg.name}' of class '{bank.class_noun}' trained on "
                              f"{images or 'unrecorded images'}, not this one (class '{cfg.class_noun}', "
                              f"{Path(cfg.images).resolve()}): two concepts share the name '{cfg.name}'; rename one "
                              "or pass --overwrite")
    return path


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
