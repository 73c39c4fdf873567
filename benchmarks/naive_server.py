"""A naive image-search server, the peer `search_latency.py --peer` compares lookalike with.

What a first FastAPI version of this product looks like: a synchronous handler (FastAPI runs it
in its thread pool) that decodes the upload with PIL, preprocesses it, runs the torch model at
batch 1 and searches an exact FAISS index; no batching, torch's and OpenMP's default threads
(`LOOKALIKE_THREAD_POLICY=off`: lookalike's thread policy is not applied). Same model, same
preprocessing and same vectors as the service, so only the serving differs.

    python benchmarks/naive_server.py --model ARTIFACT --vectors VECTORS.npy --port 8100
"""

from __future__ import annotations

import io
import os

os.environ["LOOKALIKE_THREAD_POLICY"] = "off"  # before `training` is imported

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from training.checkpoint import load_model
from training.data.transforms import build_test_transform


def create_app(model_dir: Path, vectors: np.ndarray) -> FastAPI:
    model, card, _ = load_model(model_dir)
    model.eval()
    transform = build_test_transform(card.preprocessing.transform_config())
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/search")
    def search(image: UploadFile = File(...), k: int = Form(10)) -> dict:
        started = time.perf_counter()
        picture = Image.open(io.BytesIO(image.file.read())).convert("RGB")
        pixels = torch.from_numpy(np.asarray(picture)).permute(2, 0, 1)
        with torch.inference_mode():
            query = model.embed(transform(pixels)[None]).numpy()
        scores, ids = index.search(query, k)
        return {
            "results": [
                {"id": int(i), "score": float(s)} for i, s in zip(ids[0], scores[0], strict=True)
            ],
            "took_ms": (time.perf_counter() - started) * 1000,
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, required=True, help=".npy, (n, d) float32")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = create_app(args.model, np.load(args.vectors))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
