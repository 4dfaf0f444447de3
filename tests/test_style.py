"""House style that can be checked: short functions, first-party imports at module top (only the command
line imports lazily, for a quick ``--help``), no import cycles between modules or between packages, and a
model registry that names its builders instead of importing them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "latexblend"
LAZY = {"cli.py", "__init__.py"}  # the command line, and the package's lazy public API


def _modules() -> dict[str, Path]:
    """``latexblend.x.y`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _first_party(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The latexblend modules an import statement imports (``from a.b import c``: ``a.b.c`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "latexblend"]
    if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("latexblend"):
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]


def _graph() -> dict[str, set[str]]:
    """Module -> the first-party modules its top-level imports name."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for node in tree.body for m in _first_party(node, modules) if m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_function_in_src_is_longer_than_60_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({lines} lines)")
    assert list(SRC.rglob("*.py"))
    assert not long, long


def test_first_party_imports_are_at_module_top_outside_the_command_line():
    modules, late = _modules(), []
    for path in modules.values():
        if path.name in LAZY and path.parent == SRC:
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                late += [f"{path.relative_to(SRC)}:{n.lineno}" for n in ast.walk(fn) if _first_party(n, modules)]
    assert not late, late


def test_no_import_cycles_between_modules_or_packages():
    graph = _graph()
    assert len(graph) > 30 and graph["latexblend.blend.blender"]  # the graph was read
    assert _cycle(graph) is None, _cycle(graph)
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        pkg = ".".join(module.split(".")[:2])
        packages.setdefault(pkg, set()).update(".".join(d.split(".")[:2]) for d in deps)
    packages = {p: d - {p} for p, d in packages.items()}
    assert _cycle(packages) is None, _cycle(packages)


def test_models_import_no_stage_and_name_their_builders():
    assert not {d for d in _graph()["latexblend.models"] if d.split(".")[1] in ("train", "bank", "blend", "toy",
                                                                                "evaluate")}
    from latexblend.models import REGISTRY

    assert REGISTRY["toy"].builder == "latexblend.toy.model:toy_model_dir"


def test_the_command_line_imports_no_heavy_library_for_its_options():
    """cli.py reads its help defaults from the option dataclasses, which stay light."""
    import subprocess
    import sys

    code = ("import sys; import latexblend.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
