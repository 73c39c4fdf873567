"""Fixtures of the service tests: a tiny model artifact, databases (SQLite, and a fresh schema
on the local PostgreSQL), Settings and an HTTP client of the app."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.db.migrate import upgrade
from app.local import start_milvus_lite
from app.main import create_app
from app.services.runtime import Runtime
from tests.conftest import draw_sample, write_image_folder
from training.checkpoint import save_untrained_artifact

# TrainConfig overrides of a training run that takes seconds on a CPU (the job and UI tests).
TINY_TRAINING = {
    "image_size": 32,
    "batch_size": 8,
    "samples_per_class": 2,
    "embedding_dim": 16,
    "weights": "none",
    "iterations_per_epoch": 2,
    "eval_batch_size": 32,
    "lr": 1e-3,
}

# The machine's PostgreSQL (trust auth); every test gets its own schema, dropped afterwards.
ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TINY_DIM = 16


def png(class_index: int, sample: int, fmt: str = "PNG") -> bytes:
    """A small test picture (class = shape and colour) encoded as `fmt`."""
    out = io.BytesIO()
    draw_sample(class_index, sample).save(out, fmt)
    return out.getvalue()


def write_tiny_artifact(directory: Path, method: dict | None = None, extras=None) -> Path:
    """A 16-d model with random weights (no download) at 32 px: fast, deterministic."""
    return save_untrained_artifact(directory, TINY_DIM, method=method, extra_tensors=extras)


def worker_settings(root: Path, **overrides) -> Settings:
    """Settings for a real API + Celery worker under `root`: the tiny model in its model root,
    a tiny ImageFolder dataset ("tiny": 8 train, 4 test classes), quick heartbeats, one thread.
    Created once per root; `overrides` replace any field (broker, API keys, ...)."""
    model_root = root / "models-in"
    if not (model_root / "tiny").exists():
        write_tiny_artifact(model_root / "tiny")
    datasets = root / "datasets"
    if not (datasets / "tiny").exists():
        write_image_folder(datasets / "tiny" / "train", [f"c{i}" for i in range(8)], per_class=6)
        write_image_folder(
            datasets / "tiny" / "test", [f"t{i}" for i in range(4)], per_class=5, offset=8
        )
    defaults = {
        "data_dir": root / "data",
        "database_url": "",
        "model_root": model_root,
        "dataset_root": datasets,
        "seed_builtin_model": False,
        "auto_api_key": False,
        "embed_max_wait_ms": 1.0,
        "threads": 1,
        "worker_device": "cpu",
        "worker_num_workers": 0,
        "job_heartbeat_s": 0.3,
        "job_heartbeat_timeout_s": 4.0,
    }
    return Settings(**{**defaults, **overrides})


def make_client(tmp_path: Path, model_root: Path, **overrides) -> TestClient:
    """A client of an app with its own data directory under `tmp_path` (keys off unless
    `overrides` set them); use it as a context manager to run the app's start-up."""
    settings = Settings(
        data_dir=tmp_path / "data",
        model_root=model_root,
        seed_builtin_model=False,
        auto_api_key=False,
        **overrides,
    )
    return TestClient(create_app(settings))


def start_api(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The API under uvicorn in a subprocess with `env`, once its /readyz answers 200."""
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"the API exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the API did not become ready in 90 s")


@contextmanager
def migrated_runtime(settings: Settings) -> Iterator[Runtime]:
    """A worker's `Runtime` on a freshly migrated database, closed afterwards."""
    upgrade(settings)
    started = Runtime.start(settings)
    try:
        yield started
    finally:
        started.close()


def milvus_pass() -> bool:
    """The suite's second pass runs the service tests on the milvus index backend."""
    return os.environ.get("LOOKALIKE_INDEX_BACKEND") == "milvus"


@pytest.fixture(scope="session", autouse=True)
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """In the milvus pass: one Milvus Lite server (a real gRPC Milvus endpoint in its own
    process) that every app, worker and server process of the session shares, as replicas do."""
    if not milvus_pass() or os.environ.get("LOOKALIKE_MILVUS_URI"):
        yield os.environ.get("LOOKALIKE_MILVUS_URI")
        return
    process, uri = start_milvus_lite(tmp_path_factory.mktemp("milvus") / "data")
    os.environ["LOOKALIKE_MILVUS_URI"] = uri
    try:
        yield uri
    finally:
        del os.environ["LOOKALIKE_MILVUS_URI"]
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(autouse=True)
def milvus_collections(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the milvus pass each test's collections get their own prefix (each test has its own
    database, whose gallery ids start at 1 again)."""
    if milvus_pass():
        monkeypatch.setenv("LOOKALIKE_MILVUS_COLLECTION_PREFIX", f"t{uuid.uuid4().hex[:12]}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if milvus_pass():
        skip = pytest.mark.skip(reason="FAISS-specific: not run in the milvus pass")
        for item in items:
            if item.get_closest_marker("faiss_only"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding the artifact `tiny`."""
    root = tmp_path_factory.mktemp("model-root")
    write_tiny_artifact(root / "tiny")
    return root


def _postgres_available() -> bool:
    import psycopg

    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres() -> str:
    if not _postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    return POSTGRES_URL


@pytest.fixture
def postgres_schema(postgres: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema of the `test` database (parallel runs never
    collide); the schema is dropped after the test."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{postgres}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Empty string (SQLite under the data directory) or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("postgres_schema")


@pytest.fixture
def api_settings(tmp_path: Path, database_url: str, model_root: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        model_root=model_root,
        seed_builtin_model=False,
        auto_api_key=False,
        embed_max_wait_ms=1.0,
        threads=1,
    )


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client


@pytest.fixture
def tiny_model(client: TestClient) -> int:
    """The tiny artifact registered by path; its model id."""
    response = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def gallery(client: TestClient, tiny_model: int) -> int:
    response = client.post("/api/v1/galleries", json={"name": "shapes", "model_id": tiny_model})
    assert response.status_code == 201, response.text
    return response.json()["id"]
