"""The README's commands refer to things that exist (issue 12, item 11)."""

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
