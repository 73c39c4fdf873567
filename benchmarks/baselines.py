"""Train and evaluate the baselines on the offline benchmarks; print a markdown results table.

Each run is an ordinary `lookalike` command (printed as it starts), so every number in
docs/results.md can be reproduced one by one:

    python benchmarks/baselines.py --datasets icons cjk --methods pretrained margin triplet
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r"]
IMAGE_SIZE = 112  # the CPU presets' resolution
PICK_LABELS = {"best": "best-by-val", "last": "last"}  # the two models each run reports

# One fair protocol (issue 3): the dataset preset fixes backbone, resolution, augmentation,
# optimiser, batch size (64) and epochs for every method; only the method differs. A variant
# adds `lookalike train` options to the dataset's preset, or names a method preset of its own
# ("{dataset}" filled in) that extends the dataset's preset and so keeps the protocol.
VARIANTS = {
    "margin": ["--method", "margin"],
    "triplet": ["--method", "triplet"],
    "contrastive": ["--method", "contrastive"],
    "npair": ["--method", "npair"],
    # Four heads of 32 dimensions: the same 128-d test embedding as every other method.
    "diva": ["--method", "diva", "--embedding-dim", "32"],
    "diva-512": ["--method", "diva"],  # the paper's 4 x 128
    "diva-tuned": ["--preset", "diva-{dataset}"],
    "dvml-triplet": ["--method", "dvml", "--param", "base_loss=triplet"],
    "dvml-npair": ["--method", "dvml", "--param", "base_loss=npair"],
    "dvml-margin": ["--method", "dvml", "--param", "base_loss=margin"],
    "dvml-margin-tuned": ["--preset", "dvml-{dataset}"],
    "dvml-triplet-tuned": ["--preset", "dvml-{dataset}", "--param", "base_loss=triplet"],
    "dvml-npair-tuned": ["--preset", "dvml-{dataset}", "--param", "base_loss=npair"],
    # 16 clusters x 4 images: the same 64 images per batch as the others.
    "magnet": ["--method", "magnet", "--param", "clusters_per_batch=16"],
}


def variant_options(method: str, dataset: str) -> list[str]:
    """The `lookalike train` options of a variant on a dataset, its preset included."""
    options = [option.format(dataset=dataset) for option in VARIANTS[method]]
    return options if "--preset" in options else ["--preset", dataset, *options]


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def pretrained_row(dataset: str, data: Path, runs: Path) -> dict:
    model = runs / "pretrained-lite0"
    if not model.exists():
        run(
            [
                "lookalike",
                "pretrained",
                str(model),
                "--image-size",
                str(IMAGE_SIZE),
                "--test-crop-pct",
                "1.0",
            ]
        )
    out = runs / f"{dataset}-pretrained.json"
    preset = json.loads((Path("training/presets") / f"{dataset}.json").read_text())
    limit = ["--max-classes", str(preset["max_classes"])] if preset.get("max_classes") else []
    if not out.exists():
        run(
            [
                "lookalike",
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--json",
                str(out),
                *limit,
            ]
        )
    return {"test": json.loads(out.read_text()), "images_per_s": None}


def trained_row(
    dataset: str,
    method: str,
    data: Path,
    runs: Path,
    seed: int,
    budget: float | None,
    eval_train: bool,
    extra: list[str],
):
    """Train one method. With a budget in minutes the run stops on the clock; without one it
    runs the preset's epochs whatever the machine's load (the fair protocol)."""
    length = f"{budget:g}min" if budget else "preset"
    out = runs / f"{dataset}-{method}-{length}-s{seed}"
    limit = ["--time-budget", str(budget)] if budget else []
    if not (out / "results.json").exists():
        run(
            [
                "lookalike",
                "train",
                "--data",
                str(data),
                *variant_options(method, dataset),
                "--out",
                str(out),
                "--seed",
                str(seed),
                *(["--eval-train"] if eval_train else []),
                *limit,
                *extra,
            ]
        )
    return json.loads((out / "results.json").read_text())


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def row(dataset: str, method: str, label: str, result: dict, pick: str | None = None) -> str:
    metrics = result[pick] if pick else result
    test, train = metrics["test"], metrics.get("train") or {}
    wait, share = result.get("data_wait_fraction"), result.get("eval_fraction")
    cells = [
        dataset,
        method,
        label,
        *[fmt(test.get(c)) for c in COLUMNS],
        fmt(train.get("recall@1")),
        "-" if result.get("images_per_s") is None else f"{result['images_per_s']:.0f}",
        "-" if wait is None else f"{wait:.1%}",
        "-" if share is None else f"{share:.0%}",
    ]
    return "| " + " | ".join(cells) + " |"


def spread_row(dataset: str, method: str, results: list[dict], pick: str) -> str:
    """Mean ± sample standard deviation over seeds of one model's (`best` or `last`) metrics."""
    cells = [dataset, method, f"{PICK_LABELS[pick]}, mean ± sd of {len(results)} seeds"]
    for split, metric in [*(("test", column) for column in COLUMNS), ("train", "recall@1")]:
        values = np.array([(r[pick].get(split) or {}).get(metric, np.nan) for r in results])
        cells.append(
            "-" if np.isnan(values).any() else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
        )
    speeds = [r["images_per_s"] for r in results if r.get("images_per_s")]
    cells += [f"{np.mean(speeds):.0f}" if speeds else "-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["icons", "cjk"])
    parser.add_argument(
        "--methods", nargs="+", default=["pretrained", "margin", "triplet", "contrastive", "npair"]
    )
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="minutes of training per run (default: the preset's epochs, no clock)",
    )
    parser.add_argument(
        "--no-eval-train",
        dest="eval_train",
        action="store_false",
        help="skip train-split metrics (the memorisation check) to save time",
    )
    parser.add_argument("extra", nargs="*", help="more options for lookalike train (after --)")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    header = [
        "benchmark",
        "method",
        "model",
        *COLUMNS,
        "train R@1",
        "img/s",
        "data wait",
        "eval share",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in args.datasets:
        data = args.data_root / dataset
        for method in args.methods:
            if method == "pretrained":
                lines.append(
                    row(dataset, method, "untrained", pretrained_row(dataset, data, args.runs))
                )
                continue
            results = [
                trained_row(
                    dataset, method, data, args.runs, seed, args.budget, args.eval_train, args.extra
                )
                for seed in args.seeds
            ]
            for seed, result in zip(args.seeds, results, strict=True):
                for pick in ("best", "last"):
                    epoch = result[pick].get("epoch")
                    label = f"{PICK_LABELS[pick]} (ep {epoch}, s{seed})"
                    lines.append(row(dataset, method, label, result, pick))
            if len(results) > 1:
                lines += [spread_row(dataset, method, results, pick) for pick in ("best", "last")]
            print("\n".join(lines), flush=True)
    print("\n".join(lines))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
