"""app.embedder: concurrent callers share batches; results equal the plain Embedder's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import app.embedder as embedder_module
from app.embedder import BatchingEmbedder, EmbedderClosed, EmbedderRegistry
from tests.app.conftest import TINY_DIM, write_tiny_artifact
from tests.conftest import draw_sample
from training.checkpoint import Embedder, load_embedder

DIM = TINY_DIM


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def plain(artifact) -> Embedder:
    return load_embedder(artifact)


@pytest.fixture(scope="module")
def images():
    return [draw_sample(i % 6, i, size=40) for i in range(24)]


@pytest.fixture(scope="module")
def expected(plain, images) -> np.ndarray:
    """Reference: the plain Embedder's own output (eval mode: independent of batch makeup)."""
    return plain.embed(images)


def outcomes(embedder: BatchingEmbedder, *requests: list) -> list:
    """Each request's embeddings or exception; all are queued before the first batch forms."""
    futures = [embedder.submit(request) for request in requests]
    return [future.exception() or future.result() for future in futures]


def batching(plain: Embedder, sizes: list[int], **kwargs) -> BatchingEmbedder:
    kwargs.setdefault("max_batch", 8)
    kwargs.setdefault("max_wait_ms", 300)
    return BatchingEmbedder(plain, on_batch=sizes.append, **kwargs)


def test_concurrent_callers_share_one_batch(plain, images, expected):
    sizes: list[int] = []
    embedder = batching(plain, sizes)
    requests = [images[i : i + 2] for i in range(0, 8, 2)]

    try:
        futures = [embedder.submit(r) for r in requests]  # queued before the first batch forms
        results = [future.result() for future in futures]
    finally:
        embedder.close()
    assert sizes == [8]  # four callers, one forward pass
    for start, result in zip(range(0, 8, 2), results, strict=True):
        assert result.dtype == np.float32 and result.shape == (2, DIM)
        np.testing.assert_allclose(result, expected[start : start + 2], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(result, axis=1), 1.0, atol=1e-5)
    assert embedder.dimension == DIM and embedder.card.embedding_dim == DIM


def test_batches_never_exceed_max_batch_and_a_big_request_is_chunked(plain, images, expected):
    sizes: list[int] = []
    embedder = batching(plain, sizes)
    requests = [images[i : i + 2] for i in range(0, 10, 2)] + [images[:20]]

    try:
        futures = [embedder.submit(r) for r in requests]  # queued before the first batch forms
        results = [future.result() for future in futures]
    finally:
        embedder.close()
    assert sizes == [8, 2, 8, 8, 4]  # 4 requests, then 1 that the big one does not fit with
    for start, result in zip(range(0, 10, 2), results[:5], strict=True):
        np.testing.assert_allclose(result, expected[start : start + 2], atol=1e-5)
    np.testing.assert_allclose(results[5], expected[:20], atol=1e-5)


def test_sync_callers_from_threads_are_batched(plain, images, expected):
    sizes: list[int] = []
    embedder = batching(plain, sizes, max_batch=6, max_wait_ms=500)
    barrier = threading.Barrier(6)
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        barrier.wait()
        results[i] = embedder.embed([images[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    embedder.close()
    assert sum(sizes) == 6 and max(sizes) > 1
    for i in range(6):
        np.testing.assert_allclose(results[i][0], expected[i], atol=1e-5)


def test_a_bad_request_fails_alone(plain, images, expected):
    sizes: list[int] = []
    embedder = batching(plain, sizes)

    try:
        good, bad, other = outcomes(embedder, images[:2], [images[2], "not an image"], images[3:5])
    finally:
        embedder.close()
    assert isinstance(bad, TypeError) and "PIL image" in str(bad)
    np.testing.assert_allclose(good, expected[:2], atol=1e-5)
    np.testing.assert_allclose(other, expected[3:5], atol=1e-5)
    assert sizes == [4]


class FlakyEmbedder:
    """The plain Embedder whose first forward pass fails (a simulated CUDA OOM)."""

    def __init__(self, plain: Embedder) -> None:
        self.plain, self.calls = plain, 0
        self.dimension, self.card, self.preprocess = plain.dimension, plain.card, plain.preprocess

    def embed(self, batch, batch_size=64):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.plain.embed(batch, batch_size=batch_size)


def test_a_failing_forward_pass_fails_exactly_its_batch(plain, images, expected):
    sizes: list[int] = []
    embedder = batching(FlakyEmbedder(plain), sizes, max_batch=4)

    try:
        first, second, third = outcomes(embedder, *(images[i : i + 2] for i in (0, 2, 4)))
        later = embedder.embed(images[:1])
    finally:
        embedder.close()
    assert sizes == [4, 2, 1]
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert "out of memory" in str(first)
    np.testing.assert_allclose(third, expected[4:6], atol=1e-5)
    np.testing.assert_allclose(later, expected[:1], atol=1e-5)


def test_close_rejects_new_work_and_empty_requests_need_no_model(plain, images):
    embedder = BatchingEmbedder(plain, threads=1)
    assert embedder.embed([]).shape == (0, DIM)
    assert embedder.embed(images[:1]).shape == (1, DIM)
    embedder.close()
    embedder.close()  # idempotent
    assert embedder.closed
    with pytest.raises(EmbedderClosed):
        embedder.embed(images[:1])


def test_registry_loads_each_model_once_under_concurrency(artifact, plain, monkeypatch, images):
    loads: list[Path] = []

    def counting(directory, **options):  # a slow load widens the race window
        loads.append(Path(directory))
        time.sleep(0.2)
        return plain

    monkeypatch.setattr(embedder_module, "load_inference_embedder", counting)
    registry = EmbedderRegistry(device="cpu", max_batch=4, max_wait_ms=1, threads=0)
    got: list[BatchingEmbedder] = []
    barrier = threading.Barrier(4)

    def get() -> None:
        barrier.wait()
        got.append(registry.get("1", artifact))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(loads) == 1 and len({id(e) for e in got}) == 1
        assert "1" in registry and registry.loaded() == ["1"]
        with pytest.raises(ValueError, match="evict it"):
            registry.get("1", artifact.parent / "elsewhere")
        first = got[0]
        assert registry.get("1", artifact) is first
        assert registry.evict("1") and first.closed and not registry.evict("1")
        second = registry.get("1", artifact)
        assert second is not first and len(loads) == 2
        assert second.embed(images[:2]).shape == (2, DIM)
    finally:
        registry.close()
    assert second.closed and registry.loaded() == []


def test_prepared_images_skip_preprocessing_and_must_fit_the_model(plain, images) -> None:
    embedder = BatchingEmbedder(plain, threads=1)
    try:
        prepared = embedder.prepare(images[:2])
        assert all(t.is_floating_point() for t in prepared)
        np.testing.assert_allclose(
            embedder.submit(prepared).result(10), embedder.embed(images[:2]), atol=1e-6
        )
        with pytest.raises(TypeError, match="prepared image"):
            embedder.submit([torch.zeros(3, 7, 7)]).result(10)
    finally:
        embedder.close()
