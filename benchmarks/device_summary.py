"""The key figures of a ``scripts/device_check.sh`` folder, one line each, against issue 24's targets.

    python -m benchmarks.device_summary FOLDER     # prints; device_check.sh appends it to summary.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mark(value, limit) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ({'meets' if value <= limit else 'misses'} <= {limit})"


def train_lines(data: dict, label: str) -> list[str]:
    lines = []
    for row in data["rows"]:
        ckpt = "on" if row["gradient_checkpointing"] else "off"
        lines.append(f"{label} (checkpointing {ckpt}, {data['size']} px, {data['batch']}): {row['path']} "
                     f"{row['steps_per_s']} steps/s (eager {row['eager_steps_per_s']}, "
                     f"stock {row['stock_steps_per_s']}),"
                     f" MFU {row['mfu']}, {row['ops_per_step']} ops/step (stock {row['stock_ops_per_step']}),"
                     f" peak {row['peak_gib']} GiB alloc / {row['reserved_gib']} reserved (stock "
                     f"{row['stock_peak_gib']} / {row['stock_reserved_gib']}), capture {row['capture_s']} s")
        lines.append(f"  ours/stock: time {_mark(row['ours_vs_stock_time'], 1.05)}, ops "
                     f"{_mark(row['ours_vs_stock_ops'], 1.05)}, peak {_mark(row['ours_vs_stock_peak'], 1.05)}; "
                     f"eager/stock time {row['eager_vs_stock_time']}")
    for on, graph in (data.get("graph") or {}).items():
        lines.append(f"  graph (checkpointing {on}): {graph.get('path_note')}; {' | '.join(graph.get('log') or [])}")
    if data.get("compile_s") is not None:
        lines.append(f"  compile (regional, first steps): {data['compile_s']:.1f} s (target <= 60 s)")
    return lines


def modes_lines(data: dict) -> list[str]:
    rows = {r["mode"]: r for r in data["rows"]}
    lines = [f"modes ({data['size']} px, {data['steps']} steps, {data['rows'][0]['concepts']} concepts): "
             + ", ".join(f"{m} {r['seconds']} s ({r['vs_plain']}x plain, {r['flop_vs_plain']}x FLOPs, "
                         f"graphs {r.get('graphs')})" for m, r in rows.items())]
    plain = rows.get("plain")
    for mode, limit in (("guidance", 1.25), ("rectify", 1.10)):
        for variant in (mode, f"{mode}_eager"):
            if variant in rows and plain:
                lines.append(f"  {variant} / plain: {_mark(rows[variant]['vs_plain'], limit)}")
    if "plain_graphs" in rows and plain:
        for mode in ("guidance", "rectify"):
            if mode in rows:
                lines.append(f"  {mode} / plain_graphs: {rows[mode]['seconds'] / rows['plain_graphs']['seconds']:.3f}")
    for key, events in (data.get("graph_events") or {}).items():
        lines.append(f"  {key}: {' | '.join(events)}")
    return lines


def summary(folder: Path) -> list[str]:
    lines = []
    for name, label in (("bench_train.json", "train"), ("bench_train_1024.json", "train 1024 px"),
                        ("bench_train_compiled.json", "train compiled"), ("bench_train_batch.json", "train batch 4")):
        data = _load(folder, name)
        if data:
            lines += train_lines(data, label)
    data = _load(folder, "bench_modes.json")
    if data:
        lines += modes_lines(data)
    data = _load(folder, "train_profile/train_profile.json")
    if data:
        lines.append(f"train_profile: {data['ops_per_step']:.0f} ops per eager step, {data['tflop_per_step']:.3f} "
                     f"TFLOP")
    data = _load(folder, "bench_generate.json")
    if data:
        lines.append("generate: " + ", ".join(f"{r['concepts']} concepts {r['ratio']}x stock" for r in data["rows"]))
    return lines or ["no results"]


def main() -> None:
    print("\n".join(summary(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
