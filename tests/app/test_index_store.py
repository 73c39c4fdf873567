"""app.index_store: exact results, filters, paging, tombstones, snapshots, concurrency."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import app.index_store as index_store
from app.index_store import GalleryIndex, IndexFileError, IndexStore, IndexType

pytestmark = pytest.mark.faiss_only  # GalleryIndex itself

DIM = 16
N = 1200


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int
) -> list[list[int]]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [ids[row].tolist() for row in order]


def hit_ids(results: list[list[tuple[int, float]]]) -> list[list[int]]:
    return [[i for i, _ in row] for row in results]


@pytest.fixture(scope="module")
def data():
    ids = np.arange(N, dtype=np.int64) * 3 + 5  # ids are not positions
    return ids, unit(N), unit(7, seed=1)


def test_flat_search_is_exact(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors)
    assert index.index_type is IndexType.flat and len(index) == N and index.dimension == DIM
    results = index.search(queries, 10)
    assert hit_ids(results) == brute_force(ids, vectors, queries, 10)
    expected_scores = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose([[s for _, s in row] for row in results], expected_scores, atol=1e-5)
    assert index.search(queries[0], 3) == index.search(queries[:1], 3)  # 1-D query accepted
    assert index.search(queries, 0) == [[] for _ in range(7)]


def test_vectors_and_queries_are_normalised(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, IndexType.flat, ids, vectors * 7.0)
    (hits,) = index.search(queries[:1] * 0.1, 1)
    assert hits[0][1] == pytest.approx(float(np.max(queries[0] @ vectors.T)), abs=1e-5)
    np.testing.assert_allclose(index.vector(int(ids[3])), vectors[3], atol=1e-6)
    with pytest.raises(KeyError):
        index.vector(4)


def test_wrong_dimension_is_a_clear_value_error(data):
    ids, vectors, _ = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors)
    with pytest.raises(ValueError, match="dimension 8, but this index holds 16-dimensional"):
        index.search(unit(1, 8), 5)
    with pytest.raises(ValueError, match="dimension 8"):
        index.add(np.array([1]), unit(1, 8))
    with pytest.raises(ValueError, match="3 ids for 2 vectors"):
        index.add(np.array([1, 2, 3]), unit(2))
    with pytest.raises(ValueError, match="unknown index type"):
        GalleryIndex.build(DIM, "annoy")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filters_return_k_hits_when_k_exist(data, kind, monkeypatch):
    monkeypatch.setattr(index_store, "EXACT_SUBSET_MAX", 50)  # larger subsets use IDSelectorBatch
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, kind, ids, vectors)
    rng = np.random.default_rng(2)
    for size in (3, 25, 5000):  # fewer than k, exactly enough, a large (selector) subset
        allowed = rng.choice(ids, size=min(size, len(ids)), replace=False)
        if size == 5000:
            allowed = np.concatenate([ids[::2], np.array([10**9])])  # plus an unknown id
        mask = np.isin(ids, allowed)
        results = index.search(queries, 10, allowed_ids=allowed)
        expected = brute_force(ids[mask], vectors[mask], queries, 10)
        assert [len(r) for r in results] == [min(10, int(mask.sum()))] * len(queries)
        if kind == "flat" or size < 5000:
            assert hit_ids(results) == expected
        else:  # approximate, but only allowed ids
            assert all(set(r) <= set(allowed.tolist()) for r in hit_ids(results))
    assert index.search(queries, 5, allowed_ids=np.array([], dtype=np.int64)) == [[]] * 7


def test_offset_paging_and_min_score(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors)
    full = index.search(queries, 30)
    pages = [index.search(queries, 10, offset=offset) for offset in (0, 10, 20)]
    for q in range(len(queries)):
        assert pages[0][q] + pages[1][q] + pages[2][q] == full[q]
    assert index.search(queries, 10, offset=N - 5) == [r[N - 5 :] for r in index.search(queries, N)]
    threshold = full[0][4][1]
    (hits,) = index.search(queries[:1], 30, min_score=threshold)
    assert hits == full[0][:5]
    with pytest.raises(ValueError):
        index.search(queries, 10, offset=-1)


def test_tombstones_hide_removed_ids_and_compaction_drops_them(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors, params={"compact_fraction": 0.25})
    top = [row[0] for row in hit_ids(index.search(queries, 1))]
    assert index.remove(np.array([*top, 10**9])) == len(set(top))  # unknown id ignored
    assert len(index) == N - len(set(top))
    assert index._state.tombstones.size == len(set(top))  # not compacted yet
    keep = ~np.isin(ids, top)
    assert hit_ids(index.search(queries, 10)) == brute_force(ids[keep], vectors[keep], queries, 10)
    assert not index.contains(top[0])
    with pytest.raises(KeyError):
        index.vector(top[0])
    index.remove(ids[:600])  # past a quarter: compacted
    keep &= ~np.isin(ids, ids[:600])
    assert index._state.tombstones.size == 0 and index._state.index.ntotal == keep.sum()
    assert len(index) == keep.sum()
    assert hit_ids(index.search(queries, 10)) == brute_force(ids[keep], vectors[keep], queries, 10)
    index.add(ids[:3], vectors[:3])  # removed ids can come back
    assert index.contains(int(ids[0])) and len(index) == keep.sum() + 3


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_adding_an_existing_id_replaces_its_vector(data, kind):
    ids, vectors, _ = data
    index = GalleryIndex.build(DIM, kind, ids[:100], vectors[:100])
    index.remove(ids[:5])
    index.add(ids[:10], vectors[500:510])  # 5 live replaced, 5 removed ones back
    assert len(index) == 100
    assert index.search(vectors[500:501], 1)[0][0][0] == ids[0]
    np.testing.assert_allclose(index.vector(int(ids[7])), vectors[507], atol=1e-6)
    assert index.search(vectors[7:8], 100)[0][0][0] != ids[7]  # the old vector is gone


def test_hnsw_recall_and_compaction_by_rebuild(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "hnsw", ids, vectors, params={"ef_search": 32})
    assert index.params["m"] == 32
    exact = brute_force(ids, vectors, queries, 10)
    approx = hit_ids(index.search(queries, 10))
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9
    removed = ids[:600]
    index.remove(removed)  # HNSW cannot delete: rebuilt without them
    assert index._state.tombstones.size == 0 and index._state.index.ntotal == N - 600
    assert not set(removed.tolist()) & {
        i for row in hit_ids(index.search(queries, 50)) for i in row
    }
    assert [len(r) for r in index.search(queries, 50)] == [50] * 7


def test_hnsw_with_many_tombstones_still_returns_k(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "hnsw", ids, vectors, params={"compact_fraction": 1.0})
    index.remove(ids[5:])  # 5 live ids left among N graph nodes
    results = index.search(queries, 10)
    assert [sorted(r) for r in hit_ids(results)] == [sorted(ids[:5].tolist())] * 7


def test_ivfpq_builds_and_finds_neighbours(monkeypatch):
    monkeypatch.setattr(index_store, "IVFPQ_MIN_TRAIN", 1000)
    vectors = unit(2000, seed=3)
    ids = np.arange(2000, dtype=np.int64) + 100
    index = GalleryIndex.build(DIM, "ivfpq", ids, vectors, params={"nlist": 8, "nprobe": 8})
    assert index.index_type is IndexType.ivfpq and index.params["m"] == 4 and index.note is None
    queries = vectors[:20]
    exact = brute_force(ids, vectors, queries, 10)
    approx = hit_ids(index.search(queries, 10))
    assert np.mean([e[0] in a for a, e in zip(approx, exact, strict=True)]) >= 0.8
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.4  # 4-byte codes for 16 dimensions: coarse, but clearly not random
    allowed = ids[::200]
    filtered = index.search(queries, 5, allowed_ids=allowed)
    assert all(len(r) == 5 and set(r) <= set(allowed.tolist()) for r in hit_ids(filtered))
    index.remove(ids[:1000])  # compaction by remove_ids
    assert len(index) == 1000 and index._state.index.ntotal == 1000
    assert [len(r) for r in index.search(queries, 10)] == [10] * 20


def test_ivfpq_falls_back_to_flat_below_the_training_minimum(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "ivfpq", ids[:500], vectors[:500], params={"nlist": 8})
    assert index.index_type is IndexType.flat
    assert "IVF-PQ needs at least 9,984 vectors" in index.note and "got 500" in index.note
    assert hit_ids(index.search(queries, 5)) == brute_force(ids[:500], vectors[:500], queries, 5)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, kind, ids, vectors, params={"compact_fraction": 0.9})
    index.remove(ids[:10])
    path = index.save(tmp_path / "g1" / "m1.lkidx", {"max_embedding_id": 1234, "version": 3})
    loaded, meta = GalleryIndex.load(path)
    assert meta == {"max_embedding_id": 1234, "version": 3}
    assert loaded.index_type is index.index_type and loaded.params == index.params
    assert len(loaded) == N - 10 and not loaded.contains(int(ids[0]))
    assert loaded.search(queries, 10) == index.search(queries, 10)
    assert [p.name for p in path.parent.iterdir()] == ["m1.lkidx"]  # no temp left


def test_corrupt_and_missing_snapshots_raise_index_file_error(tmp_path, data):
    ids, vectors, _ = data
    with pytest.raises(IndexFileError, match="no index snapshot"):
        GalleryIndex.load(tmp_path / "missing.lkidx")
    path = GalleryIndex.build(DIM, "flat", ids, vectors).save(tmp_path / "i.lkidx", {})
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(IndexFileError, match="truncated"):
        GalleryIndex.load(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(IndexFileError, match="not a lookalike index"):
        GalleryIndex.load(path)


def test_a_crash_before_the_rename_leaves_the_old_snapshot(tmp_path, data, monkeypatch):
    ids, vectors, _ = data
    path = tmp_path / "i.lkidx"
    GalleryIndex.build(DIM, "flat", ids[:100], vectors[:100]).save(path, {"version": 1})
    bigger = GalleryIndex.build(DIM, "flat", ids, vectors)

    def crash(src, dst):
        raise OSError("power cut between temp write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        bigger.save(path, {"version": 2})
    monkeypatch.undo()
    loaded, meta = GalleryIndex.load(path)
    assert meta == {"version": 1} and len(loaded) == 100
    assert [p.name for p in tmp_path.iterdir()] == ["i.lkidx"]  # temp removed


def test_index_store_put_get_save_load_drop(tmp_path, data):
    ids, vectors, queries = data
    store = IndexStore(tmp_path / "indexes")
    assert store.get(1, 2) is None and store.load(1, 2) is None
    with pytest.raises(KeyError):
        store.save(1, 2, {})
    old = GalleryIndex.build(DIM, "flat", ids[:10], vectors[:10])
    store.put(1, 2, old)
    assert store.get(1, 2) is old and store.keys() == [(1, 2)]
    store.save(1, 2, {"max_embedding_id": 10})
    assert store.path_for(1, 2).is_file()
    rebuilt = GalleryIndex.build(DIM, "hnsw", ids, vectors)
    store.put(1, 2, rebuilt)  # a swap: readers holding `old` keep working on it
    assert store.get(1, 2) is rebuilt and len(old.search(queries, 3)[0]) == 3
    (store.path_for(1, 2).parent / ".model-2.lkidx.x.tmp").write_bytes(b"partial")
    assert store.remove_stale_temp_files() == 1
    fresh = IndexStore(tmp_path / "indexes")
    assert fresh.load(1, 2) == {"max_embedding_id": 10} and len(fresh.get(1, 2)) == 10
    fresh.drop(1, 2)
    assert fresh.get(1, 2) is None and not store.path_for(1, 2).exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_searches_with_adds_and_removes(kind):
    """Readers never crash and always see a committed state: ids are added and removed in
    groups of 10 (group g = ids 10g..10g+9, all with the same direction), so a consistent
    result holds whole groups only."""
    groups = 60
    base = unit(groups, seed=5)
    vectors = np.repeat(base, 10, axis=0) + 1e-3 * unit(groups * 10, seed=6)
    ids = np.arange(groups * 10, dtype=np.int64)
    index = GalleryIndex.build(
        DIM, kind, ids[:200], vectors[:200], params={"compact_fraction": 0.3}
    )
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                g = int(rng.integers(groups))
                (hits,) = index.search(base[g : g + 1], 10, allowed_ids=ids[g * 10 : g * 10 + 10])
                found = sorted(i for i, _ in hits)
                assert found in ([], list(range(g * 10, g * 10 + 10))), found
                (hits,) = index.search(base[g : g + 1], 10)
                same = [i for i, _ in hits if i // 10 == g]
                assert len({i for i, _ in hits}) == len(hits)
                if kind == "flat":  # exact: the whole group or none of it
                    assert len(same) in (0, 10), hits
        except BaseException as error:
            errors.append(error)

    def writer(offset: int) -> None:
        rng = np.random.default_rng(100 + offset)
        try:
            for _ in range(40):
                g = int(rng.integers(offset, groups, 2)[0])
                group = ids[g * 10 : g * 10 + 10]
                if rng.random() < 0.5:
                    index.add(group, vectors[group])
                else:
                    index.remove(group)
        except BaseException as error:
            errors.append(error)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert not errors, errors[0]
    live = index.ids()
    assert len(live) == len(index) and len(live) % 10 == 0


def test_search_threads_apply_in_the_searching_thread(data):
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors)
    seen = []

    def search() -> None:
        index.search(queries, 3)
        seen.append(index_store.faiss.omp_get_max_threads())

    try:
        IndexStore(Path("unused"), search_threads=1)
        thread = threading.Thread(target=search)
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        index_store.set_search_threads(1)


def test_hnsw_compaction_replays_writes_made_during_the_rebuild(data, monkeypatch):
    ids, vectors, queries = data
    index = GalleryIndex.build(
        DIM, "hnsw", ids[:300], vectors[:300], params={"compact_fraction": 1}
    )
    index.remove(ids[:100])
    real = GalleryIndex._fresh_state
    seen = []

    def fresh_state_with_concurrent_writes(self, snapshot_ids, snapshot_vectors):
        # The rebuild holds no lock: searches and writes go on against the old state.
        index.add(ids[300:310], vectors[300:310])
        index.remove(ids[100:110])
        seen.append(len(index.search(queries[:1], 5)[0]))
        return real(self, snapshot_ids, snapshot_vectors)

    monkeypatch.setattr(GalleryIndex, "_fresh_state", fresh_state_with_concurrent_writes)
    index.compact()
    monkeypatch.undo()
    assert seen == [5]
    assert index._oplog is None and index._state.index.ntotal == 210  # 200 live + 10 added
    assert set(index.ids().tolist()) == set(ids[110:310].tolist())
    assert len(index) == 200 and index.contains(int(ids[305])) and not index.contains(int(ids[105]))
    allowed = ids[100:310]
    mask = np.isin(ids, ids[110:310])
    assert hit_ids(index.search(queries, 5, allowed_ids=allowed)) == brute_force(
        ids[mask], vectors[mask], queries, 5
    )


def test_filtered_search_survives_faiss_torch_utils(data, monkeypatch):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which monkeypatches
    Index.search without the `params` keyword the id filters need."""
    import faiss.contrib.torch_utils  # noqa: F401

    monkeypatch.setattr(index_store, "EXACT_SUBSET_MAX", 50)  # take the IDSelectorBatch path
    ids, vectors, queries = data
    index = GalleryIndex.build(DIM, "flat", ids, vectors)
    allowed = ids[::2]
    hits = index.search(queries, 5, allowed_ids=allowed)
    assert hit_ids(hits) == brute_force(allowed, vectors[::2], queries, 5)
    stored = index.vector(int(ids[0]))
    assert isinstance(stored, np.ndarray)
    np.testing.assert_allclose(stored, vectors[0] / np.linalg.norm(vectors[0]), atol=1e-6)


def test_exact_search_cost_grows_with_size_times_dimension_and_is_measured():
    assert index_store.exact_search_ms(100_000, 1280) == pytest.approx(75.0)
    assert index_store.exact_search_ms(200_000, 128) == pytest.approx(
        index_store.exact_search_ms(20_000, 1280)
    )
    count, dim = 4_000, 1024  # just over MEASURE_MIN_FLOATS
    index = GalleryIndex.build(dim, IndexType.flat, np.arange(count), unit(count, dim))
    assert index.estimated_exact_search_ms() == pytest.approx(
        index_store.exact_search_ms(count, dim)
    )
    for _ in range(5):
        index.search(unit(4, dim, seed=1), 10)
    measured = index.estimated_exact_search_ms()
    assert measured > 0 and measured != pytest.approx(index_store.exact_search_ms(count, dim))
    assert index.estimated_exact_search_ms(10 * count) == pytest.approx(10 * measured)
    small = GalleryIndex.build(DIM, IndexType.flat, np.arange(50), unit(50))
    small.search(unit(1), 5)  # too small to say anything about the cost at scale
    assert small.estimated_exact_search_ms() == pytest.approx(index_store.exact_search_ms(50, DIM))
