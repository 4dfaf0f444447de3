"""Every case of ``tests/error_cases.py``: one ``error:`` line, the exit code, no traceback, nothing written;
and ``docs/ERRORS.md`` is the table of exactly these cases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from benchmarks.cli import app as benchmarks_app
from typer.testing import CliRunner

from error_cases import BEHAVIOURS, CASES, KINDS, render
from latexblend.cli import app

ROOT = Path(__file__).resolve().parents[1]


def pattern(message: str, tmp: Path) -> re.Pattern:
    parts = [re.escape(p).replace(re.escape("{tmp}"), re.escape(str(tmp))) for p in message.split("…")]
    return re.compile(".*?".join(parts))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by accident lands here
    args = case.make(tmp_path, monkeypatch)
    result = CliRunner().invoke(benchmarks_app if case.program == "benchmarks" else app, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    assert result.exit_code == case.code, result.output
    assert result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert pattern(case.message, tmp_path).fullmatch(result.stderr.rstrip("\n")), result.stderr
    for path in case.absent:
        assert not (tmp_path / path).exists(), path


def test_errors_doc_is_current():
    doc = ROOT / "docs" / "ERRORS.md"
    assert doc.is_file() and doc.read_text(encoding="utf-8") == render(), \
        "docs/ERRORS.md is out of date: run `python scripts/errors_doc.py`"


def test_case_ids_are_unique_and_every_kind_has_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.kind for c in CASES} == set(KINDS)
    assert {kind for kind, _, _ in BEHAVIOURS} <= set(KINDS)


def test_every_behaviour_the_document_names_is_a_test():
    for _, _, where in BEHAVIOURS:
        for ref in where.split(", "):
            path, _, name = ref.partition("::")
            text = (ROOT / path).read_text(encoding="utf-8")
            assert not name or f"def {name}(" in text, ref
