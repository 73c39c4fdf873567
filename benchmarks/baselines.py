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

COLUMNS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r"]
IMAGE_SIZE = 112  # the CPU presets' resolution


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
    budget: float,
    eval_train: bool,
    extra: list[str],
):
    out = runs / f"{dataset}-{method}-{budget:g}min-s{seed}"
    if not (out / "results.json").exists():
        run(
            [
                "lookalike",
                "train",
                "--data",
                str(data),
                "--method",
                method,
                "--preset",
                dataset,
                "--out",
                str(out),
                "--seed",
                str(seed),
                *(["--eval-train"] if eval_train else []),
                "--time-budget",
                str(budget),
                *extra,
            ]
        )
    return json.loads((out / "results.json").read_text())


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["icons", "cjk"])
    parser.add_argument(
        "--methods", nargs="+", default=["pretrained", "margin", "triplet", "contrastive", "npair"]
    )
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=12, help="minutes of training per run")
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
                result = pretrained_row(dataset, data, args.runs)
                picks = [("untrained", result)]
            else:
                result = trained_row(
                    dataset,
                    method,
                    data,
                    args.runs,
                    args.seed,
                    args.budget,
                    args.eval_train,
                    args.extra,
                )
                picks = [
                    (f"best-by-val (ep {result['best'].get('epoch')})", result["best"]),
                    (f"last (ep {result['last'].get('epoch')})", result["last"]),
                ]
            for label, metrics in picks:
                test = metrics["test"]
                train = metrics.get("train") or {}
                wait = result.get("data_wait_fraction")
                cells = [
                    dataset,
                    method,
                    label,
                    *[fmt(test.get(c)) for c in COLUMNS],
                    fmt(train.get("recall@1")),
                    fmt(result.get("images_per_s")),
                    "-" if wait is None else f"{wait:.1%}",
                    "-"
                    if result.get("eval_fraction") is None
                    else f"{result['eval_fraction']:.0%}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            print("\n".join(lines), flush=True)
    print("\n".join(lines))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
