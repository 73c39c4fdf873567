"""The milvus index backend against the faiss one, and what only a shared engine must do: agree
with FAISS, answer 503 while Milvus is down and recover by itself, reconcile with the database,
and serve two API processes at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.local import start_milvus_lite
from app.services.filters import Filters, metadata_matches
from app.services.milvus_indexes import _expression
from tests.app.conftest import make_client, png, start_api
from tests.conftest import free_port

API = "/api/v1"
ROOT = Path(__file__).resolve().parents[2]
LABELS = ["round", 'say "hi"', "back\\slash", "zoé"]


def fill(client: TestClient, count: int = 24) -> tuple[int, dict[int, str]]:
    """A gallery of `count` labelled images with metadata; (gallery id, labels by image id)."""
    model = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
    gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()["id"]
    labels = {}
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        response = client.post(
            f"{API}/galleries/{gallery}/images",
            files=[("files", (f"{i}.png", png(i % 6, i), "image/png"))],
            data={"label": label, "metadata": json.dumps({"n": i % 3, "odd": bool(i % 2)})},
        )
        assert response.status_code == 201, response.text
        labels[response.json()["results"][0]["image"]["id"]] = label
    return gallery, labels


def vector_search(client: TestClient, gallery: int, vectors: np.ndarray, **body) -> list:
    """Each query's hits."""
    rows = []
    for vector in vectors:
        response = client.post(
            f"{API}/galleries/{gallery}/search/vector",
            json={"vector": vector.tolist(), "k": 10, **body},
        )
        assert response.status_code == 200, response.text
        rows.append(response.json()["results"])
    return rows


def test_milvus_filter_expressions_escape_labels_and_type_metadata():
    expr = _expression(Filters(labels=['a"b', "c\\d"], metadata={"n": 1, "odd": True}))
    assert expr == 'label in ["a\\"b", "c\\\\d"] and meta["n"] == 1 and meta["odd"] == true'
    assert _expression(Filters(labelled_only=True)) == "label is not null"
    # Milvus compares true == 1; the backend re-checks JSON types as the database does.
    assert metadata_matches({"n": 1}, {"n": 1.0}) and not metadata_matches({"n": True}, {"n": 1})
    assert not metadata_matches({"n": "1"}, {"n": 1}) and not metadata_matches({}, {"n": 1})


def test_faiss_and_milvus_return_the_same_ids_in_the_same_order(tmp_path: Path, model_root: Path):
    """The same gallery (a flat index) on both backends: the same hits, in the same order, with
    the same scores, for a fixed query set, with and without filters and paging."""
    queries = np.random.default_rng(7).normal(size=(6, 16)).astype(np.float32)
    answers = {}
    for backend in ("faiss", "milvus"):
        with make_client(
            tmp_path / backend,
            model_root,
            index_backend=backend,
            milvus_uri=str(tmp_path / backend / "milvus.db"),
        ) as client:
            gallery, _ = fill(client)
            answers[backend] = [
                vector_search(client, gallery, queries),
                vector_search(client, gallery, queries, offset=5),
                vector_search(client, gallery, queries, labels=[LABELS[1], LABELS[3]]),
                vector_search(client, gallery, queries, metadata={"n": 1, "odd": True}),
            ]
    for faiss_rows, milvus_rows in zip(answers["faiss"], answers["milvus"], strict=True):
        for faiss_hits, milvus_hits in zip(faiss_rows, milvus_rows, strict=True):
            assert [h["image_id"] for h in faiss_hits] == [h["image_id"] for h in milvus_hits]
            assert np.allclose(
                [h["score"] for h in faiss_hits], [h["score"] for h in milvus_hits], atol=1e-5
            )
    filtered = answers["milvus"][3][0]
    assert filtered and all(h["metadata"] == {"n": 1, "odd": True} for h in filtered)


def test_milvus_down_answers_503_stores_nothing_and_recovers(tmp_path: Path, model_root: Path):
    port = free_port()
    engine, uri = start_milvus_lite(tmp_path / "milvus", port)
    query = {"image": ("q.png", png(1, 1), "image/png")}
    try:
        with make_client(
            tmp_path,
            model_root,
            index_backend="milvus",
            milvus_uri=uri,
            milvus_timeout_s=3,
            reconcile_interval_s=0.5,
        ) as client:
            gallery, labels = fill(client, 6)
            doomed = next(iter(labels))
            engine.send_signal(signal.SIGKILL)
            engine.wait()

            search = client.post(f"{API}/galleries/{gallery}/search", files=query)
            assert search.status_code == 503, search.text
            assert "vector engine" in search.json()["detail"] and "Retry-After" in search.headers
            upload = client.post(
                f"{API}/galleries/{gallery}/images", files=[("files", ("n.png", png(5, 99)))]
            )
            assert upload.status_code == 503, upload.text
            assert client.get(f"{API}/galleries/{gallery}").json()["image_count"] == 6
            # The database is the source of truth: a deletion commits, Milvus catches up later.
            assert client.delete(f"{API}/images/{doomed}").status_code == 204
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["index_backend"]["pending_reconcile"] == [gallery]

            engine, _ = start_milvus_lite(tmp_path / "milvus", port)
            deadline = time.monotonic() + 30
            while client.get("/readyz").json()["index_backend"]["pending_reconcile"]:
                assert time.monotonic() < deadline, "the pending reconcile never ran"
                time.sleep(0.2)
            found = client.post(f"{API}/galleries/{gallery}/search", files=query, data={"k": 10})
            assert found.status_code == 200, found.text
            ids = [hit["image_id"] for hit in found.json()["results"]]
            assert sorted(ids) == sorted(set(labels) - {doomed})
            info = client.get(f"{API}/galleries/{gallery}").json()
            assert info["image_count"] == info["index_size"] == 5
    finally:
        engine.kill()
        engine.wait()


def test_reconcile_repairs_lost_and_extra_rows_and_a_lost_volume(tmp_path: Path, model_root: Path):
    uri = str(tmp_path / "milvus.db")
    with make_client(tmp_path, model_root, index_backend="milvus", milvus_uri=uri) as client:
        gallery, labels = fill(client, 8)
        indexes = client.app.state.runtime.indexes  # type: ignore[attr-defined]
        store = indexes.store
        (name,) = store.collections()
        lost = sorted(labels)[:2]
        store.delete(name, np.array(lost))
        store.insert(name, np.array([999]), np.ones((1, 16), np.float32), ["ghost"], [None])
        report = indexes.reconcile(gallery)
        assert (report.inserted, report.deleted, report.rebuilt) == (2, 1, False)
        assert report.stored == report.indexed == 8
        assert sorted(store.ids(name, np.array(sorted(labels)))) == sorted(labels)

        store.drop(name)  # the engine's volume is lost
        store.drop_alias(gallery)
        report = indexes.reconcile(gallery)
        assert report.rebuilt and report.inserted == 8 and report.indexed == 8
        hits = vector_search(client, gallery, np.ones((1, 16), np.float32))[0]
        assert len(hits) == 8


@pytest.mark.slow
def test_lookalike_index_reconcile_reports_each_gallery(tmp_path: Path, model_root: Path):
    uri = str(tmp_path / "milvus.db")
    with make_client(tmp_path, model_root, index_backend="milvus", milvus_uri=uri) as client:
        gallery, labels = fill(client, 4)
        indexes = client.app.state.runtime.indexes  # type: ignore[attr-defined]
        (name,) = indexes.store.collections()
        indexes.store.delete(name, np.array(sorted(labels)[:1]))
    env = {
        **os.environ,
        "LOOKALIKE_DATA_DIR": str(tmp_path / "data"),
        "LOOKALIKE_INDEX_BACKEND": "milvus",
        "LOOKALIKE_MILVUS_URI": uri,
        "LOOKALIKE_SEED_BUILTIN_MODEL": "false",
        "LOOKALIKE_AUTO_API_KEY": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "index", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "backend": "milvus",
        "gallery_id": gallery,
        "stored": 4,
        "indexed": 4,
        "inserted": 1,
        "deleted": 0,
        "rebuilt": False,
    }


@pytest.mark.slow
def test_two_api_processes_over_one_database_and_engine_agree_at_once(
    tmp_path: Path, model_root: Path, postgres_schema: str
):
    """Stateless replicas: uploads acknowledged by one API process are found by the other on
    the very next request, and deletions vanish from both."""
    engine, uri = start_milvus_lite(tmp_path / "milvus")
    env = {
        **os.environ,
        "LOOKALIKE_DATABASE_URL": postgres_schema,
        # Model files and uploads: one volume that every replica mounts (as under compose).
        "LOOKALIKE_DATA_DIR": str(tmp_path / "shared"),
        "LOOKALIKE_INDEX_BACKEND": "milvus",
        "LOOKALIKE_MILVUS_URI": uri,
        "LOOKALIKE_MODEL_ROOT": str(model_root),
        "LOOKALIKE_SEED_BUILTIN_MODEL": "false",
        "LOOKALIKE_AUTO_API_KEY": "false",
        "LOOKALIKE_THREADS": "1",
    }
    ports = [free_port(), free_port()]
    apis = []
    try:
        for number, port in enumerate(ports):
            apis.append(start_api(port, env, tmp_path / f"api{number}.log"))
        one, two = (httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=60) for p in ports)
        with one, two:
            model = one.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
            gallery = one.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()
            uploaded = []
            for i in range(6):
                writer, reader = (one, two) if i % 2 == 0 else (two, one)
                response = writer.post(
                    f"{API}/galleries/{gallery['id']}/images",
                    files=[("files", (f"{i}.png", png(i, i), "image/png"))],
                )
                assert response.status_code == 201, response.text
                image = response.json()["results"][0]["image"]["id"]
                uploaded.append(image)
                found = reader.post(
                    f"{API}/galleries/{gallery['id']}/search",
                    files={"image": ("q.png", png(i, i), "image/png")},
                    data={"k": 1},
                )
                assert found.status_code == 200, found.text
                hits = found.json()["results"]
                assert hits[0]["image_id"] == image and hits[0]["score"] > 0.9999
            assert two.delete(f"{API}/images/{uploaded[0]}").status_code == 204
            for client in (one, two):
                hits = client.post(
                    f"{API}/galleries/{gallery['id']}/search",
                    files={"image": ("q.png", png(0, 0), "image/png")},
                    data={"k": 10},
                ).json()["results"]
                assert sorted(hit["image_id"] for hit in hits) == sorted(uploaded[1:])
    finally:
        for api in apis:
            api.terminate()
            api.wait(timeout=30)
        engine.kill()
        engine.wait()


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_ivfpq_refines_with_stored_vectors_and_reports_its_recall(
    backend: str, tmp_path: Path, model_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """IVF-PQ candidates are re-scored with the stored embeddings (a stored vector finds itself
    at score 1, which PQ's approximate distances never give), and each built index's recall@10
    against exact search is measured on a sample and shown by the gallery's GET."""
    from sqlalchemy import insert

    import app.index_store as index_store
    import app.milvus_index as milvus_index
    from app.db.models import Image, ImageEmbedding

    monkeypatch.setattr(index_store, "IVFPQ_MIN_TRAIN", 300)  # PQ trains on 256+ points
    monkeypatch.setattr(milvus_index, "IVFPQ_MIN_TRAIN", 300)
    uri = str(tmp_path / "milvus.db")
    with make_client(tmp_path, model_root, index_backend=backend, milvus_uri=uri) as client:
        model = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
        gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()
        vectors = np.random.default_rng(3).normal(size=(400, 16)).astype(np.float32)
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.session_factory() as session:
            session.execute(
                insert(Image),
                [
                    {
                        "id": i + 1,
                        "gallery_id": gallery["id"],
                        "content_hash": f"{i:064x}",
                        "file_name": f"x/{i}.png",
                        "content_type": "image/png",
                        "width": 1,
                        "height": 1,
                        "size_bytes": 1,
                        "meta": {},
                    }
                    for i in range(len(vectors))
                ],
            )
            session.execute(
                insert(ImageEmbedding),
                [
                    {"image_id": i + 1, "model_id": model, "vector": v.tobytes()}
                    for i, v in enumerate(vectors)
                ],
            )
            session.commit()
        recalls = {}
        for refine in (1, 16):
            params = {"nlist": 8, "nprobe": 8, "m": 4, "refine_factor": refine}
            patched = client.patch(
                f"{API}/galleries/{gallery['id']}",
                json={"index_type": "ivfpq", "index_params": params},
            )
            assert patched.status_code == 200, patched.text
            info = client.get(f"{API}/galleries/{gallery['id']}").json()
            recalls[refine] = info["index_recall_at_10"]
            top = vector_search(client, gallery["id"], vectors[:5])
            scores = [hits[0]["score"] for hits in top]
            if refine > 1:
                assert [hits[0]["image_id"] for hits in top] == [1, 2, 3, 4, 5]
                assert scores == pytest.approx([1.0] * 5, abs=1e-6)
            elif backend == "faiss":
                assert max(abs(s - 1.0) for s in scores) > 1e-4  # PQ's approximate scores
        assert recalls[16] >= 0.9
        if backend == "faiss":
            assert 0 < recalls[1] < recalls[16] <= 1.0
        else:  # Milvus Lite 3.2 accepts IVF_PQ but searches exactly (it builds no PQ index)
            assert 0 < recalls[1] <= recalls[16] <= 1.0


def test_milvus_switch_moves_the_alias_and_delete_drops_the_collections(
    tmp_path: Path, model_root: Path
):
    uri = str(tmp_path / "milvus.db")
    with make_client(tmp_path, model_root, index_backend="milvus", milvus_uri=uri) as client:
        gallery, labels = fill(client, 4)
        store = client.app.state.runtime.indexes.store  # type: ignore[attr-defined]
        (first,) = store.collections()
        assert store.alias_target(gallery) == first
        patched = client.patch(f"{API}/galleries/{gallery}", json={"index_type": "hnsw"})
        assert patched.status_code == 200, patched.text
        (second,) = store.collections()  # the old version's collection is gone
        assert second != first and store.collections()[second].version == 2
        assert store.alias_target(gallery) == second
        hits = vector_search(client, gallery, np.ones((1, 16), np.float32))[0]
        assert sorted(hit["image_id"] for hit in hits) == sorted(labels)
        assert client.delete(f"{API}/galleries/{gallery}").status_code == 204
        assert store.collections() == {} and store.alias_target(gallery) is None
