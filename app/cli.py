"""`lookalike`: the training commands (training.cli) plus the service commands (serve, worker,
demo). `training` stays importable and usable without the service."""

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
from typing import Annotated

import typer

from app.core.config import Settings, get_settings
from training import threads
from training.cli import app as cli

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
        from app.services.jobs import fail_worker_jobs

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
    from app.services.runtime import keep_files_private
    from app.worker.celery_app import CPU_QUEUE, GPU_QUEUE

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


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[
        bool, typer.Option(help="also run local job workers (gpu and cpu queue)")
    ] = True,
) -> None:
    """Run the API and local job workers on the configured broker (by default an SQLite file
    in the data directory: no Redis needed) until Ctrl-C or SIGTERM."""
    from app.prestart import redacted

    settings = get_settings()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with serve_processes(settings, host, port, workers=workers) as service:
        typer.echo(f"lookalike API at {service.url} (docs: {service.url}/docs)")
        typer.echo(service.api_key_note)
        if workers:
            typer.echo(f"job workers: gpu and cpu queues on {redacted(settings.broker_url)}")
        while not stop.wait(1.0):
            for queue in service.restart_dead_workers():
                typer.echo(f"the {queue} worker exited; started a new one", err=True)
        typer.echo("stopping")


index_cli = typer.Typer(help="The service's gallery indexes.", no_args_is_help=True)
cli.add_typer(index_cli, name="index")


@index_cli.command("reconcile")
def index_reconcile(
    gallery: Annotated[
        int | None, typer.Option(min=1, help="one gallery (default: every gallery)")
    ] = None,
) -> None:
    """Make the index backend agree with the database (the source of truth): ids it lacks are
    inserted from the stored embeddings, ids it has and the database lost are deleted, a
    missing active version is rebuilt. Safe while the API runs."""
    from sqlalchemy import select

    from app.db.migrate import upgrade
    from app.db.models import Gallery
    from app.services.runtime import Runtime

    settings = get_settings()
    upgrade(settings)
    runtime = Runtime.start(settings)
    failed = 0
    try:
        with runtime.session_factory() as session:
            ids = (
                [gallery]
                if gallery
                else list(session.scalars(select(Gallery.id).order_by(Gallery.id)))
            )
        for gallery_id in ids:
            try:
                report = runtime.indexes.reconcile(gallery_id)
            except Exception as error:  # one gallery's failure does not stop the others
                failed += 1
                typer.echo(f"gallery {gallery_id}: failed: {error}", err=True)
                continue
            if report is None:
                typer.echo(f"gallery {gallery_id}: no such gallery", err=True)
                failed += 1
                continue
            typer.echo(json.dumps({"backend": runtime.indexes.name, **report.as_dict()}))
    finally:
        runtime.close()
    if failed:
        raise typer.Exit(1)


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: gpu, cpu")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(min=1, help="jobs at a time (prefork)")] = 1,
    pool: Annotated[
        str | None, typer.Option(help="solo, prefork or threads; default solo with gpu")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    hostname: Annotated[
        str | None, typer.Option(help="node name; default <queues>@<host>, e.g. gpu@host")
    ] = None,
) -> None:
    """Run a Celery worker for deployment: `--queues gpu` (one training at a time, solo pool:
    CUDA and data-loader processes work) and `--queues cpu` for index and import jobs."""
    from app.worker.celery_app import CPU_QUEUE, GPU_QUEUE, celery_app

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - {GPU_QUEUE, CPU_QUEUE})
    if not chosen or unknown:
        raise typer.BadParameter(f"queues must be gpu and/or cpu, got {queues!r}")
    pool = pool or ("solo" if GPU_QUEUE in chosen else "prefork")
    if pool not in ("solo", "prefork", "threads"):
        raise typer.BadParameter(f"pool must be solo, prefork or threads, got {pool!r}")
    if pool == "solo" and concurrency != 1:
        raise typer.BadParameter("the solo pool runs one job at a time: use --concurrency 1")
    celery_app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(chosen),
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--loglevel",
            loglevel,
            "--hostname",
            hostname or worker_node_name(chosen),
            # Remote-control broadcasts need a fanout exchange, which the SQLAlchemy transport
            # of the embedded default lacks; nothing here uses mingle or gossip.
            "--without-mingle",
            "--without-gossip",
        ]
    )


@cli.command()
def demo(
    data: Annotated[
        Path, typer.Option(help="where the IconThemes benchmark is (built there if missing)")
    ] = Path("data/icons"),
    train_minutes: Annotated[
        float,
        typer.Option(min=0.1, help="time budget of the demo's training job (validation included)"),
    ] = 5.0,
    method: Annotated[
        str | None,
        typer.Option(
            help="training method of the demo's job (margin, triplet, contrastive, npair, "
            "diva, dvml, magnet); default: the best measured on IconThemes, DVML+margin "
            "(preset dvml-icons)"
        ),
    ] = None,
    train: Annotated[bool, typer.Option(help="train and re-index (else search only)")] = True,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
) -> None:
    """The whole product on this machine: IconThemes, the API with its workers on
    http://127.0.0.1:8000, a gallery of the test split, a training job on the train split,
    the trained and the built-in model compared on the test split, and the gallery re-indexed
    with the trained model if it is better by more than noise (0.01 Recall@1). A second run
    reuses all of it. Ctrl-C stops."""
    from app.demo import demo_command

    demo_command(get_settings(), data, host, port, method, train_minutes, train)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
