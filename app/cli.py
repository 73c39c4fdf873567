"""`lookalike`: the training commands (training.cli) plus the service commands (serve, worker,
demo). `training` stays importable and usable without the service."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from app.core.config import get_settings
from app.local import serve_processes, worker_node_name
from lookalike import cli as client_cli
from training.cli import app as cli

# The client's commands, against a running server (lookalike/cli.py).
cli.command()(client_cli.search)
cli.command()(client_cli.upload)
cli.add_typer(client_cli.jobs_cli, name="jobs")


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
    from app.services.jobs.base import GPU_QUEUE
    from app.services.jobs.registry import QUEUES
    from app.worker.celery_app import celery_app

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
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
