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


def test_the_readme_picture_is_drawn_from_a_demo_folder_prompt_by_prompt(tmp_path):
    """scripts/demo_picture.py: one row per prompt, its images in seed order at 3x, blended left and plain right."""
    import json

    from PIL import Image

    from conftest import load_script

    picture = load_script("demo_picture")
    for side, value in (("blended", 200), ("plain", 50)):
        (tmp_path / side).mkdir()
        images = []
        for p in range(2):
            for seed in (1, 0):  # listed out of order: drawn in seed order
                name = f"p{p:03d}_s{seed:07d}.png"
                Image.new("RGB", (32, 32), (value, 10 * seed, 100 * p)).save(tmp_path / side / name)
                images.append({"file": name, "prompt_index": p, "prompt": f"prompt {p}", "seed": seed})
        (tmp_path / side / "metadata.json").write_text(json.dumps({"images": images}))
    canvas = picture.compose(tmp_path / "blended", tmp_path / "plain")
    side = 32 * picture.SCALE
    assert canvas.size == (2 * 2 * side + 3 * picture.MARGIN + picture.GAP,
                           picture.MARGIN + picture.HEADING + 2 * (picture.LINE + side + picture.GAP))
    y = picture.MARGIN + picture.HEADING + (picture.LINE + side + picture.GAP) + picture.LINE + side // 2
    left, right = picture.MARGIN, picture.MARGIN + 2 * side + picture.MARGIN + picture.GAP
    assert canvas.getpixel((left + side // 2, y)) == (200, 0, 100)  # prompt 1, seed 0 first
    assert canvas.getpixel((left + side + side // 2, y)) == (200, 10, 100)
    assert canvas.getpixel((right + side // 2, y)) == (50, 0, 100)
