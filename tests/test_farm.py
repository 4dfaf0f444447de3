"""The concept farm: `latexblend train --concepts-dir DIR --index I` (or $SLURM_ARRAY_TASK_ID)."""

import pytest
from typer.testing import CliRunner

from conftest import random_bank
from latexblend.bank.format import save_bank
from latexblend.cli import app

runner = CliRunner()


@pytest.fixture()
def farm(tmp_path, monkeypatch):
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    for name, noun in (("zebra", "zebra"), ("corgi", "dog"), ("mug", "cup")):
        (concepts / f"{name}.yaml").write_text(f"images: {tmp_path / name}\nclass_noun: {noun}\nmodel: tiny\n")
        (tmp_path / name).mkdir()
    trained = []

    def fake_train(cfg, **kw):
        trained.append(cfg.name)
        return None  # as on a non-main process: the CLI prints nothing more

    monkeypatch.setattr("latexblend.train.loop.train", fake_train)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    return concepts, trained, tmp_path / "banks"


def train(concepts, banks, *args):
    return runner.invoke(app, ["train", "--concepts-dir", str(concepts), "--bank-dir", str(banks), *map(str, args)])


def test_index_picks_concepts_in_sorted_order(farm):
    concepts, trained, banks = farm
    for i in range(3):
        assert train(concepts, banks, "--index", i).exit_code == 0
    assert trained == ["corgi", "mug", "zebra"]


def test_slurm_array_variable_is_the_default_index(farm, monkeypatch):
    concepts, trained, banks = farm
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert train(concepts, banks).exit_code == 0
    assert trained == ["zebra"]


def test_complete_bank_is_skipped_and_a_broken_one_retrained(farm, tiny_pipe):
    concepts, trained, banks = farm
    save_bank(random_bank(tiny_pipe.unet, name="corgi"), banks / "corgi.safetensors")
    (banks / "mug.safetensors").write_bytes(b"truncated")
    r = train(concepts, banks, "--index", 0)
    assert r.exit_code == 0 and "skip: concept 0 'corgi' already has a complete bank" in r.output
    assert train(concepts, banks, "--index", 1).exit_code == 0
    assert trained == ["mug"]


def test_two_concept_files_of_one_name_are_an_error_not_a_skip(farm, tiny_pipe, tmp_path):
    """A SLURM array must not report success for a concept that was never trained: the second of two files
    naming their concept 'corgi' used to print 'skip: already has a complete bank' and exit 0."""
    concepts, trained, banks = farm
    (tmp_path / "cat").mkdir()
    (concepts / "zz-other.yaml").write_text(f"name: corgi\nimages: {tmp_path / 'cat'}\nclass_noun: cat\n")
    for index in (0, 3):  # corgi.yaml and zz-other.yaml, in either order
        r = train(concepts, banks, "--index", index)
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert "corgi.yaml and zz-other.yaml" in r.output or "zz-other.yaml and corgi.yaml" in r.output
        assert "all name their concept 'corgi'" in r.output
    assert trained == []
    (concepts / "zz-other.yaml").unlink()  # a bank of the same name from other data (another folder's farm)
    bank = random_bank(tiny_pipe.unet, name="corgi", noun="cat", noun_ids=(2368,))
    bank.training = {"images": str(tmp_path / "cat")}
    save_bank(bank, banks / "corgi.safetensors")
    r = train(concepts, banks, "--index", 0)
    assert r.exit_code == 2 and "two concepts share the name 'corgi'" in r.output and trained == [], r.output
    bank.class_noun, bank.noun_ids, bank.training = "dog", [1929], {"images": str(tmp_path / "corgi")}
    save_bank(bank, banks / "corgi.safetensors")
    r = train(concepts, banks, "--index", 0)
    assert r.exit_code == 0 and "skip: concept 0 'corgi' already has a complete bank" in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["--index", "3"], "out of range"),
    (["--index", "-1"], "out of range"),
    (["--index", "0", "--concept", "corgi"], "do not combine"),
])
def test_bad_farm_input(farm, args, message):
    concepts, trained, banks = farm
    r = train(concepts, banks, *args)
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1
    assert trained == []


def test_empty_concepts_dir(tmp_path):
    r = runner.invoke(app, ["train", "--concepts-dir", str(tmp_path), "--index", "0"])
    assert r.exit_code == 2 and "no concept files" in r.output
