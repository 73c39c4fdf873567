"""Processes of a service on one machine: the API (uvicorn in a thread of this process), one
local Celery worker process per queue, and a Milvus Lite server when the milvus index backend
keeps its data in a local file. `lookalike serve` and `lookalike demo` run them; the tests that
need a live server too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.core.config import Settings
from training import threads

WORKER_STOP_GRACE_S = 10.0  # a job that ends within this after Ctrl-C still finishes


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these Settings."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
        env[f"LOOKALIKE_{name.upper()}"] = text
    return env


def worker_command(queues: list[str], loglevel: str = "info") -> list[str]:
    """The `lookalike worker` command line for a local worker on `queues` (solo pool)."""
    return [
        sys.executable,
        "-m",
        "app.cli",
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        "solo",
        "--loglevel",
        loglevel,
    ]


@dataclass
class LocalService:
    """The API (uvicorn in a thread of this process) and one local worker process per queue."""

    settings: Settings
    url: str
    api_key: str | None
    api_key_note: str  # what to print about the key (the key itself only when just created)
    log_dir: Path | None = None  # workers write here (worker-<queue>.log), else to our stdout
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log_path(self, queue: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"worker-{queue}.log"

    def start_worker(self, queue: str) -> None:
        env = {**os.environ, **settings_env(self.settings)}
        log_path = self.log_path(queue)
        if log_path is None:
            self.workers[queue] = subprocess.Popen(worker_command([queue]), env=env)
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.workers[queue] = subprocess.Popen(
                worker_command([queue]), env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def restart_dead_workers(self) -> list[str]:
        """Start a fresh worker for each one that exited (its jobs are failed on start-up)."""
        dead = [queue for queue, process in self.workers.items() if process.poll() is not None]
        for queue in dead:
            self.start_worker(queue)
        return dead

    def stop_workers(self) -> None:
        """Warm shutdown (SIGTERM) with a grace period, then SIGKILL; jobs cut short are marked
        failed at once, with the reason."""
        from celery.utils.nodenames import host_format

        from app.db.session import make_engine, make_session_factory
        from app.services.jobs.lifecycle import fail_worker_jobs

        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE_S
        for process in self.workers.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        engine = make_engine(self.settings)
        try:
            with make_session_factory(engine)() as session:
                for queue in self.workers:
                    fail_worker_jobs(
                        session,
                        host_format(worker_node_name([queue])),
                        "the server was stopped while this job ran; submit it again",
                    )
        finally:
            engine.dispose()


def worker_node_name(queues: list[str]) -> str:
    return f"{'-'.join(queues)}@%h"


@contextmanager
def serve_processes(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: bool = True,
    worker_log_dir: Path | None = None,
) -> Iterator[LocalService]:
    """Run the API and (unless `workers` is false) a gpu and a cpu worker process until the
    block ends; the API is answering when the block starts. Workers log to our stdout, or to
    `worker_log_dir`/worker-<queue>.log. Used by `serve` and `demo`."""
    import uvicorn

    from app.db.migrate import upgrade
    from app.main import api_key_file, create_app, describe_api_key, with_api_key
    from app.services.jobs.base import CPU_QUEUE, GPU_QUEUE
    from app.services.runtime import keep_files_private

    queues = (GPU_QUEUE, CPU_QUEUE) if workers else ()
    milvus_server = None
    if queues and settings.index_backend == "milvus" and "://" not in settings.milvus_location:
        # Milvus Lite data is opened by one process: the API and the workers share one local
        # Milvus Lite server instead.
        milvus_server, uri = start_milvus_lite(Path(settings.milvus_location))
        settings = settings.model_copy(update={"milvus_uri": uri})
    if not settings.cpu_sharers:  # the API and each worker get their share of the CPUs
        settings = settings.model_copy(update={"cpu_sharers": 1 + len(queues)})
    # This process loads torch and faiss below, the workers at their start: both with the
    # shared policy's pool sizes (the ones set when `app` was imported assumed no sharing).
    os.environ.update(threads.pool_environment(settings.thread_policy()))
    keep_files_private()  # the database, the key, worker logs: owner-only from the start
    upgrade(settings)  # before the workers, which need the schema too
    existed = api_key_file(settings).is_file()
    keyed = with_api_key(settings, announce=False)
    created = keyed.api_keys[0] if not existed and api_key_file(settings).is_file() else None
    service = LocalService(
        settings,
        f"http://{host}:{port}",
        keyed.api_keys[0] if keyed.api_keys else None,
        describe_api_key(keyed, created=created),
        worker_log_dir,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    try:
        for queue in queues:
            service.start_worker(queue)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the API did not start on {host}:{port}; see the log above")
            time.sleep(0.1)
        yield service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.stop_workers()
        if milvus_server is not None:
            milvus_server.terminate()
            milvus_server.wait(timeout=30)


def start_milvus_lite(
    data_dir: Path, port: int | None = None, start_timeout_s: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """A Milvus Lite gRPC server over `data_dir` on a loopback port (default: a free one), and
    its URI, once it accepts connections."""
    import socket

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Milvus Lite server over {data_dir} exited at start")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the Milvus Lite server over {data_dir} did not start")
