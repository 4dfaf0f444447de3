"""The outputs of ``latexblend evaluate``: ``metrics.json``, ``metrics.csv`` (one row per image and concept),
the printed table and ``report.html`` (metrics with thumbnails of the references and of every image)."""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from latexblend.fileio import atomic_path, open_image, write_text_atomic

THUMB_PX = 128
ASSETS = "report_assets"


CSV_FIELDS = ["file", "prompt_index", "seed", "concept", "text", "clip_t", "clipscore", "clip_i", "dino", "n_refs"]


def csv_rows(metrics: Mapping) -> list[dict]:
    """One row per (image, concept); an image without concepts gives one row with an empty concept."""
    out = []
    for row in metrics["images"]:
        base = {k: row[k] for k in ("file", "prompt_index", "seed", "text", "clip_t", "clipscore")}
        for name, vals in (row["per_concept"] or {"": {"clip_i": None, "dino": None, "n_refs": 0}}).items():
            out.append({**base, "concept": name, **vals})
    return out


def _csv_text(metrics: Mapping) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(metrics):
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table_lines(metrics: Mapping) -> list[str]:
    """The printed table: overall, then one line per concept."""
    head = f"{'':<24} {'images':>6} {'CLIP-T':>7} {'CLIPScore':>9} {'pairs':>5} {'CLIP-I':>7} {'DINO':>7}"
    lines = [head]
    rows = [("overall", metrics["overall"]), *metrics["per_concept"].items()]
    for name, s in rows:
        lines.append(f"{name[:24]:<24} {s['n_images']:>6} {_fmt(s['clip_t']):>7} {_fmt(s['clipscore']):>9} "
                     f"{s['n_pairs']:>5} {_fmt(s['clip_i']):>7} {_fmt(s['dino']):>7}")
    lines += [f"skipped {s['kind']} {s.get('name') or s.get('file')}: {s['reason']}" for s in metrics["skipped"]]
    return lines


def write_outputs(metrics: Mapping, samples_dir: str | Path, report: bool = True) -> list[Path]:
    """Write ``metrics.json``, ``metrics.csv`` and (optionally) ``report.html`` + assets, each atomically."""
    folder = Path(samples_dir)
    written = []
    if report:
        written.append(write_report(metrics, folder))
    written.append(write_text_atomic(folder / "metrics.csv", _csv_text(metrics)))
    written.append(write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n"))
    return written


# --------------------------------------------------------------------------- report.html

_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:260px;font-size:12px}.cell img{width:256px}
.refs img{width:128px;margin:2px}.prompt{font-family:monospace}.skip{color:#a00}"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(quote(src))}" alt="{_e(alt)}" loading="lazy">'


def _copy_thumbnails(metrics: Mapping, folder: Path) -> dict[str, list[str]]:
    """Downscaled copies of every concept's references in ``folder/report_assets`` (replaced as a whole)."""

    staging = Path(tempfile.mkdtemp(prefix=f".{ASSETS}.", dir=folder))
    staging.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    thumbs: dict[str, list[str]] = {}
    try:
        for c, (name, info) in enumerate(metrics["settings"]["references"].items()):
            for j, path in enumerate(info["files"]):
                image = open_image(path)
                image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
                image.save(staging / f"ref_{c:03d}_{j:03d}.png")
                thumbs.setdefault(name, []).append(f"{ASSETS}/ref_{c:03d}_{j:03d}.png")
        shutil.rmtree(folder / ASSETS, ignore_errors=True)
        staging.rename(folder / ASSETS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return thumbs


def _metric_table(metrics: Mapping) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("", "images", "CLIP-T", "CLIPScore", "pairs", "CLIP-I", "DINO"))
    body = ""
    for name, s in [("overall", metrics["overall"]), *metrics["per_concept"].items()]:
        cells = [s["n_images"], _fmt(s["clip_t"]), _fmt(s["clipscore"]), s["n_pairs"], _fmt(s["clip_i"]),
                 _fmt(s["dino"])]
        body += f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>\n"
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _concepts_html(metrics: Mapping, thumbs: Mapping[str, list[str]]) -> str:
    parts = []
    for name in metrics["per_concept"]:
        images = "".join(_img(src, f"reference of {name}") for src in thumbs.get(name, []))
        images = images or '<p class="skip">no references</p>'
        parts.append(f'<h3>{_e(name)}</h3>\n<div class="refs">{images}</div>')
    return "\n".join(parts)


def _cell(row: Mapping) -> str:
    lines = [f"CLIP-T {_fmt(row['clip_t'])} / CLIPScore {_fmt(row['clipscore'])}"]
    lines += [f"{name}: CLIP-I {_fmt(v['clip_i'])}, DINO {_fmt(v['dino'])}" for name, v in row["per_concept"].items()]
    caption = "<br>".join(_e(line) for line in lines)
    return f'<div class="cell">{_img(row["file"], row["file"])}<br>seed {_e(row["seed"])}<br>{caption}</div>'


def _prompts_html(metrics: Mapping) -> str:
    parts = []
    for index, s in metrics["per_prompt"].items():
        rows = [r for r in metrics["images"] if str(r["prompt_index"]) == index]
        parts.append(f"<h3>prompt {_e(index)}</h3>\n<p class=\"prompt\">{_e(s['prompt'])}<br>CLIP text: "
                     f"{_e(rows[0]['text'])}</p>\n<div class=\"grid\">{''.join(_cell(r) for r in rows)}</div>")
    return "\n".join(parts)


def report_html(metrics: Mapping, thumbs: Mapping[str, list[str]]) -> str:
    """The self-contained report page (inline CSS, relative image paths only, all text escaped)."""
    st = metrics["settings"]
    skipped = "".join(f"<li>{_e(s['kind'])} {_e(s.get('name') or s.get('file'))}: {_e(s['reason'])}</li>"
                      for s in metrics["skipped"])
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>latexblend evaluation</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>latexblend evaluation</h1>\n<p>CLIP {_e(st['clip_model'])}, DINO {_e(st['dino_model'])}; "
            f"text policy <b>{_e(st['text_policy'])}</b>: {_e(st['text_policy_note'])}.</p>\n"
            f"<h2>Metrics</h2>\n{_metric_table(metrics)}\n"
            f"<h2>Concepts and references</h2>\n{_concepts_html(metrics, thumbs)}\n"
            f"<h2>Prompts</h2>\n{_prompts_html(metrics)}\n"
            f"<h2>Skipped</h2>\n<ul>{skipped or '<li>nothing</li>'}</ul>\n</body>\n</html>\n")


def write_report(metrics: Mapping, samples_dir: str | Path) -> Path:
    """Write ``report.html`` (and ``report_assets/``) into the samples folder."""
    folder = Path(samples_dir)
    thumbs = _copy_thumbnails(metrics, folder)
    with atomic_path(folder / "report.html") as tmp:
        tmp.write_text(report_html(metrics, thumbs), encoding="utf-8")
    return folder / "report.html"
