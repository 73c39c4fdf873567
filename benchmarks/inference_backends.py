"""Images/s of the embedding forward pass on each CPU runtime, as ratios to torch eager.

Contenders, each with the same --threads intra-op threads (sleeping when idle, as the service
sets them: `training.threads`): torch eager (channels_last, inference mode, the training path),
ONNX Runtime (CPU provider, the service's backend) and OpenVINO (CPU plugin, latency hint), all
on the same ONNX export. Inputs are real preprocessed images (IconThemes test images when --data
is given, else the test suite's drawings). Each round runs every contender at batch 1 and at
--batch, interleaved, so all see the same background load; the machine's load average is
recorded per round.

    python benchmarks/inference_backends.py --data data/icons --rounds 3 --json runs/backends.json
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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import draw_sample  # noqa: E402
from training.checkpoint import load_embedder  # noqa: E402
from training.cli import pretrained  # noqa: E402
from training.export import OnnxForward, ensure_export  # noqa: E402
from training.threads import ThreadPolicy, apply  # noqa: E402

Forward = Callable[[torch.Tensor], np.ndarray]


def openvino_forward(onnx_path: Path, threads: int) -> Forward:
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(
        str(onnx_path),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()

    def forward(batch: torch.Tensor) -> np.ndarray:
        request.infer({0: batch.numpy()})
        return np.asarray(request.get_output_tensor(0).data).copy()

    return forward


def pictures(data: Path | None, count: int) -> list[torch.Tensor]:
    """uint8 CHW images: IconThemes test images, or the test suite's drawings."""
    from torchvision.io import ImageReadMode, decode_image

    if data is not None:
        files = sorted((data / "test").rglob("*.png"))[:count]
        return [decode_image(str(f), mode=ImageReadMode.RGB) for f in files]
    return [
        torch.from_numpy(np.asarray(draw_sample(i % 12, i).convert("RGB"))).permute(2, 0, 1)
        for i in range(count)
    ]


def rate(forward: Forward, images: torch.Tensor, batch: int, seconds: float) -> float:
    """Images/s over at least `seconds` of back-to-back forward passes."""
    done, started = 0, time.perf_counter()
    while True:
        for start in range(0, len(images) - batch + 1, batch):
            forward(images[start : start + batch])
            done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an IconThemes build (data/icons)")
    parser.add_argument("--model", type=Path, help="a model artifact; default the built-in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    apply(ThreadPolicy.resolve(threads=args.threads))

    with tempfile.TemporaryDirectory(prefix="backends-") as tmp:
        artifact = args.model
        if artifact is None:
            artifact = Path(tmp) / "builtin"
            pretrained(artifact)  # the built-in model: Lite0 ImageNet features, 224 px
        onnx_path = ensure_export(artifact)
        reference = load_embedder(artifact)
        images = torch.stack([reference.preprocess(p) for p in pictures(args.data, 64)])
        contenders: dict[str, Forward] = {
            "torch eager": reference._torch_forward,
            "onnxruntime": OnnxForward(onnx_path, args.threads),
            "openvino": openvino_forward(onnx_path, args.threads),
        }
        expected = reference._torch_forward(images[:8])
        agreement = {
            name: float(np.abs(forward(images[:8]) - expected).max())
            for name, forward in contenders.items()
        }
        for forward in contenders.values():  # warm-up: kernels chosen per input shape
            rate(forward, images, 1, 0.5)
            rate(forward, images, args.batch, 0.5)
        rounds = []
        for number in range(args.rounds):
            measured: dict[str, dict[str, float]] = {}
            for name, forward in contenders.items():
                measured[name] = {
                    "batch_1": rate(forward, images, 1, args.seconds),
                    f"batch_{args.batch}": rate(forward, images, args.batch, args.seconds),
                }
            rounds.append({"load_average": os.getloadavg()[0], "images_per_s": measured})
            print(json.dumps({"round": number, **rounds[-1]}), flush=True)

    keys = ["batch_1", f"batch_{args.batch}"]
    summary = {}
    for name in contenders:
        summary[name] = {}
        for key in keys:
            values = [r["images_per_s"][name][key] for r in rounds]
            ratios = [
                r["images_per_s"][name][key] / r["images_per_s"]["torch eager"][key] for r in rounds
            ]
            summary[name][key] = {
                "images_per_s": round(statistics.median(values), 1),
                "ratio": round(statistics.median(ratios), 2),
                "ratio_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
            }
    loads = [r["load_average"] for r in rounds]
    print(
        f"\n{args.threads} thread(s), {args.rounds} rounds, load average "
        f"{min(loads):.1f}-{max(loads):.1f}; median images/s (ratio to torch eager, min-max)\n"
    )
    print(f"| runtime | batch 1 | batch {args.batch} | max abs diff to torch |")
    print("|---|---|---|---|")
    for name, row in summary.items():
        cells = [
            f"{row[k]['images_per_s']} ({row[k]['ratio']:.2f}x, "
            f"{row[k]['ratio_min_max'][0]:.2f}-{row[k]['ratio_min_max'][1]:.2f})"
            for k in keys
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} | {agreement[name]:.1e} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"threads": args.threads, "rounds": rounds, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
