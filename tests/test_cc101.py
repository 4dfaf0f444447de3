"""CustomConcept101 runner on a miniature fake benchmark: prompt filling, jobs, resumable runs, the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from latexblend.cli import app
from latexblend.errors import LatexBlendError
from latexblend.evaluate import cc101

runner = CliRunner()


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def _entry(folder: str, noun: str, prompt_file: str | None = None) -> dict:
    entry = {"instance_prompt": f"photo of a <new1> {noun}", "class_prompt": noun,
             "instance_data_dir": f"./benchmark_dataset/{folder}", "class_data_dir": f"./real_reg/samples_{noun}/"}
    return {**entry, "prompt_filename": prompt_file} if prompt_file else entry


@pytest.fixture
def bench(tmp_path) -> Path:
    """``customconcept101/`` with two concepts, one pair, and both path styles the real files use."""
    root = tmp_path / "customconcept101"
    for i, folder in enumerate(["pet_cat1", "pet_dog1"]):
        for j in range(2):
            _png(root / "benchmark_dataset" / folder / f"{j}.jpg", 10 * i + j)
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "cat.txt").write_text("Photo of a {}.\n{} swimming in a pool.\n\na sculpture of the {}.\n")
    (prompts / "dog.txt").write_text("A banana next to {}\n")
    (prompts / "pet_pet.txt").write_text("photo of the {0} and {1}.\nA {1} chasing an {0} on a beach.\n")
    singles = [_entry("pet_cat1", "cat", "./customconcept101/prompts/cat.txt"),
               _entry("pet_dog1", "dog", "prompts/dog.txt")]
    pairs = [[_entry("pet_cat1", "cat", "prompts/cat.txt"), _entry("pet_dog1", "dog"),
              {"prompt_filename_compose": "prompts/pet_pet.txt"}]]
    (root / "dataset.json").write_text(json.dumps(singles))
    (root / "dataset_multiconcept.json").write_text(json.dumps(pairs))
    return root


def test_fill_prompt_puts_placeholders_in_slots_and_drops_the_article():
    assert cc101.fill_prompt("Photo of a {}.", ["cat"]) == "Photo of <cat>."
    assert cc101.fill_prompt("{} swimming in a pool.", ["cat"]) == "<cat> swimming in a pool."
    assert cc101.fill_prompt("An {} at the beach", ["owl"]) == "<owl> at the beach"
    assert cc101.fill_prompt("A banana next to {}", ["dog"]) == "A banana next to <dog>"
    assert cc101.fill_prompt("photo of the {0} and {1}.", ["a", "b"]) == "photo of <a> and <b>."
    assert cc101.fill_prompt("A {1} chasing an {0}", ["a", "b"]) == "<b> chasing <a>"
    with pytest.raises(LatexBlendError, match=r"slot \{2\}"):
        cc101.fill_prompt("{0} and {2}", ["a", "b"])
    with pytest.raises(LatexBlendError, match=r"no \{\} slot"):
        cc101.fill_prompt("a dog", ["a"])


def test_jobs_for_selected_concepts_and_pairs(bench, tmp_path):
    jobs = cc101.make_jobs(bench, ["pet_cat1"], ["all"], tmp_path / "out")
    cat, dog = (str((bench / "benchmark_dataset" / name).resolve()) for name in ("pet_cat1", "pet_dog1"))
    assert jobs == [
        {"name": "pet_cat1", "kind": "single", "concepts": ["pet_cat1"], "class_nouns": {"pet_cat1": "cat"},
         "prompts": ["Photo of <pet_cat1>.", "<pet_cat1> swimming in a pool.", "a sculpture of <pet_cat1>."],
         "references": {"pet_cat1": cat}, "out": str((tmp_path / "out" / "pet_cat1").resolve())},
        {"name": "pet_cat1+pet_dog1", "kind": "pair", "concepts": ["pet_cat1", "pet_dog1"],
         "class_nouns": {"pet_cat1": "cat", "pet_dog1": "dog"},
         "prompts": ["photo of <pet_cat1> and <pet_dog1>.", "<pet_dog1> chasing <pet_cat1> on a beach."],
         "references": {"pet_cat1": cat, "pet_dog1": dog},
         "out": str((tmp_path / "out" / "pet_cat1+pet_dog1").resolve())},
    ]
    assert [j["name"] for j in cc101.make_jobs(bench, ["all"], [], tmp_path)] == ["pet_cat1", "pet_dog1"]


def test_bad_benchmark_input_is_a_clear_error(bench, tmp_path):
    with pytest.raises(LatexBlendError, match="unknown concept pet_cow"):
        cc101.make_jobs(bench, ["pet_cow"], [], tmp_path)
    with pytest.raises(LatexBlendError, match="select some"):
        cc101.make_jobs(bench, [], [], tmp_path)
    with pytest.raises(LatexBlendError, match="dataset.json not found"):
        cc101.make_jobs(tmp_path, ["all"], [], tmp_path)
    data = json.loads((bench / "dataset.json").read_text())
    del data[1]["class_prompt"]
    (bench / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(LatexBlendError, match=r"dataset.json\[1\]: missing class_prompt"):
        cc101.make_jobs(bench, ["all"], [], tmp_path)
    (bench / "dataset_multiconcept.json").write_text(json.dumps([[_entry("pet_cat1", "cat")]]))
    with pytest.raises(LatexBlendError, match="exactly two concept entries"):
        cc101.make_jobs(bench, [], ["all"], tmp_path)
    (bench / "prompts" / "pet_pet.txt").unlink()
    pairs = [[_entry("pet_cat1", "cat"), _entry("pet_dog1", "dog"), {"prompt_filename_compose": "prompts/pet_pet.txt"}]]
    (bench / "dataset_multiconcept.json").write_text(json.dumps(pairs))
    with pytest.raises(LatexBlendError, match="prompt_filename_compose 'prompts/pet_pet.txt' not found"):
        cc101.make_jobs(bench, [], ["all"], tmp_path)


def fake_generate(job: dict, prompts: list[str] | None = None) -> None:
    """What `latexblend generate` leaves: one PNG per prompt and a metadata.json (docs/OUTPUT_FORMAT.md)."""
    out = Path(job["out"])
    images = []
    for i, prompt in enumerate(prompts if prompts is not None else job["prompts"]):
        _png(out / f"p{i:03d}_s0000000.png", i)
        images.append({"file": f"p{i:03d}_s0000000.png", "prompt_index": i, "prompt": prompt,
                       "expanded_prompt": prompt, "concepts": job["concepts"], "seed": 0})
    meta = {"format": "latexblend-samples", "format_version": 1,
            "concepts": {c: {"class_noun": job["class_nouns"][c], "references": None} for c in job["concepts"]},
            "images": images}
    (out / "metadata.json").write_text(json.dumps(meta))


def test_runner_is_resumable(bench, tmp_path):
    jobs = cc101.make_jobs(bench, ["all"], ["all"], tmp_path / "out")
    fake_generate(jobs[1])  # pet_dog1 already complete
    fake_generate(jobs[2], jobs[2]["prompts"][:1])  # the pair: a prompt missing -> does not match the job
    generated, evaluated = [], []

    def evaluate(job):
        evaluated.append(job["name"])
        refs = {n: {"n": 1, "files": [str(Path(d) / "0.jpg")]} for n, d in job["references"].items()}
        metrics = {"settings": {"references": refs},
                   "overall": {"n_images": 1, "clip_t": 0.2, "clipscore": 0.5, "n_pairs": len(job["concepts"]),
                               "clip_i": 0.5 + 0.1 * len(evaluated), "dino": None}}
        (Path(job["out"]) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def generate(job):
        generated.append(job["name"])
        fake_generate(job)

    quiet = {"log": lambda _: None}
    with pytest.raises(LatexBlendError, match=r"pet_cat1\+pet_dog1 .* does not match the job"):
        cc101.run_jobs(jobs, generate, evaluate, **quiet)
    (Path(jobs[2]["out"]) / "metadata.json").unlink()
    rows = cc101.run_jobs(jobs, generate, evaluate, **quiet)
    assert generated == ["pet_cat1", "pet_cat1+pet_dog1"]
    assert evaluated == ["pet_cat1", "pet_dog1", "pet_cat1+pet_dog1"]  # the first two kept from the failed run
    assert [r["clip_i"] for r in rows] == pytest.approx([0.6, 0.7, 0.8])
    again = cc101.run_jobs(jobs, generate, evaluate, **quiet)
    assert len(generated) == 2 and len(evaluated) == 3 and again == rows  # nothing redone
    jobs[1]["references"]["pet_dog1"] = str(bench / "benchmark_dataset" / "pet_cat1")  # other references
    assert cc101.run_jobs(jobs, generate, evaluate, **quiet)[1]["clip_i"] == pytest.approx(0.9)
    assert evaluated[3:] == ["pet_dog1"]
    table = cc101.results_table(rows)
    assert [r["name"] for r in table] == [*(j["name"] for j in jobs), "mean (single)", "mean (pair)"]
    assert table[3]["clip_i"] == pytest.approx(0.65) and table[3]["n_pairs"] == 2 and table[3]["dino"] is None
    with pytest.raises(LatexBlendError, match="left no complete metadata.json"):
        cc101.run_jobs(cc101.make_jobs(bench, ["pet_cat1"], [], tmp_path / "new"), lambda job: None)


_FAKE_GENERATE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_cc101 import fake_generate
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
prompts = Path(args["--prompts-file"]).read_text().splitlines()
concepts = args["--concepts"].split(",")
fake_generate({{"out": args["--out"], "concepts": concepts, "class_nouns": {{c: "thing" for c in concepts}}}}, prompts)
"""


def test_cc101_commands_end_to_end(bench, tmp_path, eval_model_dirs):
    jobs_file = tmp_path / "jobs.json"
    r = runner.invoke(app, ["cc101", "jobs", "--root", str(bench), "--concepts", "pet_dog1", "--pairs",
                            "pet_cat1+pet_dog1", "--out", str(jobs_file), "--samples-root", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "wrote 2 jobs (3 prompts)" in r.output
    script = tmp_path / "fake_generate.py"
    script.write_text(_FAKE_GENERATE_SCRIPT.format(tests=str(Path(__file__).parent)))
    cmd = f"{sys.executable} {script} --prompts-file {{prompts_file}} --concepts {{concepts}} --out {{out}}"
    models = ["--clip-model", str(eval_model_dirs[0]), "--dino-model", str(eval_model_dirs[1]), "--device", "cpu"]
    r = runner.invoke(app, ["cc101", "run", "--jobs", str(jobs_file), "--generate-cmd", cmd, *models])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "pet_dog1.prompts.txt").read_text() == "A banana next to <pet_dog1>\n"
    results = json.loads((tmp_path / "cc101_results.json").read_text())
    assert [row["name"] for row in results] == ["pet_dog1", "pet_cat1+pet_dog1", "mean (single)", "mean (pair)"]
    pair = json.loads((tmp_path / "out" / "pet_cat1+pet_dog1" / "metrics.json").read_text())
    assert set(pair["per_concept"]) == {"pet_cat1", "pet_dog1"} and pair["overall"]["n_pairs"] == 4
    assert results[1]["clip_i"] == pytest.approx(pair["overall"]["clip_i"])
    r = runner.invoke(app, ["cc101", "run", "--jobs", str(jobs_file), "--generate-cmd", "false", *models])
    assert r.exit_code == 0 and r.output.count("not generating again") == 2  # resumed: `false` never ran
    r = runner.invoke(app, ["cc101", "run", "--jobs", str(jobs_file), "--generate-cmd", "gen {oops}"])
    assert r.exit_code == 2 and r.output.startswith("error: --generate-cmd") and r.output.count("\n") == 1
