"""ONNX export of a model artifact, checked against torch, and the ONNX Runtime forward pass.

Serving embeds on ONNX Runtime because it ran the built-in model 1.9-2.3x faster than torch
eager on one CPU thread with the same outputs, and stayed level with OpenVINO (faster on an
idle machine) when other processes shared the CPU (`benchmarks/inference_backends.py`,
docs/service.md, "Embedding runtimes"). Torch stays the training path and the fallback: an
export that fails, or whose outputs differ from torch's (cosine below `MIN_COSINE` on a few
check images), is refused, and the embedder says why it uses torch.

The export is cached beside the weights as `model.onnx`, with `model.onnx.json` recording the
SHA-256 of the weights it was made from, of the graph itself and the check's result, so a stale
or swapped file is never used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from training.checkpoint import WEIGHTS_FILE, Embedder, ModelCard, load_model
from training.data.transforms import build_test_transform
from training.fsutil import file_digest
from training.models.embedding import EmbeddingModel
from training.threads import ThreadPolicy

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_RECORD = "model.onnx.json"
OPSET = 17  # supported by every onnxruntime and OpenVINO release of the last three years
MIN_COSINE = 0.9999  # per check image, ONNX Runtime against torch
CHECK_IMAGES = 4

Backend = Literal["auto", "onnxruntime", "torch"]


class ExportError(RuntimeError):
    """The model could not be exported, or its export does not reproduce torch's embeddings."""


class _EmbedOutput(nn.Module):
    """The graph to export: images in, L2-normalised float32 embeddings out."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def weights_digest(directory: Path) -> str:
    return file_digest(Path(directory) / WEIGHTS_FILE)


def check_images(card: ModelCard, count: int = CHECK_IMAGES) -> torch.Tensor:
    """Preprocessed images with structure (gradients, blocks, noise), the same every time."""
    generator = torch.Generator().manual_seed(0)
    size = card.preprocessing.image_size
    transform = build_test_transform(card.preprocessing.transform_config())
    ramp = torch.linspace(0, 255, size + 32)
    images = []
    for i in range(count):
        base = (ramp[None, :] + ramp[:, None] * (i + 1) / count) % 256
        noise = torch.randint(0, 64, (3, size + 32, size + 32), generator=generator)
        blocks = (torch.arange(size + 32)[:, None] // (8 + 4 * i) % 2) * 96
        pixels = (base[None] * 0.6 + noise + blocks[None]).clamp(0, 255).to(torch.uint8)
        images.append(transform(pixels))
    return torch.stack(images)


def cosine_to_torch(model: EmbeddingModel, session: OnnxForward, images: torch.Tensor) -> float:
    """The lowest cosine similarity between torch's and ONNX Runtime's embedding of an image."""
    with torch.inference_mode():
        expected = model.eval().embed(images).numpy()
    actual = session(images)
    cosines = (expected * actual).sum(axis=1) / (
        np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    )
    return float(cosines.min())


def export_onnx(artifact: Path, destination: Path | None = None) -> Path:
    """Export the artifact's embedder to ONNX (dynamic batch), check it against torch and write
    it with its record (`destination` defaults to `model.onnx` in the artifact); atomic."""
    artifact = Path(artifact)
    destination = artifact / ONNX_FILE if destination is None else Path(destination)
    model, card, _ = load_model(artifact)
    images = check_images(card)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, staging_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(handle)
    staging = Path(staging_name)
    try:
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated in favour of the dynamo one, which
                # needs the onnxscript package; it works, and its output is checked below.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    _EmbedOutput(model).eval(),
                    (images[:2],),
                    str(staging),
                    input_names=["images"],
                    output_names=["embeddings"],
                    dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
        except Exception as error:  # the exporter raises many types for unsupported layers
            raise ExportError(f"torch.onnx.export failed: {error}") from error
        try:
            cosine = cosine_to_torch(model, OnnxForward(staging, threads=1), images)
        except Exception as error:
            raise ExportError(f"ONNX Runtime cannot run the export: {error}") from error
        if not cosine >= MIN_COSINE:
            raise ExportError(
                f"the export's embeddings differ from torch's (lowest cosine {cosine:.6f}, "
                f"need {MIN_COSINE})"
            )
        onnx_digest = file_digest(staging)
        os.replace(staging, destination)
    finally:
        staging.unlink(missing_ok=True)
    record = {
        "weights_sha256": weights_digest(artifact),
        "onnx_sha256": onnx_digest,
        "opset": OPSET,
        "min_cosine_to_torch": cosine,
        "check_images": len(images),
        "torch": torch.__version__,
    }
    _write_atomic(destination.with_name(destination.name + ".json"), json.dumps(record, indent=2))
    return destination


def current_export(artifact: Path) -> Path | None:
    """The artifact's checked `model.onnx` if it was made from these weights, else None."""
    artifact = Path(artifact)
    onnx_path, record_path = artifact / ONNX_FILE, artifact / ONNX_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not onnx_path.is_file() or record.get("weights_sha256") != weights_digest(artifact):
        return None
    if record.get("onnx_sha256") != file_digest(onnx_path):  # replaced since it was checked
        return None
    return onnx_path


def remove_export(artifact: Path) -> None:
    """Delete an artifact's export and record (one that came with it is not ours to trust)."""
    for name in (ONNX_FILE, ONNX_RECORD):
        (Path(artifact) / name).unlink(missing_ok=True)


def ensure_export(artifact: Path) -> Path:
    """The artifact's checked ONNX export: an existing one made from these weights is checked
    against torch again, otherwise (or if it fails) it is exported now. Raises `ExportError`,
    leaving the artifact without an export."""
    artifact = Path(artifact)
    existing = current_export(artifact)
    if existing is not None:
        model, card, _ = load_model(artifact)
        try:
            forward = OnnxForward(existing, threads=1)
            if cosine_to_torch(model, forward, check_images(card)) >= MIN_COSINE:
                return existing
        except Exception as error:  # a corrupt or foreign file: export afresh
            logger.info("%s: %s; exporting again", existing, error)
    remove_export(artifact)
    return export_onnx(artifact)


def _write_atomic(path: Path, text: str) -> None:
    """Several processes may export the same model at once: each writes its own staging file."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


class OnnxForward:
    """A preprocessed float batch (N, 3, H, W) -> embeddings (N, d), on ONNX Runtime's CPU
    provider with `threads` intra-op threads that sleep when idle (`training.threads`)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (embeddings,) = self.session.run(["embeddings"], {"images": batch})
        return np.asarray(embeddings, dtype=np.float32)


def load_inference_embedder(
    artifact: Path,
    device: str | torch.device = "cpu",
    backend: Backend = "auto",
    threads: int | None = None,
) -> Embedder:
    """The service's embedder: ONNX Runtime on a CPU when the artifact has (or can be given) a
    checked export, else torch. `backend="onnxruntime"` raises `ExportError` instead of falling
    back; `threads` defaults to the process's `ThreadPolicy`."""
    artifact = Path(artifact)
    model, card, extras = load_model(artifact)
    threads = ThreadPolicy.from_environment().threads if threads is None else threads
    if backend == "torch":
        return Embedder(model, card, extras, device, backend_reason="asked for torch")
    if torch.device(device).type != "cpu":
        if backend == "onnxruntime":
            raise ExportError(f"the ONNX Runtime backend runs on the CPU, not on {device}")
        return Embedder(model, card, extras, device, backend_reason=f"torch on {device}")
    try:
        onnx_path = current_export(artifact)
        if onnx_path is None:  # registered before exports existed, or its export failed then
            onnx_path = export_onnx(artifact)
            logger.info("exported %s to ONNX", artifact)
        forward = OnnxForward(onnx_path, threads)
    except Exception as error:  # ExportError, no onnxruntime, or a graph it cannot load
        if backend == "onnxruntime":
            raise ExportError(str(error)) from error
        reason = f"ONNX Runtime unavailable for this model: {error}"
        logger.warning("%s: %s; embedding with torch", artifact, reason)
        return Embedder(model, card, extras, device, backend_reason=reason)
    return Embedder(
        model,
        card,
        extras,
        device,
        forward=forward,
        backend="onnxruntime",
        backend_reason=f"checked export, {threads} intra-op threads",
    )
