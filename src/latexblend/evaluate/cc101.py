"""CustomConcept101 protocol runner: the benchmark's JSON files -> ``generate`` jobs -> one metrics table.

A local copy of the benchmark (Custom Diffusion's ``customconcept101/`` folder with the downloaded
``benchmark_dataset/``) holds ``dataset.json`` (single concepts), ``dataset_multiconcept.json``
(pairs) and prompt files whose ``{}`` / ``{0}`` / ``{1}`` slots take the concepts. A concept is named
after its ``instance_data_dir`` folder (``pet_cat1``); a slot becomes the placeholder ``<pet_cat1>``,
which ``generate`` expands to ``a cat``. What is accepted is documented in ``docs/EVALUATION.md``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from latexblend.blend.samples import metadata_path, samples_complete
from latexblend.errors import LatexBlendError
from latexblend.evaluate import metrics as ev
from latexblend.evaluate import report
from latexblend.fileio import write_text_atomic
from latexblend.settings import load_data, read_text, safe_name, shown

SINGLE_FILE = "dataset.json"
PAIR_FILE = "dataset_multiconcept.json"
_SLOT = re.compile(r"\{(\d*)\}")
_ARTICLE = re.compile(r"(?:^|(?<=\s))(?:a|an|the)\s+$", re.IGNORECASE)
_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")
RESULT_FIELDS = ["name", "kind", "concepts", "n_images", "clip_t", "clipscore", "n_pairs", "clip_i", "dino"]


@dataclass(frozen=True)
class Concept:
    """One benchmark concept: its name, class noun, reference folder and (single-concept) prompt file."""

    name: str
    class_noun: str
    references: Path
    prompt_file: Path | None


@dataclass(frozen=True)
class Pair:
    first: Concept
    second: Concept
    prompt_file: Path

    @property
    def name(self) -> str:
        return f"{self.first.name}+{self.second.name}"


def _resolve(root: Path, relative: str, what: str) -> Path:
    """``relative`` against ``root``, then ``root``'s parent (the benchmark writes both styles)."""
    path = Path(relative).expanduser()
    candidates = [path] if path.is_absolute() else [root / path, root.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise LatexBlendError(f"{what} '{relative}' not found under {root} (nor its parent)")


def _read_json(path: Path) -> list:
    if not path.exists() and not path.is_symlink():
        raise LatexBlendError(f"{path} not found: is --root a CustomConcept101 folder?")
    data = load_data(path, "benchmark file")
    if not isinstance(data, list):
        raise LatexBlendError(f"{path} must hold a JSON list")
    return data


def _concept(root: Path, entry: object, where: str, need_prompts: bool) -> Concept:
    if not isinstance(entry, dict):
        raise LatexBlendError(f"{where}: expected an object, got {shown(entry)}")
    missing = [k for k in ("instance_data_dir", "class_prompt") if not entry.get(k)]
    if need_prompts and not entry.get("prompt_filename"):
        missing.append("prompt_filename")
    if missing:
        raise LatexBlendError(f"{where}: missing {', '.join(missing)}")
    for key in ("instance_data_dir", "class_prompt", "prompt_filename"):
        if key in entry and not isinstance(entry[key], str):
            raise LatexBlendError(f"{where}: {key} must be a string, got {shown(entry[key])}")
    name = _NAME.sub("_", Path(entry["instance_data_dir"]).name).lstrip("._-")
    prompt_file = entry.get("prompt_filename")
    return Concept(name=name, class_noun=str(entry["class_prompt"]).strip(),
                   references=_resolve(root, entry["instance_data_dir"], f"{where}: instance_data_dir"),
                   prompt_file=_resolve(root, prompt_file, f"{where}: prompt_filename") if need_prompts else None)


def load_concepts(root: str | Path) -> dict[str, Concept]:
    """``dataset.json`` -> ``{name: Concept}`` (first entry wins for a repeated folder)."""
    root = Path(root)
    out: dict[str, Concept] = {}
    for i, entry in enumerate(_read_json(root / SINGLE_FILE)):
        concept = _concept(root, entry, f"{SINGLE_FILE}[{i}]", need_prompts=True)
        out.setdefault(concept.name, concept)
    return out


def load_pairs(root: str | Path) -> dict[str, Pair]:
    """``dataset_multiconcept.json`` -> ``{"a+b": Pair}``: two concept entries plus a compose prompt file."""
    root = Path(root)
    out: dict[str, Pair] = {}
    for i, group in enumerate(_read_json(root / PAIR_FILE)):
        where = f"{PAIR_FILE}[{i}]"
        if not isinstance(group, list):
            raise LatexBlendError(f"{where}: expected a list of two concepts and a prompt_filename_compose entry")
        entries = [e for e in group if isinstance(e, dict)]
        concepts = [e for e in entries if "instance_data_dir" in e]
        compose = [e["prompt_filename_compose"] for e in entries if e.get("prompt_filename_compose")]
        if len(concepts) != 2 or len(compose) != 1:
            raise LatexBlendError(f"{where}: needs exactly two concept entries and one prompt_filename_compose")
        first, second = (_concept(root, e, f"{where}[{j}]", need_prompts=False) for j, e in enumerate(concepts))
        pair = Pair(first, second, _resolve(root, compose[0], f"{where}: prompt_filename_compose"))
        out.setdefault(pair.name, pair)
    return out


def fill_prompt(template: str, names: Sequence[str]) -> str:
    """Put ``<name>`` placeholders into a benchmark prompt's ``{}`` / ``{0}`` / ``{1}`` slots.

    An article right before a slot is dropped (``a {}`` -> ``<cat>``), since ``generate`` expands the
    placeholder to ``a <class noun>``.
    """
    pieces, pos, auto = [], 0, 0
    for match in _SLOT.finditer(template):
        index = int(match.group(1)) if match.group(1) else auto
        auto += not match.group(1)
        if index >= len(names):
            raise LatexBlendError(f"prompt '{template}' has slot {{{index}}} but only {len(names)} concept(s)")
        pieces += [_ARTICLE.sub("", template[pos : match.start()]), f"<{names[index]}>"]
        pos = match.end()
    if not pieces:
        raise LatexBlendError(f"prompt '{template}' has no {{}} slot for the concept")
    return "".join(pieces) + template[pos:]


def read_prompts(path: Path, names: Sequence[str]) -> list[str]:
    """The non-empty lines of a prompt file, slots filled with ``names``."""
    lines = read_text(path, "prompt file").splitlines()
    prompts = [fill_prompt(line.strip(), names) for line in lines if line.strip()]
    if not prompts:
        raise LatexBlendError(f"prompt file {path} has no prompts")
    return prompts


def _job(name: str, kind: str, concepts: Sequence[Concept], prompts: list[str], out_root: Path) -> dict:
    return {"name": name, "kind": kind, "concepts": [c.name for c in concepts],
            "class_nouns": {c.name: c.class_noun for c in concepts}, "prompts": prompts,
            "references": {c.name: str(c.references) for c in concepts}, "out": str((out_root / name).resolve())}


def _select(available: Mapping, wanted: Sequence[str], what: str) -> list:
    if list(wanted) == ["all"]:
        return list(available.values())
    unknown = [w for w in wanted if w not in available]
    if unknown:
        sample = ", ".join(list(available)[:8])
        raise LatexBlendError(f"unknown {what} {', '.join(unknown)}; the benchmark has e.g. {sample}")
    return [available[w] for w in dict.fromkeys(wanted)]


def make_jobs(root: str | Path, concepts: Sequence[str] = (), pairs: Sequence[str] = (),
              out_root: str | Path = "cc101_samples") -> list[dict]:
    """Jobs for the selected single concepts (by name) and pairs (``a+b``); ``["all"]`` selects all."""
    root, out_root = Path(root), Path(out_root)
    if not concepts and not pairs:
        raise LatexBlendError("select some concepts or pairs (names, or 'all')")
    jobs = []
    for c in _select(load_concepts(root), concepts, "concept") if concepts else []:
        jobs.append(_job(c.name, "single", [c], read_prompts(c.prompt_file, [c.name]), out_root))
    for p in _select(load_pairs(root), pairs, "pair") if pairs else []:
        names = [p.first.name, p.second.name]
        jobs.append(_job(p.name, "pair", [p.first, p.second], read_prompts(p.prompt_file, names), out_root))
    return jobs


def write_jobs(jobs: Sequence[dict], path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(list(jobs), indent=2) + "\n")


def read_jobs(path: str | Path) -> list[dict]:
    """A jobs file written by :func:`write_jobs`, checked for the keys the runner needs."""
    path = Path(path)
    jobs = load_data(path, "jobs file")
    keys = ("name", "concepts", "prompts", "references", "out")
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and all(k in j for k in keys) for j in jobs):
        raise LatexBlendError(f"{path}: expected a list of jobs with keys {', '.join(keys)}")
    for i, job in enumerate(jobs):
        lists = all(isinstance(job[k], list) and all(isinstance(x, str) for x in job[k])
                    for k in ("concepts", "prompts"))
        refs = job["references"]
        if not (isinstance(job["name"], str) and isinstance(job["out"], str) and lists and isinstance(refs, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in refs.items())):
            raise LatexBlendError(f"{path}: job {i} needs a string name and out, lists of strings concepts and "
                                  "prompts, and a references mapping of names to folders")
        for part in job["name"].split("+"):  # the name becomes a file name (<name>.prompts.txt)
            safe_name(part, f"{path}: job {i} name part")
    return jobs


def job_complete(job: Mapping) -> bool:
    """The job's output folder has a complete metadata.json covering all its prompts."""
    return samples_complete(job["out"], num_prompts=len(job["prompts"]))


def _fresh_metrics(job: Mapping) -> dict | None:
    """The job's ``metrics.json`` if it is newer than ``metadata.json`` and used the job's references."""
    out = Path(job["out"])
    metrics_path, meta = out / "metrics.json", metadata_path(out)
    if not metrics_path.is_file() or metrics_path.stat().st_mtime < meta.stat().st_mtime:
        return None
    try:
        metrics = load_data(metrics_path, "metrics file")
        refs = metrics["settings"]["references"]
        used = {name: {Path(f).parent.resolve() for f in ref["files"]} for name, ref in refs.items()}
    except (LatexBlendError, KeyError, TypeError, AttributeError):
        return None
    wanted = {name: {Path(folder).resolve()} for name, folder in job["references"].items()}
    return metrics if used == wanted else None


def command_runner(template: str) -> Callable[[dict], None]:
    """A ``generate(job)`` callable running ``template`` (``{prompts_file} {concepts} {out} {name}``) per
    job; ``latexblend`` as the command runs this interpreter's ``-m latexblend``. A bad template fails here."""

    def command(fields: dict) -> list[str]:
        try:
            args = [a.format(**fields) for a in shlex.split(template)]
        except (KeyError, IndexError, ValueError) as err:
            raise LatexBlendError(f"--generate-cmd '{template}': use only {{prompts_file}}, {{concepts}}, "
                                  f"{{out}}, {{name}} ({type(err).__name__}: {err})") from None
        if not args:
            raise LatexBlendError("--generate-cmd is empty")
        return [sys.executable, "-m", "latexblend", *args[1:]] if args[0] == "latexblend" else args

    def generate(job: dict) -> None:
        prompts_file = Path(job["out"]).parent / f"{job['name']}.prompts.txt"
        write_text_atomic(prompts_file, "\n".join(job["prompts"]) + "\n")
        args = command({"prompts_file": str(prompts_file), "concepts": ",".join(job["concepts"]),
                        "out": job["out"], "name": job["name"]})
        try:
            code = subprocess.run(args).returncode
        except OSError as err:
            raise LatexBlendError(f"job {job['name']}: cannot run `{shlex.join(args)}`: {err}") from err
        if code != 0:
            raise LatexBlendError(f"job {job['name']}: `{shlex.join(args)}` exited with {code}; "
                                  "fix it and run again (finished jobs are kept)")

    command({"prompts_file": "", "concepts": "", "out": "", "name": ""})
    return generate


def job_evaluator(clip_model: str, dino_model: str, device: str | None, batch_size: int,
                  before_load: Callable[[], None] | None = None) -> Callable[[dict], dict]:
    """An ``evaluate(job)`` callable that loads the models on first use (after ``before_load()``) and
    writes each job's metrics and report."""
    loaded = {}

    def evaluate(job: dict) -> dict:
        if not loaded:
            if before_load is not None:
                before_load()
            loaded["models"] = ev.load_models(clip_model, dino_model, device)
        metrics = ev.evaluate_samples(job["out"], loaded["models"], job["references"], batch_size=batch_size)
        report.write_outputs(metrics, job["out"])
        return metrics

    return evaluate


def run_jobs(jobs: Sequence[dict], generate: Callable[[dict], None],
             evaluate: Callable[[dict], dict] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Generate each job unless its output is complete, then evaluate it unless fresh metrics exist.

    ``generate(job)`` must fill ``job["out"]``; ``evaluate(job)`` returns (and writes) its metrics.
    Returns one result row per job (its overall metrics), in job order.
    """
    results = []
    for i, job in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}] {job['name']}"
        if job_complete(job):
            log(f"{tag}: samples complete, not generating again")
        elif metadata_path(job["out"]).exists():
            raise LatexBlendError(f"job {job['name']}: {job['out']} holds a generation that does not match the job "
                                  "(missing images or prompts); move it away and run again")
        else:
            log(f"{tag}: generating {len(job['prompts'])} prompts into {job['out']}")
            generate(job)
            if not job_complete(job):
                raise LatexBlendError(f"job {job['name']}: generate left no complete metadata.json in {job['out']}")
        if evaluate is None:
            continue
        metrics = _fresh_metrics(job)
        if metrics is None:
            log(f"{tag}: evaluating")
            metrics = evaluate(job)
        results.append({"name": job["name"], "kind": job.get("kind", ""), "concepts": "+".join(job["concepts"]),
                        **{k: metrics["overall"][k] for k in RESULT_FIELDS[3:]}})
    return results


def _mean_row(rows: Sequence[dict], name: str) -> dict:
    """Unweighted mean over jobs of each metric (jobs without a value are left out and not counted)."""
    row = {"name": name, "kind": "mean", "concepts": f"{len(rows)} jobs"}
    for key in RESULT_FIELDS[3:]:
        values = [r[key] for r in rows if r[key] is not None]
        if key.startswith("n_"):
            row[key] = sum(values)
        else:
            row[key] = sum(values) / len(values) if values else None
    return row


def results_table(results: Sequence[dict]) -> list[dict]:
    """Job rows followed by a mean row per kind (single, pair) that is present."""
    rows = list(results)
    for kind in ("single", "pair"):
        group = [r for r in results if r["kind"] == kind]
        if group:
            rows.append(_mean_row(group, f"mean ({kind})"))
    return rows


def write_results(rows: Sequence[dict], folder: str | Path) -> list[Path]:
    """``cc101_results.csv`` and ``cc101_results.json`` in ``folder``."""
    folder = Path(folder)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in RESULT_FIELDS})
    return [write_text_atomic(folder / "cc101_results.csv", buf.getvalue()),
            write_text_atomic(folder / "cc101_results.json", json.dumps(list(rows), indent=2) + "\n")]
