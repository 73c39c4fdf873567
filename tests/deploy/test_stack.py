"""The production stack without Docker: the commands docker-compose.yml runs (read from it) as
processes on this machine, against the real PostgreSQL and Redis, and the user journey over
HTTP: create a gallery, upload images, search, train a model (a job on the `gpu` worker), index
the gallery with it (a job on the `cpu` worker), search again. The compose healthchecks are run
too. Skipped when PostgreSQL (127.0.0.1:5432, user postgres) or Redis (127.0.0.1:6379) is not
there.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 14  # dedicated to this test; keys carry a per-run prefix as well
API_KEY = "stack-test-key"

# About 55 s on an idle 2-core machine; the waits below are generous for a loaded one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def compose_services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def grace_seconds(service: dict[str, Any]) -> float:
    """A service's stop_grace_period ("90s", "2m", "1m30s"); docker's default is 10 s."""
    text = str(service.get("stop_grace_period", "10s"))
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


def argv_parts(command: list[str] | str) -> list[list[str]]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part.strip().removeprefix("exec ")) for part in argv[2].split("&&")]
    return [argv]


def local(argv: list[str]) -> list[str]:
    """The container's command with this virtual environment's executables."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if (BIN / argv[0]).exists():
        return [str(BIN / argv[0]), *argv[1:]]
    return argv


def with_option(argv: list[str], name: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


@pytest.fixture
def database() -> Iterator[str]:
    if not (reachable(5432) and reachable(6379)):
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
    import psycopg

    name = f"lookalike_stack_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def broker() -> Iterator[tuple[str, str]]:
    import redis

    prefix = f"lookalike-stack-{uuid.uuid4().hex[:8]}:"
    yield f"redis://127.0.0.1:6379/{REDIS_DB}", prefix
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


class Stack:
    """The compose services as local processes; logs under `logs`."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.grace: dict[str, float] = {}

    def run(self, name: str, argv: list[str], timeout: float = 120) -> None:
        with open(self.logs / f"{name}.log", "wb") as out:
            result = subprocess.run(
                argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        assert result.returncode == 0, f"{name} failed:\n{self.tail(name)}"

    def start(self, name: str, argv: list[str], grace_s: float = 10.0) -> None:
        self.grace[name] = grace_s
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        self.processes[name] = subprocess.Popen(
            argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited:\n{self.tail(name)}"

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        late = []
        for name, process in self.processes.items():
            try:
                process.wait(timeout=self.grace[name])  # then docker would SIGKILL it
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                late.append(name)
        for name in late:
            pytest.fail(
                f"{name} did not stop within its stop_grace_period ({self.grace[name]:.0f} s) "
                f"of SIGTERM:\n{self.tail(name)}"
            )


@contextmanager
def stack(env: dict[str, str], logs: Path) -> Iterator[Stack]:
    running = Stack(env, logs)
    try:
        yield running
    finally:
        running.stop()


def wait_for(what: str, condition, timeout: float, stack: Stack, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        stack.check_alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{stack.tail(n)}" for n in stack.processes)
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(interval)


def test_compose_stack_user_journey(
    tmp_path: Path, tiny_dataset: Path, database: str, broker: tuple[str, str]
) -> None:
    broker_url, key_prefix = broker
    datasets = tiny_dataset.parent  # the dataset root; the dataset is its folder "tiny"
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    hostname = socket.gethostname()
    # The compose environment (docker-compose.yml's x-lookalike-environment), pointed at the
    # services on this machine.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LOOKALIKE_") and key not in ("HOSTNAME",)
    } | {
        "LOOKALIKE_DATA_DIR": str(tmp_path / "data"),
        "LOOKALIKE_DATASET_ROOT": str(datasets),
        "LOOKALIKE_DATABASE_URL": database,
        "LOOKALIKE_BROKER_URL": broker_url,
        "LOOKALIKE_BROKER_KEY_PREFIX": key_prefix,
        "LOOKALIKE_API_KEYS": f'["{API_KEY}"]',
        "LOOKALIKE_THREADS": "1",
        "LOOKALIKE_WORKER_NUM_WORKERS": "0",
        "HOSTNAME": hostname,  # docker sets it; the worker healthchecks use it
    }
    services = compose_services()
    prestart, server = argv_parts(services["api"]["command"])
    server = with_option(with_option(server, "--port", str(port)), "--host", "127.0.0.1")

    with stack(env, logs) as running:
        started = time.monotonic()
        # Migrations and seed first (the api container's pre-start step), then everything.
        running.run("prestart", local(prestart), timeout=300)
        running.start("api", local(server), grace_seconds(services["api"]))
        for worker in ("worker-gpu", "worker-cpu"):
            argv = argv_parts(services[worker]["command"])[0]
            running.start(worker, local(argv), grace_seconds(services[worker]))
        base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=120)

        def ready() -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the API", ready, 300, running)
        print(f"API ready after {time.monotonic() - started:.1f} s")
        # The compose healthchecks, as docker would run them (port and host adapted).
        api_check = services["api"]["healthcheck"]["test"][1:]
        api_check = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in api_check]
        running.run("healthcheck-api", local(api_check), timeout=30)
        for worker in ("worker-gpu", "worker-cpu"):
            test = services[worker]["healthcheck"]["test"][1].replace("$$", "$")

            def pong(test: str = test) -> bool:
                result = subprocess.run(
                    ["sh", "-c", test.replace("celery ", f"{BIN / 'celery'} ", 1)],
                    env=env,
                    cwd=ROOT,
                    capture_output=True,
                    timeout=60,
                )
                return result.returncode == 0

            wait_for(f"{worker}'s healthcheck", pong, 180, running, interval=1)

        # --- the user journey ---------------------------------------------------------------
        models = client.get("/api/v1/models").json()
        [builtin] = [m for m in models if m["builtin"]]
        refused = client.post("/api/v1/galleries", json={"name": "g"}, headers={"X-API-Key": ""})
        assert refused.status_code in (401, 403), refused.text
        response = client.post(
            "/api/v1/galleries", json={"name": "tiny", "model_id": builtin["id"]}
        )
        assert response.status_code == 201, response.text
        gallery = response.json()
        folder = datasets / "tiny" / "test"
        paths = sorted(folder.glob("*/*.png"))
        response = client.post(
            f"/api/v1/galleries/{gallery['id']}/images",
            files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths],
            data={"label": [p.parent.name for p in paths]},
        )
        assert response.status_code == 201, response.text
        query = paths[0]

        def search() -> dict[str, Any]:
            response = client.post(
                f"/api/v1/galleries/{gallery['id']}/search",
                files={"image": (query.name, query.read_bytes(), "image/png")},
                data={"k": "5"},
            )
            assert response.status_code == 200, response.text
            return response.json()

        first = search()
        assert len(first["results"]) == 5
        assert first["results"][0]["score"] > 0.99  # the query itself is in the gallery
        first_search_s = time.monotonic() - started

        # Train a tiny model on the gpu queue.
        response = client.post(
            "/api/v1/datasets", json={"name": "tiny", "kind": "imagefolder", "path": "tiny"}
        )
        assert response.status_code == 201, response.text
        dataset = response.json()
        response = client.post(
            "/api/v1/jobs",
            json={
                "type": "train",
                "params": {
                    "dataset_id": dataset["id"],
                    "method": "margin",
                    "model_name": "tiny-margin",
                    "hyperparameters": {
                        "weights": "none",
                        "image_size": 32,
                        "iterations": 4,
                        "batch_size": 8,
                        "samples_per_class": 2,
                        "eval_every": 0,
                    },
                },
            },
        )
        assert response.status_code == 202, response.text
        train = response.json()
        assert train["queue"] == "gpu"

        def finished(job_id: int) -> dict[str, Any] | None:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        print(f"first search after {time.monotonic() - started:.1f} s")
        train = wait_for("the training job", lambda: finished(train["id"]), 240, running)
        assert train["state"] == "succeeded", (train, running.tail("worker-gpu"))
        assert train["worker"].startswith("gpu@")
        model_id = train["result"]["model_id"]
        print(f"trained after {time.monotonic() - started:.1f} s")

        # Index the gallery with it on the cpu queue; searches keep answering meanwhile.
        response = client.post(
            "/api/v1/jobs",
            json={"type": "index", "params": {"gallery_id": gallery["id"], "model_id": model_id}},
        )
        assert response.status_code == 202, response.text
        index = response.json()
        assert index["queue"] == "cpu"
        index = wait_for("the index job", lambda: finished(index["id"]), 180, running)
        assert index["state"] == "succeeded", (index, running.tail("worker-cpu"))
        assert index["worker"].startswith("cpu@")

        assert client.get(f"/api/v1/galleries/{gallery['id']}").json()["model_id"] == model_id
        second = search()
        assert second["results"][0]["score"] > 0.99
        assert second["model_id"] == model_id != first["model_id"]
        assert second["results"][0]["image_id"] == first["results"][0]["image_id"]
        running.check_alive()
        print(f"first search answered {first_search_s:.1f} s after start")


def test_replicas_starting_together_migrate_and_seed_once(tmp_path: Path, database: str) -> None:
    """Three API containers starting at once run app.prestart together on one database and one
    shared volume: every one succeeds, the schema is at head and there is one built-in model."""
    from alembic.script import ScriptDirectory

    from app.core.config import Settings
    from app.db.migrate import alembic_config

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")} | {
        "LOOKALIKE_DATABASE_URL": database,
        "LOOKALIKE_DATA_DIR": str(tmp_path / "data"),
        "LOOKALIKE_SEED_BUILTIN_MODEL": "true",
        "LOOKALIKE_THREADS": "1",
    }
    replicas = [
        subprocess.Popen(
            [sys.executable, "-m", "app.prestart", "--wait", "30"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [replica.communicate(timeout=300)[0] for replica in replicas]
    for replica, output in zip(replicas, outputs, strict=True):
        assert replica.returncode == 0, output[-3000:]
    import psycopg

    plain_url = database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain_url) as connection:
        [(version,)] = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        [(builtins,)] = connection.execute("SELECT count(*) FROM models WHERE builtin").fetchall()
    head = ScriptDirectory.from_config(
        alembic_config(Settings(database_url=database))
    ).get_current_head()
    assert version == head
    assert builtins == 1
    assert sum("building the built-in model" in output for output in outputs) == 1  # once
