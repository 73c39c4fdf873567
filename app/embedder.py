"""Models loaded once per process, requests micro-batched.

`BatchingEmbedder` owns one background thread per model. Callers (request and worker threads via
`embed`, or anyone through the future `submit` returns) put their images on a queue and wait; the
thread takes the first waiting request, then keeps collecting requests until it holds `max_batch`
images or `max_wait_ms` have passed since that first request, and runs one forward pass for all
of them. Preprocessing (exactly the model card's: `training.checkpoint.Embedder.preprocess`) runs
in the caller's thread for `embed`, so it overlaps the forward pass, and in the batching thread
for `submit`. So concurrent users share a batch, and no CPU work ever runs on the event loop.

Errors: a request whose images cannot be preprocessed fails alone; a failing forward pass fails
exactly the requests in that batch; the thread keeps serving the next batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.checkpoint import Embedder, ModelCard
from training.export import Backend, load_inference_embedder

logger = logging.getLogger(__name__)

BatchHook = Callable[[int], None]


class EmbedderClosed(RuntimeError):
    """The embedder was closed (model evicted or the service shutting down)."""


@dataclass
class _Request:
    images: Sequence[Image.Image | torch.Tensor]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


_STOP = object()


class BatchingEmbedder:
    """Wraps a `training.checkpoint.Embedder`; batches concurrent callers on one thread.

    `max_batch`: most images in one forward pass (a single request larger than that is run in
    chunks of `max_batch`, still as one batch of requests). `max_wait_ms`: how long to wait for
    more requests after the first one arrives. `threads`: torch intra-op threads for the
    batching thread (0 = torch's default). `on_batch(n)` is called with the number of images of
    every forward pass (for metrics); its exceptions are logged and ignored.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        threads: int = 0,
        on_batch: BatchHook | None = None,
        name: str = "embedder",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.threads = threads
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"{name}-batcher", daemon=True)
        self._thread.start()

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    @property
    def card(self) -> ModelCard:
        return self.embedder.card

    @property
    def decode_side(self) -> int:
        """The shorter side a decoded image may be reduced to (`app.imaging.open_upload`'s
        `min_side`) without changing what the model sees: twice the side its preprocessing
        resizes to, so the model's own antialiased resize still does the last step."""
        return 2 * self.card.preprocessing.transform_config().test_resize_size

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def submit(self, images: Sequence[Image.Image | torch.Tensor]) -> Future:
        """Queue images; the future resolves to their (n, d) float32 embeddings."""
        request = _Request(list(images))
        if not request.images:
            request.future.set_result(np.zeros((0, self.dimension), dtype=np.float32))
            return request.future
        with self._close_lock:
            if self._closed.is_set():
                raise EmbedderClosed("the embedder is closed")
            self._queue.put(request)
        return request.future

    def embed(
        self, images: Sequence[Image.Image | torch.Tensor], timeout: float | None = None
    ) -> np.ndarray:
        """(n, d) float32 L2-normalised embeddings, for the calling thread (a request thread, a
        worker): it preprocesses its own images, in parallel with the batching thread's
        forward, and waits for its rows of the shared batch."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("embed called from the batching thread would deadlock")
        return self.submit(self.prepare(images)).result(timeout)

    def prepare(self, images: Sequence[Image.Image | torch.Tensor]) -> list[torch.Tensor]:
        """The model's preprocessing, in the calling thread: `submit` takes the result as is
        (an import job prepares the next batch while this one embeds)."""
        return [self._preprocess(image) for image in images]

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still queued fail with `EmbedderClosed`. Idempotent."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # The batching thread.

    def _run(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        pending: _Request | None = None
        while True:
            first = pending if pending is not None else self._queue.get()
            pending = None
            if first is _STOP:
                break
            batch, size, stop = [first], len(first.images), False
            deadline = first.arrived + self.max_wait_s  # at most max_wait after it arrived
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if size + len(item.images) > self.max_batch:
                    pending = item  # starts the next batch
                    break
                batch.append(item)
                size += len(item.images)
            self._process(batch)
            if stop:
                break
        self._fail_queued(pending)

    def _fail_queued(self, pending: _Request | None) -> None:
        leftovers = [pending] if pending is not None else []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in leftovers:
            if item is not _STOP and item is not None:
                item.future.set_exception(EmbedderClosed("the embedder was closed"))

    def _process(self, batch: list[_Request]) -> None:
        ready: list[tuple[_Request, list[torch.Tensor]]] = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                ready.append((request, [self._preprocess(x) for x in request.images]))
            except Exception as error:
                request.future.set_exception(error)
        if not ready:
            return
        try:
            tensors = torch.stack([t for _, prepared in ready for t in prepared])
            for start in range(0, len(tensors), self.max_batch):
                self._notify(min(self.max_batch, len(tensors) - start))
            vectors = self.embedder.embed(tensors, batch_size=self.max_batch)
        except Exception as error:
            for request, _ in ready:
                request.future.set_exception(error)
            return
        offset = 0
        for request, prepared in ready:
            request.future.set_result(vectors[offset : offset + len(prepared)])
            offset += len(prepared)

    def _preprocess(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if not isinstance(image, Image.Image | torch.Tensor):
            raise TypeError(f"expected a PIL image or a uint8 CHW tensor, got {type(image)}")
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            size = self.card.preprocessing.image_size
            if tuple(image.shape) != (3, size, size):
                raise TypeError(
                    f"a prepared image is (3, {size}, {size}), got {tuple(image.shape)}"
                )
            return image  # prepared by `prepare`
        tensor = self.embedder.preprocess(image)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise TypeError(f"preprocessing gave {type(tensor)}, not a CHW tensor")
        return tensor

    def _notify(self, size: int) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(size)
        except Exception:
            logger.exception("on_batch hook failed")


class EmbedderRegistry:
    """One `BatchingEmbedder` per model key, loaded on first use and shared; each runs on
    ONNX Runtime when its export checks out (`training.export`), else on torch.

    `get` is thread-safe: concurrent first calls for one key load the model once (others wait);
    different keys load in parallel. Loading takes seconds: call it from a worker thread.
    """

    def __init__(
        self,
        device: str = "cpu",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        threads: int = 0,
        on_batch: BatchHook | None = None,
        backend: Backend = "auto",
    ) -> None:
        self.device = device
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.threads = threads
        self.backend = backend
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._embedders: dict[str, tuple[Path, BatchingEmbedder]] = {}

    def get(self, model_key: str, artifact_dir: Path) -> BatchingEmbedder:
        """The shared embedder for `model_key`, loading `artifact_dir` the first time.

        Raises `training.checkpoint.CheckpointError` for a bad artifact, ValueError when the key
        is already loaded from another directory (evict it first)."""
        artifact_dir = Path(artifact_dir).resolve()
        with self._lock:
            key_lock = self._key_locks.setdefault(model_key, threading.Lock())
        with key_lock:
            with self._lock:
                loaded = self._embedders.get(model_key)
            if loaded is not None:
                path, embedder = loaded
                if path != artifact_dir:
                    raise ValueError(
                        f"model {model_key!r} is loaded from {path}, not {artifact_dir}; "
                        "evict it before loading another artifact under the same key"
                    )
                return embedder
            loaded_embedder = load_inference_embedder(
                artifact_dir,
                device=self.device,
                backend=self.backend,
                threads=self.threads or None,
            )
            logger.info(
                "model %s embeds with %s (%s)",
                model_key,
                loaded_embedder.backend,
                loaded_embedder.backend_reason,
            )
            embedder = BatchingEmbedder(
                loaded_embedder,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
                threads=self.threads,
                on_batch=self.on_batch,
                name=f"embedder-{model_key}",
            )
            with self._lock:
                self._embedders[model_key] = (artifact_dir, embedder)
            return embedder

    def evict(self, model_key: str) -> bool:
        """Close and forget a model; True if it was loaded. Requests in flight finish first."""
        with self._lock:
            loaded = self._embedders.pop(model_key, None)
        if loaded is None:
            return False
        loaded[1].close()
        return True

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._embedders)

    def __contains__(self, model_key: object) -> bool:
        with self._lock:
            return model_key in self._embedders

    def close(self) -> None:
        with self._lock:
            embedders = list(self._embedders.values())
            self._embedders.clear()
        for _, embedder in embedders:
            embedder.close()
