"""FAISS gallery indexes: thread-safe, filtered and paged search, atomic snapshots.

One `GalleryIndex` per (gallery, model version); `IndexStore` keeps them in memory and on disk.
The database stays the source of truth: a snapshot records (in `meta`) what it contains, and the
service replays what it lacks (docs/service.md, "Durability design").

Index types (FAISS wiki, "Guidelines to choose an index"): `flat` = `IDMap2,Flat` with inner
product, exact (the default); `hnsw` = `IDMap2,HNSW32,Flat`, approximate, fast at large sizes,
cannot delete (removals are tombstones until a rebuild); `ivfpq` = IVF-PQ with its own ids and
a hashtable direct map, compressed, approximate, trained on the vectors given to `build` (a
flat index below `IVFPQ_MIN_TRAIN` vectors, with the reason in `note`).

Scores are cosine similarities: vectors are L2-normalised on `add` and queries on `search`.

Thread safety (faiss wiki "Threads and asynchronous calls", faiss #1781/#367): searches run
concurrently under the read side of a readers-writer lock; `add`/`remove` take the write side, so
a search sees every update whole or not at all. HNSW compaction (a full rebuild) is built
copy-on-write outside the lock and swapped in, replaying the writes made meanwhile.

Filters use `IDSelectorBatch` in the search parameters (pre-filtering, so a filtered search still
finds k hits when k exist); a small allowed subset (<= `EXACT_SUBSET_MAX` ids) is searched
exactly over its reconstructed vectors, and an approximate search that comes back short (a very
selective filter, many tombstones) is redone exactly over the allowed live vectors.

Measured with `benchmarks/index_latency.py` on the development machine (2 cores, busy with
training runs; clustered 128-d unit vectors, k=10, one query per call through GalleryIndex,
faiss 1.15.1), p50 / p95 ms per query:

    size    flat, 1 OpenMP thread   HNSW32 efSearch 64, 1 thread   HNSW build   HNSW recall@10
    100k      2.5 / 6.6                0.14 / 0.26                   22 s         0.998
    300k     10.1 / 14.1               0.12 / 0.21                   78 s         0.932
    1M       50.2 / 75.1               0.33 / 34 (2 threads)        248 s         0.901

With 2 OpenMP threads on that busy host, flat at 100k took 26-76 ms p50 instead of 2.5 ms:
OpenMP threads fight for the cores. Hence `set_search_threads` (default 1, applied in the thread
that searches: OpenMP's thread count is per calling thread) and `Settings.faiss_search_threads`.
Exact search costs about size x dimension (75 ms per query for 100k 1280-d vectors, the
built-in model's size): `GalleryIndex.estimated_exact_search_ms`, measured on each index's own
searches, decides when an HNSW index is suggested (`Settings.exact_search_budget_ms`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from training.fsutil import fsync_dir

logger = logging.getLogger(__name__)

FORMAT = "lookalike-index/1"
_MAGIC = b"LKIDX\x001\n"
_FOOTER = b"LKIDXEND"
IVFPQ_MIN_TRAIN = 39 * 256  # PQ with 8-bit codes: faiss wants 39 x 256 training points
EXACT_SUBSET_MAX = 4096
DEFAULT_COMPACT_FRACTION = 0.2
HNSW_M = 32
DEFAULT_EF_SEARCH = 64
DEFAULT_EF_CONSTRUCTION = 40
# Exact search reads every stored float once per query, so its cost grows with size x dimension;
# at scale it is bound by memory bandwidth. 1280-d flat took 75 ms per query at 100k vectors and
# 358 ms at 1M on one thread of the development machine (benchmarks/index_latency.py): about
# 0.3-0.6 ns per stored float; the higher figure is used until a gallery's own searches say more.
FLAT_SECONDS_PER_FLOAT = 75e-3 / (100_000 * 1280)
# Searches over fewer floats than this say little about the cost at scale (fixed overheads).
MEASURE_MIN_FLOATS = 4_000_000

# IVF-PQ search defaults, chosen by benchmarks/index_recall.py (docs/scaling.md, "Index
# quality"; 128-d, recall@10 against exact search). Re-scoring 16 x k candidates with the stored
# vectors took clustered vectors (like class embeddings) from 0.55-0.61 to 1.000 at 10k and
# 100k for +0.1-0.5 ms a query; 4 x k reached only 0.95-0.98. Lists probed: a quarter of nlist,
# at most 256: on structureless random vectors (the worst case) recall@10 at 100k went from
# 0.38 (64 of 1024 lists) to 0.72 (256), still under a millisecond.
DEFAULT_REFINE_FACTOR = 16


def default_nprobe(nlist: int) -> int:
    return int(min(256, max(1, nlist // 4)))


_search_threads = 1


def set_search_threads(threads: int) -> None:
    """OpenMP threads for each FAISS search (process-wide setting; 0 = all cores)."""
    global _search_threads
    _search_threads = threads if threads > 0 else (os.cpu_count() or 1)


def _apply_search_threads() -> None:
    if faiss.omp_get_max_threads() != _search_threads:
        faiss.omp_set_num_threads(_search_threads)  # per calling thread in OpenMP


def rerank_exact(
    queries: np.ndarray,
    rows: list[list[tuple[int, float]]],
    vectors_of: Callable[[np.ndarray], np.ndarray],
    want: int,
) -> list[list[tuple[int, float]]]:
    """The refine step of a compressed (IVF-PQ) search: each query's candidates scored again
    with their exact vectors (`vectors_of(ids)`, one row per id, e.g. the stored embeddings)
    and the best `want` kept. PQ distances are coarse; re-ranking a few times k candidates
    restores most true neighbours (measured in docs/scaling.md, "Index quality")."""
    unique = np.unique(np.asarray([i for row in rows for i, _ in row], dtype=np.int64))
    if not unique.size:
        return [[] for _ in rows]
    exact = normalised(vectors_of(unique), queries.shape[1], "stored vectors")
    unit = normalised(queries, queries.shape[1], "query vectors")
    refined = []
    for query, row in zip(unit, rows, strict=True):
        ids = np.asarray([i for i, _ in row], dtype=np.int64)
        scores = exact[np.searchsorted(unique, ids)] @ query
        order = np.argsort(-scores, kind="stable")[:want]
        refined.append([(int(ids[j]), float(scores[j])) for j in order])
    return refined


def recall_at(
    exact: list[list[tuple[int, float]]], found: list[list[tuple[int, float]]], k: int = 10
) -> float:
    """Mean share of each query's exact top k that the approximate search also returned."""
    shares = [
        len({i for i, _ in truth[:k]} & {i for i, _ in hits[:k]}) / max(1, min(k, len(truth)))
        for truth, hits in zip(exact, found, strict=True)
    ]
    return float(np.mean(shares)) if shares else 1.0


def exact_search_ms(
    vectors: int, dimension: int, seconds_per_float: float = FLAT_SECONDS_PER_FLOAT
) -> float:
    """Estimated milliseconds of one exact (flat) search over `vectors` of `dimension`."""
    return seconds_per_float * vectors * dimension * 1000


class IndexType(StrEnum):
    flat = "flat"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class IndexFileError(ValueError):
    """A snapshot file that is missing, truncated, corrupt or of another format."""


class _RWLock:
    """Readers-writer lock, writer-preferring (a waiting writer blocks new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _as_ids(ids: Iterable[int] | np.ndarray, what: str = "ids") -> np.ndarray:
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D array of integers, got {array.dtype} {array.shape}")
    return array.astype(np.int64, copy=False)


def normalised(vectors: np.ndarray, dimension: int, what: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dimension:
        got = array.shape[-1] if array.ndim >= 1 else "scalar"
        raise ValueError(
            f"{what} have dimension {got}, but this index holds {dimension}-dimensional vectors "
            "(a different model's embeddings?)"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    array = np.ascontiguousarray(array.copy())
    faiss.normalize_L2(array)
    return array


def ivfpq_shape(dimension: int, count: int, params: dict[str, Any]) -> tuple[int, int]:
    """(nlist, m): nlist a power of two near 4 sqrt(N) with >= 39 points per list; m the largest
    divisor of d that is <= d/4 and <= 64 (about 4 dimensions per one-byte code)."""
    nlist = params.get("nlist")
    if nlist is None:
        nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(count)))))
        while nlist > 1 and count < 39 * nlist:
            nlist //= 2
    m = params.get("m")
    if m is None:
        m = max(d for d in range(1, min(64, max(1, dimension // 4)) + 1) if dimension % d == 0)
    if dimension % m:
        raise ValueError(f"IVF-PQ m={m} must divide the dimension {dimension}")
    return int(nlist), int(m)


class _State:
    """The mutable part of a GalleryIndex: the faiss index, its physical ids and tombstones.

    Callers hold the GalleryIndex's write lock for mutations and its read lock for reads."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, tombstones: np.ndarray) -> None:
        self.index = index
        self.ids = ids  # sorted int64, every id physically in the index
        self.tombstones = tombstones  # sorted int64, subset of ids: removed, filtered out
        self.not_tombstoned: faiss.IDSelector | None = None  # cached selector

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `ids` are physically present."""
        if not self.ids.size:
            return np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(self.ids, ids).clip(max=len(self.ids) - 1)
        return self.ids[pos] == ids

    def live(self, ids: np.ndarray) -> np.ndarray:
        present = self.contains(ids)
        if self.tombstones.size:
            present &= ~np.isin(ids, self.tombstones, assume_unique=False)
        return present

    def live_count(self) -> int:
        return len(self.ids) - len(self.tombstones)

    def live_ids(self) -> np.ndarray:
        if not self.tombstones.size:
            return self.ids
        return np.setdiff1d(self.ids, self.tombstones, assume_unique=True)

    def changed(self) -> None:
        self.not_tombstoned = None


def _native(index: faiss.Index, method: str):
    """The numpy method of a faiss index, even after `faiss.contrib.torch_utils` (imported by
    pytorch-metric-learning) replaced it with a torch-aware version, which returns tensors from
    `reconstruct` and does not accept `params=` in `search`; the originals survive as
    `<method>_numpy`."""
    return getattr(index, f"{method}_numpy", None) or getattr(index, method)


class GalleryIndex:
    """A FAISS index of one gallery under one model version. See the module docstring."""

    def __init__(
        self,
        dimension: int,
        index_type: IndexType,
        params: dict[str, Any],
        state: _State,
        note: str | None = None,
    ) -> None:
        self.dimension = int(dimension)
        self.index_type = IndexType(index_type)
        self.params = dict(params)
        self.note = note
        self._state = state
        self._lock = _RWLock()
        self._compaction = threading.Lock()
        self._oplog: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        # Seconds per stored float per query of this index's unfiltered exact searches (EWMA).
        self._measured_seconds_per_float: float | None = None

    # Construction.

    @classmethod
    def build(
        cls,
        dimension: int,
        index_type: IndexType | str = IndexType.flat,
        ids: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        params: dict[str, Any] | None = None,
    ) -> GalleryIndex:
        """A new index holding `vectors` under `ids` (both may be omitted for an empty index).

        params: hnsw: `ef_search` (64), `ef_construction` (40), `m` (32); ivfpq: `nlist`, `m`
        (chosen from the size when absent), `nprobe` (nlist/4, at least 1 and at most 256),
        `refine_factor` (16: used by the services, which re-score candidates with the stored
        vectors);
        all: `compact_fraction` (0.2): tombstones above this share of the index trigger a
        compaction."""
        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        try:
            index_type = IndexType(index_type)
        except ValueError:
            known = ", ".join(t.value for t in IndexType)
            raise ValueError(f"unknown index type {index_type!r}; use one of {known}") from None
        params = dict(params or {})
        ids = _as_ids(ids if ids is not None else [])
        vectors = (
            normalised(vectors, dimension, "vectors")
            if vectors is not None and len(vectors)
            else np.zeros((0, dimension), dtype=np.float32)
        )
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        note = None
        if index_type is IndexType.ivfpq and len(vectors) < IVFPQ_MIN_TRAIN:
            note = (
                f"IVF-PQ needs at least {IVFPQ_MIN_TRAIN:,} vectors to train its quantizers, "
                f"got {len(vectors):,}; built an exact flat index instead (rebuild as IVF-PQ "
                "when the gallery is larger)"
            )
            logger.info(note)
            index_type = IndexType.flat
            params = {k: v for k, v in params.items() if k == "compact_fraction"}
        faiss_index, params = _new_faiss_index(dimension, index_type, params, vectors)
        gallery = cls(dimension, index_type, params, _State(faiss_index, _empty(), _empty()), note)
        if len(ids):
            gallery.add(ids, vectors)
        return gallery

    # Queries.

    def __len__(self) -> int:
        with self._lock.read():
            return self._state.live_count()

    def contains(self, image_id: int) -> bool:
        with self._lock.read():
            return bool(self._state.live(np.array([image_id], dtype=np.int64))[0])

    def ids(self) -> np.ndarray:
        """The live ids, sorted."""
        with self._lock.read():
            return self._state.live_ids().copy()

    def vector(self, image_id: int) -> np.ndarray:
        """The stored (normalised) vector of an id; approximate for IVF-PQ. KeyError if absent."""
        with self._lock.read():
            if not self._state.live(np.array([image_id], dtype=np.int64))[0]:
                raise KeyError(f"id {image_id} is not in this index")
            return _native(self._state.index, "reconstruct")(int(image_id)).astype(np.float32)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        offset: int = 0,
        allowed_ids: np.ndarray | None = None,
        min_score: float | None = None,
    ) -> list[list[tuple[int, float]]]:
        """For each query, up to k (id, cosine score) pairs, best first, after skipping `offset`.

        `allowed_ids` restricts the search to those ids (others, and unknown ids, never appear);
        hits scoring below `min_score` are dropped. Paging is a re-search with k + offset."""
        if k < 0 or offset < 0:
            raise ValueError(f"k and offset must be >= 0, got k={k}, offset={offset}")
        queries = normalised(queries, self.dimension, "query vectors")
        _apply_search_threads()
        allowed = None if allowed_ids is None else np.unique(_as_ids(allowed_ids, "allowed_ids"))
        with self._lock.read():
            started = time.perf_counter()  # not counting the wait for a writer
            labels, scores = self._search_locked(self._state, queries, k + offset, allowed)
            seconds = time.perf_counter() - started
        if self.index_type is IndexType.flat and allowed is None:
            self._record_cost(seconds, len(queries))
        results = []
        for row_ids, row_scores in zip(labels, scores, strict=True):
            page_ids, page_scores = row_ids[offset : offset + k], row_scores[offset : offset + k]
            hits = [
                (int(i), float(s))
                for i, s in zip(page_ids, page_scores, strict=True)
                if i >= 0 and (min_score is None or s >= min_score)
            ]
            results.append(hits)
        return results

    def _record_cost(self, seconds: float, queries: int) -> None:
        floats = len(self) * self.dimension
        if floats < MEASURE_MIN_FLOATS or queries == 0:
            return
        sample = seconds / (queries * floats)
        previous = self._measured_seconds_per_float
        self._measured_seconds_per_float = (
            sample if previous is None else 0.8 * previous + 0.2 * sample
        )

    def estimated_exact_search_ms(self, vectors: int | None = None) -> float:
        """What one unfiltered exact search over `vectors` (default: this index's size) costs:
        measured on this index's own searches once it is large enough, else estimated."""
        count = len(self) if vectors is None else vectors
        return exact_search_ms(
            count, self.dimension, self._measured_seconds_per_float or FLAT_SECONDS_PER_FLOAT
        )

    def _search_locked(
        self, state: _State, queries: np.ndarray, want: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            allowed = allowed[state.live(allowed)]
            available = len(allowed)
        else:
            available = state.live_count()
        kk = min(want, available)
        if kk == 0:
            n = len(queries)
            return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
        if allowed is not None and len(allowed) <= EXACT_SUBSET_MAX:
            return self._exact(state, queries, allowed, kk)
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif state.tombstones.size:
            if state.not_tombstoned is None:
                batch = faiss.IDSelectorBatch(state.tombstones)
                selector = faiss.IDSelectorNot(batch)
                selector.referenced = batch  # keep the inner selector alive
                state.not_tombstoned = selector
            selector = state.not_tombstoned
        else:
            selector = None
        params = self._search_params(selector, kk)
        scores, labels = _native(state.index, "search")(queries, kk, params=params)
        if self.index_type is not IndexType.flat:
            short = (labels >= 0).sum(axis=1) < kk
            if short.any():  # approximate search came back short: redo those rows exactly
                candidates = allowed if allowed is not None else state.live_ids()
                ex_labels, ex_scores = self._exact(state, queries[short], candidates, kk)
                labels[short], scores[short] = ex_labels, ex_scores
        return labels, scores

    def _search_params(self, selector: faiss.IDSelector | None, k: int) -> Any:
        # A new parameter object per call: IndexIDMap temporarily rewrites params.sel.
        if self.index_type is IndexType.hnsw:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(self.params["ef_search"]), k)
        elif self.index_type is IndexType.ivfpq:
            params = faiss.SearchParametersIVF()
            params.nprobe = int(self.params["nprobe"])
        elif selector is None:
            return None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params

    @staticmethod
    def _exact(
        state: _State, queries: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = state.index.reconstruct_batch(candidates)
        similarity = queries @ vectors.T
        k = min(k, len(candidates))
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(similarity, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return candidates[top], np.take_along_axis(top_scores, order, axis=1)

    # Updates.

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ids, all at once for concurrent searches. An id that is already in
        the index (or was removed) gets the new vector. Costly only in that case for HNSW (a
        rebuild)."""
        ids = _as_ids(ids)
        if not len(ids):
            return
        vectors = normalised(vectors, self.dimension, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids passed to add must be unique")
        with self._lock.write():
            self._add_locked(self._state, ids, vectors)
            if self._oplog is not None:
                self._oplog.append(("add", ids, vectors))

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were live. They disappear from
        searches at once; the index compacts when tombstones pass `compact_fraction`."""
        ids = np.unique(_as_ids(ids))
        with self._lock.write():
            removed = self._remove_locked(self._state, ids)
            if self._oplog is not None:
                self._oplog.append(("remove", ids, None))
            needs = self._needs_compaction(self._state)
        if needs:
            self.compact()
        return removed

    def compact(self) -> None:
        """Drop tombstoned vectors for good. Flat / IVF-PQ: `remove_ids` under the write lock
        (one pass over the index). HNSW, which cannot delete: rebuilt from the live vectors
        without holding the lock (searches go on), then swapped in with the writes made
        meanwhile replayed. A compaction already running makes this a no-op."""
        if not self._compaction.acquire(blocking=False):
            return
        try:
            if self.index_type is not IndexType.hnsw:
                with self._lock.write():
                    self._purge_locked(self._state)
                return
            # Under the read lock no write runs: the snapshot and the start of the log agree.
            with self._lock.read():
                if not self._state.tombstones.size:
                    return
                self._oplog = []
                snapshot_ids = self._state.live_ids().copy()
                vectors = self._state.index.reconstruct_batch(snapshot_ids)
            try:
                state = self._fresh_state(snapshot_ids, vectors)
            except BaseException:
                with self._lock.write():
                    self._oplog = None
                raise
            with self._lock.write():
                for op, ids, op_vectors in self._oplog:
                    if op == "add":
                        assert op_vectors is not None  # an add carries its vectors
                        self._add_locked(state, ids, op_vectors)
                    else:
                        self._remove_locked(state, ids)
                self._oplog = None
                self._state = state
        finally:
            self._compaction.release()

    def _needs_compaction(self, state: _State) -> bool:
        fraction = float(self.params.get("compact_fraction", DEFAULT_COMPACT_FRACTION))
        return bool(state.tombstones.size) and len(state.tombstones) > fraction * len(state.ids)

    def _add_locked(self, state: _State, ids: np.ndarray, vectors: np.ndarray) -> None:
        present = state.contains(ids)
        if present.any():  # replacing: physically drop the old vectors first
            state.tombstones = np.union1d(state.tombstones, ids[present])
            self._purge_locked(state)
        state.index.add_with_ids(vectors, ids)
        state.ids = np.union1d(state.ids, ids)
        state.changed()

    def _remove_locked(self, state: _State, ids: np.ndarray) -> int:
        live = ids[state.live(ids)]
        if live.size:
            state.tombstones = np.union1d(state.tombstones, live)
            state.changed()
        return int(live.size)

    def _purge_locked(self, state: _State) -> None:
        """Physically remove the tombstoned ids (caller holds the write lock)."""
        if not state.tombstones.size:
            return
        if self.index_type is IndexType.hnsw:
            keep = state.live_ids()
            rebuilt = self._fresh_state(keep, state.index.reconstruct_batch(keep))
            state.index, state.ids = rebuilt.index, rebuilt.ids
        else:
            # IVF's hashtable direct map accepts only IDSelectorArray.
            state.index.remove_ids(faiss.IDSelectorArray(state.tombstones))
            state.ids = np.setdiff1d(state.ids, state.tombstones, assume_unique=True)
        state.tombstones = _empty()
        state.changed()

    def _fresh_state(self, ids: np.ndarray, vectors: np.ndarray) -> _State:
        index, _ = _new_faiss_index(self.dimension, self.index_type, self.params, vectors)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        return _State(index, np.sort(ids), _empty())

    # Persistence.

    def save(self, path: Path, meta: dict[str, Any]) -> Path:
        """Write a snapshot atomically: temp file in the same folder, fsync, `os.replace`, fsync
        the folder. `meta` (JSON-serialisable; e.g. the highest embedding row id contained) is
        stored in the same file, so index and meta can never disagree."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.read():
            header = json.dumps(
                {
                    "format": FORMAT,
                    "index_type": self.index_type.value,
                    "dimension": self.dimension,
                    "params": self.params,
                    "note": self.note,
                    "live": self._state.live_count(),
                    "meta": meta,
                }
            ).encode()
            temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
            try:
                with open(temp, "wb") as file:
                    file.write(_MAGIC)
                    file.write(struct.pack("<Q", len(header)))
                    file.write(header)
                    tombstones = self._state.tombstones.astype("<i8").tobytes()
                    file.write(struct.pack("<Q", len(tombstones) // 8))
                    file.write(tombstones)
                    start = file.tell()
                    writer = faiss.PyCallbackIOWriter(file.write)
                    faiss.write_index(self._state.index, writer)
                    del writer  # flushes
                    file.write(struct.pack("<Q", file.tell() - start))
                    file.write(_FOOTER)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: Path) -> tuple[GalleryIndex, dict[str, Any]]:
        """Read a snapshot written by `save`: (index, meta). IndexFileError if it is missing,
        truncated, corrupt or of another format."""
        path = Path(path)
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if file.read(len(_MAGIC)) != _MAGIC:
                    raise IndexFileError(f"{path} is not a lookalike index snapshot")
                (header_len,) = struct.unpack("<Q", _read_exact(file, 8))
                header = json.loads(_read_exact(file, header_len))
                (n_tomb,) = struct.unpack("<Q", _read_exact(file, 8))
                tombstones = np.frombuffer(_read_exact(file, 8 * n_tomb), dtype="<i8")
                start = file.tell()
                file.seek(size - 16)
                (payload,) = struct.unpack("<Q", _read_exact(file, 8))
                if _read_exact(file, 8) != _FOOTER or start + payload != size - 16:
                    raise IndexFileError(f"{path} is truncated (no complete index payload)")
                file.seek(start)
                remaining = [payload]

                def read(n: int) -> bytes:
                    chunk = file.read(min(n, remaining[0]))
                    remaining[0] -= len(chunk)
                    return chunk

                index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except FileNotFoundError as error:
            raise IndexFileError(f"no index snapshot at {path}") from error
        except IndexFileError:
            raise
        except (OSError, ValueError, RuntimeError, struct.error, UnicodeDecodeError) as error:
            raise IndexFileError(f"{path} is corrupt: {error}") from error
        if header.get("format") != FORMAT:
            raise IndexFileError(f"{path} has format {header.get('format')!r}, not {FORMAT!r}")
        index_type = IndexType(header["index_type"])
        if index_type is IndexType.ivfpq:
            ids = _ivf_ids(index)
        else:
            ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        state = _State(index, np.sort(ids), np.sort(tombstones.astype(np.int64)))
        gallery = cls(header["dimension"], index_type, header["params"], state, header["note"])
        return gallery, header["meta"]


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _new_faiss_index(
    dimension: int, index_type: IndexType, params: dict[str, Any], train: np.ndarray
) -> tuple[faiss.Index, dict[str, Any]]:
    params = dict(params)
    params.setdefault("compact_fraction", DEFAULT_COMPACT_FRACTION)
    if index_type is IndexType.flat:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)), params
    if index_type is IndexType.hnsw:
        params.setdefault("m", HNSW_M)
        params.setdefault("ef_search", DEFAULT_EF_SEARCH)
        params.setdefault("ef_construction", DEFAULT_EF_CONSTRUCTION)
        hnsw = faiss.IndexHNSWFlat(dimension, int(params["m"]), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(params["ef_construction"])
        hnsw.hnsw.efSearch = int(params["ef_search"])
        return faiss.IndexIDMap2(hnsw), params
    nlist, m = ivfpq_shape(dimension, len(train), params)
    quantizer = faiss.IndexFlatIP(dimension)  # the Python wrapper keeps it referenced
    index = faiss.IndexIVFPQ(quantizer, dimension, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    sample, most = train, max(256 * nlist, IVFPQ_MIN_TRAIN)  # 256 points per centroid suffice
    if len(sample) > most:
        rng = np.random.default_rng(0)
        sample = train[rng.choice(len(train), most, replace=False)]
    index.train(np.ascontiguousarray(sample))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    params.update(nlist=nlist, m=m, trained=len(sample))
    params.setdefault("nprobe", default_nprobe(nlist))
    params.setdefault("refine_factor", DEFAULT_REFINE_FACTOR)
    return index, params


def _ivf_ids(index: faiss.Index) -> np.ndarray:
    invlists = index.invlists
    chunks = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(index.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(chunks).astype(np.int64) if chunks else _empty()


def _read_exact(file: Any, n: int) -> bytes:
    data = file.read(n)
    if len(data) != n:
        raise IndexFileError(f"{file.name} is truncated")
    return data


class IndexStore:
    """The gallery indexes of the process: one GalleryIndex per (gallery_id, model_id) in memory,
    snapshots under `root`. Replacing an index (`put` of a rebuilt one) is one reference swap:
    a search already running finishes on the old index, the next one uses the new."""

    def __init__(self, root: Path, search_threads: int | None = None) -> None:
        self.root = Path(root)
        if search_threads is not None:
            set_search_threads(search_threads)
        self._lock = threading.Lock()
        self._indexes: dict[tuple[int, int], GalleryIndex] = {}

    def path_for(self, gallery_id: int, model_id: int) -> Path:
        return self.root / f"gallery-{int(gallery_id)}" / f"model-{int(model_id)}.lkidx"

    def get(self, gallery_id: int, model_id: int) -> GalleryIndex | None:
        with self._lock:
            return self._indexes.get((int(gallery_id), int(model_id)))

    def put(self, gallery_id: int, model_id: int, index: GalleryIndex) -> None:
        with self._lock:
            self._indexes[(int(gallery_id), int(model_id))] = index

    def drop(self, gallery_id: int, model_id: int, *, delete_file: bool = True) -> None:
        """Forget the in-memory index and (by default) delete its snapshot."""
        with self._lock:
            self._indexes.pop((int(gallery_id), int(model_id)), None)
        if delete_file:
            path = self.path_for(gallery_id, model_id)
            path.unlink(missing_ok=True)
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()

    def keys(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._indexes)

    def save(self, gallery_id: int, model_id: int, meta: dict[str, Any]) -> Path:
        """Snapshot the in-memory index (KeyError if none) atomically to `path_for`."""
        index = self.get(gallery_id, model_id)
        if index is None:
            raise KeyError(f"no index loaded for gallery {gallery_id}, model {model_id}")
        return index.save(self.path_for(gallery_id, model_id), meta)

    def load(self, gallery_id: int, model_id: int) -> dict[str, Any] | None:
        """Load the snapshot into memory (replacing any loaded index) and return its meta;
        None when there is no snapshot. IndexFileError when the snapshot is corrupt."""
        path = self.path_for(gallery_id, model_id)
        if not path.is_file():
            return None
        index, meta = GalleryIndex.load(path)
        self.put(gallery_id, model_id, index)
        return meta

    def remove_stale_temp_files(self) -> int:
        """Delete temp files left by a crash during `save`; returns how many."""
        count = 0
        for temp in self.root.glob("gallery-*/.*.tmp"):
            temp.unlink(missing_ok=True)
            count += 1
        return count
