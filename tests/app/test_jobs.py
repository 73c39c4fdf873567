"""Jobs over REST, run by REAL Celery workers (subprocesses, `lookalike worker`) on the REAL
Redis of this machine (a dedicated DB number and key prefix per run), not eager mode; one test
runs on the embedded SQLite broker instead. Jobs are tiny (EfficientNet-Lite0 without
pretrained weights at 32 px, a few iterations, one torch thread) so each takes seconds."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.db.models import Job
from app.local import serve_processes, settings_env
from app.main import create_app
from app.services.jobs.base import now
from app.services.jobs.lifecycle import claim, fail_lost_jobs, fail_worker_jobs
from app.services.runtime import Runtime
from tests.app.conftest import TINY_TRAINING, migrated_runtime, png, worker_settings
from tests.conftest import free_port, write_image_folder

REDIS_DB = 13  # nobody else on this machine uses it; keys also carry a per-run prefix
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
JOBS = "/api/v1/jobs"
TRAINING = {**TINY_TRAINING, "iterations": 4}


def delete_broker_keys(prefix: str) -> None:
    """What a test's broker left in Redis (its keys carry the test's prefix)."""
    connection = redis.Redis.from_url(REDIS_URL)
    keys = list(connection.scan_iter(f"{prefix}*"))
    if keys:
        connection.delete(*keys)


def _redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not _redis_available(), reason="no Redis on 127.0.0.1:6379")


def make_settings(root: Path, broker_url: str = "", prefix: str = "") -> Settings:
    return worker_settings(root, broker_url=broker_url, broker_key_prefix=prefix)


class Worker:
    """`lookalike worker` in a subprocess with the test's Settings."""

    def __init__(
        self,
        settings: Settings,
        log: Path,
        hostname: str | None = None,
        queues: tuple[str, ...] = ("gpu", "cpu"),
        pool: str | None = "solo",
    ) -> None:
        command = [sys.executable, "-m", "app.cli", "worker", "--queues", ",".join(queues)]
        if pool:
            command += ["--pool", pool]
        if hostname:
            command += ["--hostname", hostname]
        self.log = log
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **settings_env(settings)},
            stdout=open(log, "ab"),  # noqa: SIM115  (closed with the process)
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                return
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


Client = TestClient | httpx.Client


def wait_for(
    client: Client, job_id: int, done: Callable[[dict], bool], timeout: float = 90.0
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{JOBS}/{job_id}").json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")
        time.sleep(0.2)


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def submit(client: Client, job_type: str, params: dict, **headers: str) -> dict:
    response = client.post(JOBS, json={"type": job_type, "params": params}, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"{JOBS}/{response.json()['id']}"
    return response.json()


@pytest.fixture(scope="module")
def redis_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Worker]]:
    """API client and one worker (gpu + cpu queues) on Redis, shared by the module's tests."""
    if not _redis_available():
        pytest.skip("no Redis on 127.0.0.1:6379")
    root = tmp_path_factory.mktemp("jobs")
    prefix = f"lookalike-test-{uuid.uuid4().hex[:8]}:"
    settings = make_settings(root, REDIS_URL, prefix)
    worker = Worker(settings, root / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            worker.wait_ready()
            yield client, worker
    finally:
        worker.stop()
        delete_broker_keys(prefix)


@pytest.fixture(scope="module")
def ids(redis_env) -> dict[str, int]:
    """The dataset and the tiny model registered once for the module."""
    client, _ = redis_env
    dataset = client.post(
        "/api/v1/datasets", json={"name": "tiny", "kind": "imagefolder", "path": "tiny"}
    )
    assert dataset.status_code == 201, dataset.text
    model = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"})
    assert model.status_code == 201, model.text
    return {"dataset": dataset.json()["id"], "model": model.json()["id"]}


# ---------------------------------------------------------------------- end to end
@needs_redis
def test_train_evaluate_and_index_end_to_end(redis_env, ids):
    client, _ = redis_env
    dataset = client.get(f"/api/v1/datasets/{ids['dataset']}").json()
    assert dataset["status"] == "ready"
    assert dataset["splits"] == {
        "train": {"classes": 8, "images": 48},
        "test": {"classes": 4, "images": 20},
    }

    job = submit(
        client,
        "train",
        {
            "dataset_id": ids["dataset"],
            "method": "margin",
            "hyperparameters": TRAINING,
            "baseline_model_id": ids["model"],
        },
    )
    assert job["state"] == "queued" and job["queue"] == "gpu"
    running = wait_for(client, job["id"], lambda j: j["state"] != "queued" and j["step"])
    assert running["state"] in ("running", "succeeded"), running
    assert running["total_steps"] == 4 and running["progress"] > 0
    trained = wait_for(client, job["id"], finished)
    assert trained["state"] == "succeeded", trained
    assert trained["progress"] == 1.0 and trained["epoch"] >= 1
    result = trained["result"]
    assert set(result["metrics"]["test"]) >= {"recall@1", "map@r"}
    model = client.get(f"/api/v1/models/{result['model_id']}").json()
    assert model["name"] == f"margin-job{job['id']}" and model["embedding_dim"] == 16
    assert model["card"]["metrics"]["test"]["recall@1"] == result["metrics"]["test"]["recall@1"]
    assert "started" in client.get(f"{JOBS}/{job['id']}/logs", params={"lines": 50}).text
    # The baseline was measured on the same 20 test images; the gain is the difference.
    baseline = result["baseline"]
    assert (baseline["model_id"], baseline["model_name"], baseline["builtin"]) == (
        ids["model"],
        "tiny",
        False,
    )
    for metric in ("recall@1", "map@r"):
        gain = result["metrics"]["test"][metric] - baseline["metrics"][metric]
        assert result["gain_over_baseline"][metric] == pytest.approx(gain)
    assert (result["method"], result["preset"]) == ("margin", None)
    report = client.get(f"/api/v1/reports/models/{result['model_id']}").json()
    compared = [s for s in report["sources"] if s["name"] == "test (baseline tiny, for comparison)"]
    assert len(compared) == 1 and compared[0]["metrics"] == baseline["metrics"]

    evaluation = submit(
        client,
        "evaluate",
        {"model_id": result["model_id"], "dataset_id": ids["dataset"], "split": "test"},
    )
    evaluated = wait_for(client, evaluation["id"], finished)
    assert evaluated["state"] == "succeeded", evaluated
    metrics = evaluated["result"]["metrics"]
    assert metrics["recall@1"] == pytest.approx(result["metrics"]["test"]["recall@1"], abs=1e-5)
    assert evaluated["result"]["images"] == 20 and evaluated["metrics"] == metrics

    gallery = client.post("/api/v1/galleries", json={"name": "g", "model_id": ids["model"]})
    gallery_id = gallery.json()["id"]
    files = [("files", (f"{i}.png", png(i % 3, i), "image/png")) for i in range(6)]
    assert client.post(f"/api/v1/galleries/{gallery_id}/images", files=files).status_code == 201
    before = client.post(
        f"/api/v1/galleries/{gallery_id}/search", files={"image": ("q.png", png(0, 0))}
    )
    assert before.status_code == 200, before.text
    reindex = submit(client, "index", {"gallery_id": gallery_id, "model_id": result["model_id"]})
    assert reindex["queue"] == "cpu"
    indexed = wait_for(client, reindex["id"], finished)
    assert indexed["state"] == "succeeded", indexed
    assert indexed["result"]["embedded"] == 6 and indexed["result"]["index_version"] == 2
    switched = client.get(f"/api/v1/galleries/{gallery_id}").json()
    assert switched["model_id"] == result["model_id"] and switched["index_version"] == 2
    after = client.post(
        f"/api/v1/galleries/{gallery_id}/search", files={"image": ("q.png", png(0, 0))}
    )
    assert after.status_code == 200, after.text
    assert after.json()["model_id"] == result["model_id"]
    assert after.json()["index_version"] == 2 and len(after.json()["results"]) == 6

    listed = client.get(JOBS, params={"type": "train", "state": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]] and listed["total"] == 1


@needs_redis
def test_idempotency_key_returns_the_same_job(redis_env, ids):
    client, _ = redis_env
    params = {"model_id": ids["model"], "dataset_id": ids["dataset"], "split": "train"}
    first = submit(client, "evaluate", params, **{"Idempotency-Key": "eval-once"})
    again = submit(client, "evaluate", params, **{"Idempotency-Key": "eval-once"})
    assert again["id"] == first["id"]
    other = client.post(
        JOBS,
        json={"type": "evaluate", "params": {**params, "split": "test"}},
        headers={"Idempotency-Key": "eval-once"},
    )
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    done = wait_for(client, first["id"], finished)
    assert done["state"] == "succeeded"
    # Times are UTC and say so (SQLite hands back naive datetimes): browsers read them right.
    stamps = [done[key] for key in ("created_at", "started_at", "finished_at", "heartbeat_at")]
    dataset = client.get(f"/api/v1/datasets/{ids['dataset']}").json()
    assert all(stamp.endswith("Z") for stamp in [*stamps, dataset["created_at"]]), stamps


# ---------------------------------------------------------------------- cancel and failure
@needs_redis
def test_cancel_a_running_and_a_queued_job(redis_env, ids):
    client, _ = redis_env
    models_before = len(client.get("/api/v1/models").json())
    long_run = {**TRAINING, "iterations": 100_000, "iterations_per_epoch": 100_000}
    training = submit(client, "train", {"dataset_id": ids["dataset"], "hyperparameters": long_run})
    # The only worker is busy with the training, so this one waits in the queue.
    waiting = submit(client, "evaluate", {"model_id": ids["model"], "dataset_id": ids["dataset"]})
    wait_for(client, training["id"], lambda j: j["state"] == "running" and j["step"])

    response = client.post(f"{JOBS}/{waiting['id']}/cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelled"
    response = client.post(f"{JOBS}/{training['id']}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    stopped = wait_for(client, training["id"], finished, timeout=30)
    assert stopped["state"] == "cancelled" and stopped["result"] is None
    assert len(client.get("/api/v1/models").json()) == models_before  # nothing registered

    again = client.post(f"{JOBS}/{training['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    # The worker receives the cancelled job's message and skips it.
    time.sleep(1.0)
    assert client.get(f"{JOBS}/{waiting['id']}").json()["started_at"] is None


@needs_redis
def test_a_failing_job_reports_its_error(redis_env, ids, tmp_path):
    client, _ = redis_env
    root = Path(client.app.state.settings.dataset_root)
    write_image_folder(root / "doomed" / "train", ["a", "b"], per_class=3)
    write_image_folder(root / "doomed" / "test", ["c", "d"], per_class=3, offset=2)
    dataset = client.post(
        "/api/v1/datasets", json={"name": "doomed", "kind": "imagefolder", "path": "doomed"}
    ).json()
    for image in (root / "doomed" / "test").rglob("*.png"):
        image.unlink()  # the dataset breaks after it was registered
    job = submit(client, "evaluate", {"model_id": ids["model"], "dataset_id": dataset["id"]})
    failed = wait_for(client, job["id"], finished)
    assert failed["state"] == "failed"
    assert "no images in" in failed["error"] and failed["result"] is None


# ---------------------------------------------------------------------- validation, broker
@needs_redis
def test_bad_requests_are_refused_before_queuing(redis_env, ids):
    client, _ = redis_env
    total = client.get(JOBS).json()["total"]
    cases = [
        ("train", {"dataset_id": 999}, 422, "dataset 999 does not exist"),
        ("train", {"dataset_id": ids["dataset"], "hyperparameters": {"lr": -1}}, 422, "lr"),
        ("train", {"dataset_id": ids["dataset"], "hyperparameters": {"data": "/etc"}}, 422, "data"),
        ("train", {"dataset_id": ids["dataset"], "method": "nope"}, 422, "unknown method"),
        ("train", {"dataset_id": ids["dataset"], "preset": "nope"}, 422, "unknown preset"),
        ("train", {"dataset_id": ids["dataset"], "baseline_model_id": 999}, 422, "model 999"),
        (
            "train",
            {"dataset_id": ids["dataset"], "hyperparameters": {"weights": "/etc/passwd"}},
            422,
            "weights",
        ),
        (
            "train",
            {"dataset_id": ids["dataset"], "hyperparameters": {"batch_size": 7}},
            422,
            "multiple",
        ),
        ("evaluate", {"model_id": 999, "dataset_id": ids["dataset"]}, 422, "model 999"),
        ("index", {"gallery_id": 999, "model_id": ids["model"]}, 422, "gallery 999"),
        ("import", {"gallery_id": 999, "folder": "tiny"}, 422, "gallery 999"),
        ("reticulate", {}, 422, "unknown job type"),
        ("evaluate", {"model_id": ids["model"]}, 422, "dataset_id"),
        ("index", {"gallery_id": 2**63, "model_id": ids["model"]}, 422, "64-bit integer range"),
        ("index", {"gallery_id": 2**62, "model_id": ids["model"]}, 422, "less than or equal"),
    ]
    for job_type, params, status, message in cases:
        response = client.post(JOBS, json={"type": job_type, "params": params})
        assert response.status_code == status, (job_type, params, response.text)
        assert message in response.json()["detail"], (message, response.text)
    gallery = client.post("/api/v1/galleries", json={"name": "v", "model_id": ids["model"]})
    outside = client.post(
        JOBS,
        json={"type": "import", "params": {"gallery_id": gallery.json()["id"], "folder": ".."}},
    )
    assert outside.status_code == 422 and "not a folder under" in outside.json()["detail"]
    bad_dataset = client.post(
        "/api/v1/datasets", json={"name": "x", "kind": "imagefolder", "path": "../.."}
    )
    assert bad_dataset.status_code == 422
    nul = client.post(
        "/api/v1/datasets", json={"name": "x", "kind": "imagefolder", "path": "a\x00"}
    )
    assert nul.status_code == 422 and "NUL character" in nul.json()["detail"]
    huge = client.post(
        f"{JOBS}/import", data={"gallery_id": str(2**63)}, files={"archive": ("a.zip", b"PK")}
    )
    assert huge.status_code == 422 and "less than or equal" in huge.json()["detail"]
    assert client.get(JOBS).json()["total"] == total  # nothing was queued


def test_broker_down_is_a_quick_503_and_searches_keep_working(tmp_path):
    settings = make_settings(tmp_path, "redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        dataset = client.post(
            "/api/v1/datasets", json={"name": "tiny", "kind": "imagefolder", "path": "tiny"}
        ).json()
        started = time.monotonic()
        response = client.post(
            JOBS, json={"type": "train", "params": {"dataset_id": dataset["id"]}}
        )
        assert response.status_code == 503, response.text
        assert "broker" in response.json()["detail"]
        assert time.monotonic() - started < 10
        assert client.get(JOBS).json()["total"] == 0  # nothing left behind in `queued`
        # A benchmark build is a job too: refused the same way, no dataset left `building`.
        icons = client.post("/api/v1/datasets", json={"name": "icons", "kind": "icons"})
        assert icons.status_code == 503, icons.text
        assert [d["name"] for d in client.get("/api/v1/datasets").json()] == ["tiny"]
        with_path = {"name": "icons", "kind": "icons", "path": "tiny"}
        assert client.post("/api/v1/datasets", json=with_path).status_code == 422
        assert client.get("/api/v1/galleries").status_code == 200


# ---------------------------------------------------------------------- killed worker
@needs_redis
def test_a_killed_worker_leaves_its_job_failed_with_a_reason(tmp_path):
    prefix = f"lookalike-test-{uuid.uuid4().hex[:8]}:"
    settings = make_settings(tmp_path, REDIS_URL, prefix)
    worker = Worker(settings, tmp_path / "worker.log", hostname="doomed@%h")
    try:
        with TestClient(create_app(settings)) as client:
            worker.wait_ready()
            dataset = client.post(
                "/api/v1/datasets", json={"name": "tiny", "kind": "imagefolder", "path": "tiny"}
            ).json()
            long_run = {**TRAINING, "iterations": 100_000, "iterations_per_epoch": 100_000}
            params = {"dataset_id": dataset["id"], "hyperparameters": long_run}
            job = submit(client, "train", params)
            wait_for(client, job["id"], lambda j: j["state"] == "running" and j["step"])
            worker.process.kill()  # SIGKILL: no chance to clean up
            worker.process.wait()
            assert client.get(f"{JOBS}/{job['id']}").json()["state"] == "running"
            failed = wait_for(client, job["id"], finished, timeout=20)
            assert failed["state"] == "failed"
            assert "doomed@" in failed["error"]
            assert "was lost: no heartbeat since" in failed["error"]
            assert client.get(JOBS, params={"state": "running"}).json()["total"] == 0
    finally:
        worker.stop()
        delete_broker_keys(prefix)


@needs_redis
def test_a_killed_prefork_child_fails_its_job_at_once(tmp_path):
    """The deployment default for the cpu queue is a prefork pool: the parent sees the child
    die and fails the job without waiting for the heartbeat timeout."""
    prefix = f"lookalike-test-{uuid.uuid4().hex[:8]}:"
    settings = make_settings(tmp_path, REDIS_URL, prefix).model_copy(
        update={"job_heartbeat_timeout_s": 300.0}
    )
    # Enough images that the import is still running when the test kills the child (400 could
    # finish between the progress poll and the kill on an idle machine).
    write_image_folder(settings.dataset_root / "many", [f"k{i}" for i in range(150)], per_class=10)
    log = tmp_path / "worker.log"
    worker = Worker(settings, log, queues=("cpu",), pool=None)  # prefork
    try:
        with TestClient(create_app(settings)) as client:
            worker.wait_ready()
            model = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"}).json()
            gallery = client.post(
                "/api/v1/galleries", json={"name": "g", "model_id": model["id"]}
            ).json()
            job = submit(client, "import", {"gallery_id": gallery["id"], "folder": "many"})
            running = wait_for(client, job["id"], lambda j: j["state"] == "running" and j["step"])
            assert running["total_steps"] == 1500 and 0 < running["progress"] < 1
            children = subprocess.run(
                ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True
            ).stdout.split()
            assert children, log.read_text()
            for child in children:
                os.kill(int(child), signal.SIGKILL)
            failed = wait_for(client, job["id"], finished, timeout=20)
            assert failed["state"] == "failed"
            assert "worker process running this job died" in failed["error"]
            assert "SIGKILL" in failed["error"]
    finally:
        worker.stop()
        delete_broker_keys(prefix)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with migrated_runtime(make_settings(tmp_path)) as started:
        yield started


def _job(runtime: Runtime, **values) -> int:
    with runtime.session_factory() as session:
        job = Job(type="train", queue="gpu", params={}, **values)
        session.add(job)
        session.commit()
        return job.id


def test_a_job_is_claimed_once_and_never_after_it_ended(runtime):
    queued = _job(runtime)
    assert claim(runtime, queued, "a@host") is not None
    assert claim(runtime, queued, "b@host") is None  # a second delivery does nothing
    for state in ("failed", "cancelled", "succeeded"):
        assert claim(runtime, _job(runtime, state=state), "a@host") is None
    assert claim(runtime, 12345, "a@host") is None


def test_a_stale_heartbeat_or_a_restarted_worker_fails_the_job(runtime):
    settings = runtime.settings
    old = now() - timedelta(seconds=settings.job_heartbeat_timeout_s + 1)
    stale = _job(runtime, state="running", worker="w1@h", heartbeat_at=old)
    fresh = _job(runtime, state="running", worker="w1@h", heartbeat_at=now())
    other = _job(runtime, state="running", worker="w2@h", heartbeat_at=now())
    with runtime.session_factory() as session:
        assert fail_lost_jobs(session, settings) == 1
        assert session.get(Job, stale).state == "failed"
        assert "w1@h was lost" in session.get(Job, stale).error
        assert session.get(Job, fresh).state == "running"
        assert fail_worker_jobs(session, "w1@h", "restarted") == 1
        assert session.get(Job, fresh).error == "restarted"
        assert session.get(Job, other).state == "running"


# ---------------------------------------------------------------------- embedded broker, import
def _archive_bytes(kind: str) -> bytes:
    members = {
        "cats/a.png": png(0, 0),
        "cats/b.png": png(0, 1),
        "dogs/c.png": png(1, 0),
        "../../escape.png": png(2, 0),
        "/abs/d.png": png(2, 1),
        "dogs/again.png": png(1, 0),  # the same content as dogs/c.png
        "broken.png": b"\x89PNG\r\n\x1a\n not really",
        "notes.txt": b"not an image, skipped",
    }
    out = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(out, "w") as bundle:
            for name, data in members.items():
                bundle.writestr(name, data)
    else:
        with tarfile.open(fileobj=out, mode="w:gz") as bundle:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("link.png")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            bundle.addfile(link)
    return out.getvalue()


def test_serve_runs_import_jobs_on_the_embedded_broker_without_redis(tmp_path):
    """`lookalike serve`'s machinery: the API over HTTP plus a gpu and a cpu worker process on
    the default broker (an SQLite file in the data directory), all stopped at the end."""
    # Archives may be larger than one image may be (max_upload_bytes), up to max_archive_bytes.
    settings = make_settings(tmp_path).model_copy(
        update={"max_upload_bytes": 1000, "max_archive_bytes": 50_000}
    )
    assert settings.broker_url.startswith("sqla+sqlite:///")
    with serve_processes(settings, port=free_port()) as service:
        workers = list(service.workers.values())
        assert service.settings.cpu_sharers == 3  # the API and its two workers share the CPUs
        with httpx.Client(base_url=service.url, timeout=30) as client:
            model = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"}).json()
            gallery = client.post(
                "/api/v1/galleries", json={"name": "pets", "model_id": model["id"]}
            ).json()
            jobs = []
            for kind in ("zip", "tar"):
                response = client.post(
                    f"{JOBS}/import",
                    data={"gallery_id": str(gallery["id"])},
                    files={"archive": (f"pets.{kind}", _archive_bytes(kind))},
                )
                assert response.status_code == 202, response.text
                jobs.append(response.json())
            folder = submit(client, "import", {"gallery_id": gallery["id"], "folder": "tiny/test"})

            zipped = wait_for(client, jobs[0]["id"], finished, timeout=90)
            assert zipped["state"] == "succeeded", zipped
            files = {f["name"]: f for f in zipped["result"]["files"]}
            assert set(files) == {
                "cats/a.png", "cats/b.png", "dogs/c.png", "../../escape.png", "/abs/d.png",
                "dogs/again.png", "broken.png",
            }  # fmt: skip
            assert zipped["result"]["added"] == 5
            assert files["dogs/again.png"]["status"] == "duplicate"
            assert files["broken.png"]["status"] == "rejected" and files["broken.png"]["error"]
            # The tar and folder imports may have run too by now (one cpu worker, in order).
            images = client.get(f"/api/v1/galleries/{gallery['id']}/images").json()["items"]
            assert {"cats", "dogs", "abs", None} <= {image["label"] for image in images}
            # Nothing was written outside the upload store, whatever the member names said.
            assert not any(tmp_path.rglob("escape.png"))

            tarred = wait_for(client, jobs[1]["id"], finished, timeout=60)
            assert tarred["state"] == "succeeded", tarred
            assert tarred["result"]["added"] == 0 and tarred["result"]["duplicate"] == 6
            assert "link.png" not in {f["name"] for f in tarred["result"]["files"]}

            from_folder = wait_for(client, folder["id"], finished, timeout=60)
            assert from_folder["state"] == "succeeded", from_folder
            assert from_folder["result"]["added"] == 20

            not_archive = client.post(
                f"{JOBS}/import",
                data={"gallery_id": str(gallery["id"])},
                files={"archive": ("x.zip", b"just text")},
            )
            assert not_archive.status_code == 415
            too_big = client.post(
                f"{JOBS}/import",
                data={"gallery_id": str(gallery["id"])},
                files={"archive": ("big.zip", b"0" * 60_000)},
            )
            assert too_big.status_code == 413
    assert all(process.poll() is not None for process in workers)


def test_a_train_job_without_method_or_preset_trains_the_recommended_preset(tmp_path):
    """The best method measured for the dataset's kind of data (docs/results.md), unless the
    request names a method or a preset."""
    from app.db.models import Dataset
    from app.services.jobs.train import TrainParams, train_config
    from training.data.benchmarks.common import write_manifest

    icons = tmp_path / "icons"
    icons.mkdir()
    write_manifest(icons, {"benchmark": "IconThemes"})
    settings = Settings(data_dir=tmp_path / "data")
    summary = {"train": {"classes": 8, "images": 48}}
    benchmark = Dataset(name="icons", kind="imagefolder", path=str(icons), summary=summary)
    other = Dataset(name="mine", kind="imagefolder", path=str(tmp_path), summary=summary)

    def chosen(dataset: Dataset, **request) -> tuple[str | None, str]:
        cfg = train_config(settings, TrainParams(dataset_id=1, **request), dataset, out=None)
        return cfg.preset, cfg.method

    assert chosen(benchmark) == ("dvml-icons", "dvml")
    assert chosen(other) == ("dvml", "dvml")
    assert chosen(benchmark, method="margin") == (None, "margin")
    assert chosen(benchmark, preset="diva-icons") == ("diva-icons", "diva")
    assert chosen(benchmark, preset="icons") == ("icons", "margin")
