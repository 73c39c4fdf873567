"""ONNX export: checked against torch, cached beside the weights by their digest, used by the
service's embedder when it checks out, refused (torch fallback, with the reason) when not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.app.conftest import write_tiny_artifact
from training import export
from training.checkpoint import load_embedder
from training.export import (
    MIN_COSINE,
    ONNX_FILE,
    ONNX_RECORD,
    ExportError,
    current_export,
    ensure_export,
    export_onnx,
    load_inference_embedder,
)
from training.fsutil import file_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny artifact with its export."""
    artifact = write_tiny_artifact(tmp_path_factory.mktemp("export") / "tiny")
    export_onnx(artifact)
    return artifact


def _pictures(count: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (3, 40 + i, 50), generator=generator).byte() for i in range(count)
    ]


def test_export_matches_torch_and_records_its_weights(exported: Path) -> None:
    record = json.loads((exported / ONNX_RECORD).read_text())
    assert record["min_cosine_to_torch"] >= MIN_COSINE
    assert record["weights_sha256"] == export.weights_digest(exported)
    assert current_export(exported) == exported / ONNX_FILE
    fast = load_inference_embedder(exported, threads=1)
    assert fast.backend == "onnxruntime"
    reference = load_embedder(exported)
    assert reference.backend == "torch"
    pictures = _pictures()
    expected, actual = reference.embed(pictures), fast.embed(pictures, batch_size=2)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose((expected * actual).sum(axis=1), 1.0, atol=1e-4)


def test_an_export_of_other_weights_is_not_used(exported: Path, tmp_path: Path) -> None:
    other = write_tiny_artifact(tmp_path / "other")
    (other / ONNX_FILE).write_bytes((exported / ONNX_FILE).read_bytes())
    record = json.loads((exported / ONNX_RECORD).read_text())
    record["weights_sha256"] = "0" * 64
    (other / ONNX_RECORD).write_text(json.dumps(record))
    assert current_export(other) is None
    assert ensure_export(other) == other / ONNX_FILE  # exported afresh
    assert current_export(other) == other / ONNX_FILE


def test_a_graph_replaced_after_its_check_is_not_used(tmp_path: Path) -> None:
    artifact = write_tiny_artifact(tmp_path / "tiny")
    export_onnx(artifact)
    graph = (artifact / ONNX_FILE).read_bytes()
    (artifact / ONNX_FILE).write_bytes(graph + b"\x00")  # same weights, another graph
    assert current_export(artifact) is None


def test_a_graph_onnx_runtime_cannot_load_falls_back_to_torch(tmp_path: Path) -> None:
    artifact = write_tiny_artifact(tmp_path / "tiny")
    export_onnx(artifact)
    (artifact / ONNX_FILE).write_bytes(b"not an onnx graph")
    record = json.loads((artifact / ONNX_RECORD).read_text())
    record["onnx_sha256"] = file_digest(artifact / ONNX_FILE)  # the record matches it
    (artifact / ONNX_RECORD).write_text(json.dumps(record))
    fallback = load_inference_embedder(artifact, threads=1)
    assert fallback.backend == "torch" and "ONNX Runtime unavailable" in fallback.backend_reason
    ensure_export(artifact)  # checked again, found wanting, exported afresh
    assert load_inference_embedder(artifact, threads=1).backend == "onnxruntime"


def test_a_failing_export_falls_back_to_torch_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = write_tiny_artifact(tmp_path / "tiny")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::made_up")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    embedder = load_inference_embedder(artifact, threads=1)
    assert embedder.backend == "torch" and "aten::made_up" in embedder.backend_reason
    assert embedder.embed(_pictures(2)).shape == (2, embedder.dimension)
    with pytest.raises(ExportError, match="aten::made_up"):
        load_inference_embedder(artifact, backend="onnxruntime")
    assert not (artifact / ONNX_FILE).exists()
    assert [p.name for p in artifact.iterdir() if p.name.startswith(".")] == []


def test_an_export_that_differs_from_torch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = write_tiny_artifact(tmp_path / "tiny")
    monkeypatch.setattr(export, "cosine_to_torch", lambda *args: 0.98)
    with pytest.raises(ExportError, match=r"lowest cosine 0\.980000"):
        export_onnx(artifact)
    assert current_export(artifact) is None and not (artifact / ONNX_FILE).exists()


def test_cli_export(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "served" / "model.onnx"
    command = [sys.executable, "-m", "training.cli", "export", str(exported), "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and (out.parent / "model.onnx.json").is_file()
    bad = subprocess.run(
        [*command[:-2], "--format", "tflite"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "only one is onnx" in bad.stderr
