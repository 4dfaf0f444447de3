"""The README and docs refer to things that exist, and the README stays a short tour."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_concept_the_readme_trains_has_a_concept_file():
    names = re.findall(r"train --concept (\S+)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert names
    for name in names:
        assert (ROOT / "configs" / "concepts" / f"{name}.yaml").is_file(), name


def test_the_demo_bank_folder_is_spelled_out_where_banks_are_used():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--dir demo/concept_bank" in readme
    demo = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    printed = demo[demo.index("cat <<DONE"):]
    for command in ("latexblend bank ls --dir $W/concept_bank", "latexblend generate "):
        assert command in printed
    assert re.search(r"latexblend generate .*--dir \$W/concept_bank", printed)


def test_the_readme_layout_names_every_stage_and_module():
    """The README's layout names every package folder and every top-level module, so the folder list is the map."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    src = ROOT / "src" / "latexblend"
    names = [p.name for p in src.glob("*.py") if not p.name.startswith("__")]
    names += [f"{p.name}/" for p in src.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    assert len(names) > 10
    missing = [n for n in sorted(names) if f"`{n}`" not in layout]
    assert not missing, missing


def _links(path: Path) -> list[str]:
    """Relative targets of the Markdown links and images in ``path`` (web links and pure anchors left out)."""
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_file_the_readme_and_docs_link_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [f"{page.relative_to(ROOT)} -> {target}" for page in pages for target in _links(page)
               if not (page.parent / target).exists()]
    assert _links(ROOT / "README.md")
    assert not missing, missing


def test_the_readme_is_a_short_tour():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 180
