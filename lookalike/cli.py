"""`lookalike search | upload | jobs ...`: the client's commands against a running server.

The server is `--server` (default LOOKALIKE_URL, then http://127.0.0.1:8000) and the key
LOOKALIKE_API_KEY; `--json` prints the server's answer as it is, for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lookalike.client import Client, LookalikeError

Server = Annotated[
    str | None, typer.Option("--server", help="server URL; default $LOOKALIKE_URL or :8000")
]
AsJson = Annotated[bool, typer.Option("--json", help="print the server's JSON answer")]

jobs_cli = typer.Typer(help="Jobs on a lookalike server: list, show, wait, cancel.")


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


def _print(answer: Any, as_json: bool, lines: list[str]) -> None:
    typer.echo(json.dumps(answer, indent=2) if as_json else "\n".join(lines))


def search(
    image: Annotated[Path, typer.Argument(help="the query image", exists=True, dir_okay=False)],
    gallery: Annotated[str, typer.Option("--gallery", "-g", help="gallery name or id")],
    k: Annotated[int, typer.Option("-k", min=1, help="number of results")] = 10,
    label: Annotated[list[str] | None, typer.Option(help="only images with this label")] = None,
    min_score: Annotated[float | None, typer.Option(help="drop hits below this cosine")] = None,
    server: Server = None,
    as_json: AsJson = False,
) -> None:
    """The gallery images most similar to IMAGE, best first."""
    try:
        with Client(server) as client:
            found = client.search(gallery, image, k=k, labels=label, min_score=min_score)
    except (LookalikeError, OSError) as error:
        raise _fail(error) from None
    lines = [
        f"{hit['score']:.4f}  image {hit['image_id']}  {hit.get('label') or '-'}  {hit['file_url']}"
        for hit in found["results"]
    ]
    _print(found, as_json, lines or ["no results"])


def upload(
    folder: Annotated[Path, typer.Argument(help="a folder of images", file_okay=False)],
    gallery: Annotated[str, typer.Option("--gallery", "-g", help="gallery name or id")],
    create: Annotated[bool, typer.Option(help="create the gallery if it does not exist")] = False,
    model: Annotated[
        int | None, typer.Option(help="with --create: the gallery's model (default: built-in)")
    ] = None,
    labels: Annotated[bool, typer.Option(help="label images by their folder's name")] = True,
    batch_size: Annotated[int, typer.Option(min=1, max=256)] = 32,
    server: Server = None,
    as_json: AsJson = False,
) -> None:
    """Upload every image under FOLDER to a gallery, labelled by the folder holding it."""
    from tqdm import tqdm

    try:
        with Client(server) as client:
            if create and not any(g["name"] == gallery for g in client.galleries()):
                client.create_gallery(gallery, model_id=model)
            with tqdm(unit="img", disable=as_json) as bar:

                def advance(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                results = client.upload_folder(
                    gallery,
                    folder,
                    labels_from_folders=labels,
                    batch_size=batch_size,
                    on_batch=advance,
                )
    except (LookalikeError, OSError) as error:
        raise _fail(error) from None
    counts = {status: 0 for status in ("created", "duplicate", "rejected")}
    for result in results:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    rejected = [
        f"  rejected {r.get('filename')}: {r.get('error')}"
        for r in results
        if r["status"] == "rejected"
    ]
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    _print(results, as_json, [summary, *rejected])


@jobs_cli.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    server: Server = None,
    as_json: AsJson = False,
) -> None:
    """The newest jobs first."""
    try:
        with Client(server) as client:
            jobs = [job for job, _ in zip(client.jobs(state=state), range(limit), strict=False)]
    except (LookalikeError, OSError) as error:
        raise _fail(error) from None
    lines = [f"{j['id']:>5}  {j['type']:<9} {j['state']:<10} {j['progress']:.0%}" for j in jobs]
    _print(jobs, as_json, lines or ["no jobs"])


@jobs_cli.command("show")
def jobs_show(job_id: int, server: Server = None, as_json: AsJson = False) -> None:
    """One job: state, progress, error or result."""
    try:
        with Client(server) as client:
            job = client.job(job_id)
    except (LookalikeError, OSError) as error:
        raise _fail(error) from None
    _print(job, as_json, [json.dumps(job, indent=2)])


@jobs_cli.command("wait")
def jobs_wait(
    job_id: int,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    server: Server = None,
    as_json: AsJson = False,
) -> None:
    """Wait for a job to end, with its progress; exit 1 if it failed or was cancelled."""
    from lookalike.client import JobFailed

    def show(job: dict[str, Any]) -> None:
        if not as_json:
            typer.echo(f"\rjob {job['id']}: {job['state']} {job['progress']:.0%}", nl=False)

    try:
        with Client(server) as client:
            job = client.wait_job(job_id, timeout_s=timeout, on_progress=show)
    except JobFailed as failed:
        typer.echo(f"\n{failed.detail}", err=True)
        raise typer.Exit(1) from None
    except (LookalikeError, OSError, TimeoutError) as error:
        raise _fail(error) from None
    _print(job, as_json, ["", json.dumps(job.get("result"), indent=2)])


@jobs_cli.command("cancel")
def jobs_cancel(job_id: int, server: Server = None) -> None:
    """Cancel a queued or running job."""
    try:
        with Client(server) as client:
            job = client.cancel_job(job_id)
    except (LookalikeError, OSError) as error:
        raise _fail(error) from None
    typer.echo(f"job {job['id']}: {job['state']}")
