"""House style that can be checked: no function in src/ longer than 60 lines (issue 13)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latexblend"


def test_no_function_in_src_is_longer_than_60_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert list(SRC.rglob("*.py"))
    assert not long, long
