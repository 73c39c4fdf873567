"""Plot validation Recall@1 over training time for every run of a benchmark (docs/results.md).

    python benchmarks/plot_curves.py --dataset icons --out docs/img/icons-recall-over-time.png

Reads the `metrics.jsonl` each `lookalike train` run writes (one record per epoch) from the run
directories benchmarks/baselines.py made. The wall-clock panel shows what a run cost on the machine
as it was (other work slows it); the epoch panel is the fair comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_curve(run: Path) -> tuple[list[float], list[float], list[int]]:
    minutes, recall, epochs = [], [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("val"):
            minutes.append(record["elapsed_s"] / 60)
            recall.append(record["val"]["recall@1"])
            epochs.append(record["epoch"] + 1)
    return minutes, recall, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    runs = sorted(run for seed in args.seeds for run in args.runs.glob(f"{args.dataset}-*-s{seed}"))
    runs = [run for run in runs if (run / "metrics.jsonl").exists()]
    if not runs:
        raise SystemExit(f"no runs with metrics.jsonl under {args.runs} for {args.dataset}")
    figure, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # tab20's ten strong hues, then their light shades: distinct beyond the default cycle's 10.
    palette = plt.get_cmap("tab20").colors
    colours = palette[0::2] + palette[1::2]
    for index, run in enumerate(runs):
        method, _, seed = run.name.removeprefix(f"{args.dataset}-").rsplit("-", 2)
        label = method if len(args.seeds) == 1 else f"{method} {seed}"
        minutes, recall, epochs = load_curve(run)
        style = {"marker": ".", "label": label, "color": colours[index % len(colours)]}
        by_time.plot(minutes, recall, **style)
        by_epoch.plot(epochs, recall, **style)
    by_time.set(xlabel="training time (min, wall clock incl. validation)", ylabel="val Recall@1")
    by_epoch.set(xlabel="epoch (same images for every method)")
    for axis in (by_time, by_epoch):
        axis.grid(alpha=0.3)
    by_epoch.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{args.dataset}: validation Recall@1 during training")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
