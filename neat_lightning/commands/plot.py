"""``neat plot runs/<name>``: a run's CSV metrics as PNG curves, one figure per metric group.

    neat plot runs/quickstart                 # every version_N/metrics.csv, written to runs/quickstart/plots/
    neat plot runs/quickstart --version 2 --out figs/

Metrics are grouped by the part of their name after the split prefix (``train/loss`` and ``val/loss`` share the
``loss`` figure), so training and validation curves sit on the same axes.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric name: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    series[key].append((step, float(value)))
                except ValueError:
                    continue
    return dict(series)


def plot_run(run_dir: Path, out_dir: Path, version: int | None = None) -> list[Path]:
    """Write one PNG per metric group; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dir.is_dir():
        raise FileNotFoundError(f"neat plot: no such run directory: {str(run_dir)!r}")
    pattern = f"version_{version}/metrics.csv" if version is not None else "version_*/metrics.csv"
    files = sorted(run_dir.glob(pattern), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"neat plot: no {pattern} under {str(run_dir)!r} (was the run logged with CSVLogger?)")
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for path in files:
        for name, points in read_metrics(path).items():
            label = name if len(files) == 1 else f"{name} ({path.parent.name})"
            groups[name.split("/", 1)[-1]][label] = points
    if not groups:
        raise ValueError(f"neat plot: {[str(f) for f in files]} hold no metric values")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, curves in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in sorted(curves.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(group)
        ax.set_title(f"{run_dir.name}: {group}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{group.replace('/', '_')}.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neat plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/quickstart")
    parser.add_argument("--version", type=int, default=None, help="only this version_N (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "plots", args.version)
    except (FileNotFoundError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
