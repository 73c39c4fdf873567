"""`lookalike demo`: the whole product on one machine, in one command.

1. Build the IconThemes benchmark (cached after the first run).
2. Start the API on http://127.0.0.1:8000 with its local gpu and cpu workers (`lookalike serve`:
   SQLite, on-disk FAISS, the embedded SQLite broker; no Redis, no Postgres). Start-up registers
   the built-in pretrained model.
3. Over the REST API with the Python client (lookalike.client), as any user would: register
   the benchmark as a dataset, create the gallery `icons-test` and fill it with the test split
   (an import job), answer a search.
4. Train the best method measured on IconThemes (DVML+margin, preset dvml-icons; docs/results.md)
   on the train split (a job on the gpu queue, a few CPU minutes). The job measures the trained
   and the built-in model on the same test split (classes never seen in training); the demo
   prints both and re-indexes the gallery (an index job) only if the trained model is better.
5. Serve until Ctrl-C.

Everything is found again by name on the next run (dataset, gallery, trained model), so a second
run only starts the server. All state lives in Settings.data_dir (default ./var).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import typer

from app.core.config import Settings
from lookalike.client import Client, JobFailed, LookalikeError

DATASET = "icons"
GALLERY = "icons-test"


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived."""


class DemoError(Exception):
    """A step failed; the message says what to do."""


def wait_for(
    client: Client, job: dict[str, Any], what: str, stop: threading.Event, report_s: float = 15.0
) -> dict[str, Any]:
    """Wait for a job to end; print its progress when the state changes and at most every
    `report_s` seconds while it runs. Ctrl-C (`stop`) ends the wait."""
    last: dict[str, Any] = {"state": "", "at": 0.0}

    def report(current: dict[str, Any]) -> None:
        now = time.monotonic()
        if current["state"] != last["state"] or now - last["at"] >= report_s:
            typer.echo(f"  {what}: {progress_line(current)}")
            last.update(state=current["state"], at=now)
        if stop.is_set():
            raise Stopped

    try:
        return client.wait_job(job["id"], poll_s=2.0, on_progress=report)
    except JobFailed as failed:
        raise DemoError(
            f"{what} (job {job['id']}) {failed.job['state']}: {failed.job.get('error')}; its "
            f"log: GET /api/v1/jobs/{job['id']}/logs"
        ) from None


def progress_line(job: dict[str, Any]) -> str:
    words = [job["state"]]
    if job["state"] == "running":
        words.append(f"{100 * (job.get('progress') or 0):.0f}%")
        if job.get("epoch") is not None:
            words.append(f"epoch {job['epoch']}")
        if job.get("step") is not None and job.get("total_steps"):
            words.append(f"step {job['step']}/{job['total_steps']}")
        metrics = job.get("metrics") or {}
        if isinstance(metrics.get("phase"), str):
            words.append(metrics["phase"])
        shown = [f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)][:3]
        words += shown
        if job.get("eta"):
            words.append(f"eta {job['eta'][11:19]} UTC")
    return ", ".join(words)


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((item for item in items if item["name"] == name), None)


def show_hits(client: Client, gallery_id: int, query: Path, label: str) -> float:
    started = time.perf_counter()
    answer = client.search(gallery_id, query, k=5)
    took = time.perf_counter() - started
    hits = ", ".join(f"{h['label']} ({h['score']:.2f})" for h in answer["results"])
    typer.echo(f"  query {query.parent.name}/{query.name} with {label}: {hits}")
    return took


def run_demo(
    settings: Settings,
    benchmark: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    method: str | None = None,
    train_minutes: float = 5.0,
    train: bool = True,
) -> None:
    from app.local import serve_processes
    from training.data.benchmarks.cli import build_icons_command

    started = time.monotonic()
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous: dict[int, Any] = {}
    benchmark = benchmark.expanduser().absolute()
    root = settings.dataset_root
    if root is None:
        settings = settings.model_copy(update={"dataset_root": benchmark.parent})
    elif not benchmark.is_relative_to(root.expanduser().absolute()):
        raise DemoError(
            f"the benchmark {benchmark} is outside LOOKALIKE_DATASET_ROOT={root}; "
            "unset it or pass --data under it"
        )
    if not settings.cpu_sharers:
        # One step at a time (the API is idle while the model trains): every process may use
        # every CPU, where `lookalike serve` splits them between the API and its workers.
        settings = settings.model_copy(update={"cpu_sharers": 1})
    relative = benchmark.relative_to(settings.dataset_root.expanduser().absolute())  # type: ignore[union-attr]

    try:
        typer.echo(f"[1/5] IconThemes benchmark at {benchmark} (first build: about 3 minutes)")
        build_icons_command(benchmark)  # Ctrl-C here is safe: builds are atomic
        # From here on Ctrl-C (or SIGTERM) ends the current step and shuts everything down.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        typer.echo(f"[2/5] starting the API and its job workers (data in {settings.data_dir})")
        logs = settings.data_dir / "logs"
        with serve_processes(settings, host, port, worker_log_dir=logs) as service:
            # The demo prints what matters; one access-log line per progress poll would bury it.
            logging.getLogger("uvicorn.access").disabled = True
            client = Client(service.url, service.api_key)
            banner(service.url, service.api_key_note)
            typer.echo(f"  job logs:  {logs}/worker-gpu.log, {logs}/worker-cpu.log")
            gallery, query = fill_gallery(client, settings, relative, stop)
            model = client.model(gallery["model_id"])["name"]
            took = show_hits(client, gallery["id"], query, model)
            elapsed = time.monotonic() - started
            typer.echo(
                f"  first search answered {elapsed:.0f} s after the command started "
                f"(the search itself took {1000 * took:.0f} ms)"
            )
            example_curl(service.url, gallery["id"], query)
            if train:
                train_and_reindex(client, gallery, query, method, train_minutes, stop)
            typer.echo(f"[5/5] serving at {service.url} until Ctrl-C")
            while not stop.wait(1.0):
                for queue in service.restart_dead_workers():
                    typer.echo(f"the {queue} worker exited; started a new one", err=True)
            typer.echo("stopping (a running job gets a few seconds to end, then is failed)")
        typer.echo("stopped")
    except (Stopped, KeyboardInterrupt):
        typer.echo("stopped")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def banner(url: str, api_key_note: str) -> None:
    typer.echo(f"  API:       {url}  (interactive docs: {url}/docs)")
    if httpx.get(f"{url}/", timeout=10, follow_redirects=True).status_code == 200:
        typer.echo(f"  search page: {url}/")
    typer.echo(f"  {api_key_note}")


def fill_gallery(
    client: Client, settings: Settings, relative: Path, stop: threading.Event
) -> tuple[dict, Path]:
    """The dataset and the gallery of the test split (created and imported on the first run),
    less one held-out image: the example query, so its first hit is a real neighbour, not
    the query itself."""
    typer.echo(f"[3/5] gallery {GALLERY!r}: the benchmark's test split")
    dataset = by_name(client.datasets(), DATASET)
    if dataset is None:
        dataset = client.register_dataset(DATASET, path=str(relative))
    gallery = by_name(client.galleries(), GALLERY)
    if gallery is None:
        gallery = client.create_gallery(GALLERY)  # the built-in model
    expected = dataset["splits"]["test"]["images"]
    imports = client.jobs(job_type="import", state="succeeded")
    if not any(job["params"].get("gallery_id") == gallery["id"] for job in imports):
        params = {"gallery_id": gallery["id"], "folder": str(relative / "test")}
        job = client.submit_job("import", params)
        wait_for(client, job, f"importing {expected} images (job {job['id']})", stop)
    test = settings.dataset_root.expanduser().absolute() / relative / "test"  # type: ignore[union-attr]
    query = held_out_query(test)
    hold_out(client, gallery["id"], query)
    gallery = client.gallery(gallery["id"])
    count, model = gallery["image_count"], gallery["model_id"]
    typer.echo(
        f"  {count} images (identical files stored once; {query.parent.name}/{query.name} held "
        f"out as the example query), model {model}"
    )
    return gallery, query


def held_out_query(test: Path) -> Path:
    """The example query: the first image of the first test class (a class the demo's model
    never trained on)."""
    return sorted(sorted(path for path in test.iterdir() if path.is_dir())[0].iterdir())[0]


def hold_out(client: Client, gallery_id: int, query: Path) -> None:
    """Delete the query's image from the gallery, if it is there (found by content hash)."""
    from app.imaging import content_hash  # the digest the service stores for every image

    digest = content_hash(query.read_bytes())
    for image in client.images(gallery_id, label=query.parent.name):
        if image["content_hash"] == digest:
            client.delete_image(image["id"])


def example_curl(url: str, gallery_id: int, query: Path) -> None:
    typer.echo("  try it:")
    typer.echo(f"    curl -s -F image=@{query} -F k=5 {url}/api/v1/galleries/{gallery_id}/search")


def train_and_reindex(
    client: Client,
    gallery: dict,
    query: Path,
    method: str | None,
    minutes: float,
    stop: threading.Event,
) -> None:
    """Train (or find the model of an earlier run), compare it with the built-in model on the
    test split, and re-index the gallery with it only if it is better."""
    preset = demo_preset(method)
    name = f"icons-{preset}-demo"
    model = by_name(client.models(), name)
    if model is None:
        typer.echo(
            f"[4/5] training preset {preset} on the train split ({minutes:g} minutes, "
            "validation included; then the test split is measured)"
        )
        dataset = by_name(client.datasets(), DATASET)
        assert dataset is not None
        params: dict[str, Any] = {
            "dataset_id": dataset["id"],
            "preset": preset,
            "model_name": name,
            "hyperparameters": {"time_budget_min": minutes},
        }
        if method is not None:
            params["method"] = method
        job = client.submit_job("train", params)
        typer.echo(f"  job {job['id']}: GET /api/v1/jobs/{job['id']} (and .../logs)")
        job = wait_for(client, job, f"training (job {job['id']})", stop, report_s=30.0)
    else:
        typer.echo(f"[4/5] trained model {name!r} exists (model {model['id']})")
        job = train_job_of(client, model["id"])
    result = job["result"]
    better = show_comparison(result)
    model_id = result["model_id"]
    if not better:
        typer.echo("  the gallery keeps its model: the trained one is not clearly better")
    elif gallery["model_id"] != model_id:
        typer.echo(f"  the trained model is better: re-indexing the gallery with {name}")
        job = client.submit_job("index", {"gallery_id": gallery["id"], "model_id": model_id})
        wait_for(client, job, f"re-indexing with {name} (job {job['id']})", stop)
        show_hits(client, gallery["id"], query, name)
    else:
        typer.echo(f"  the gallery already uses the trained model {name}")


def demo_preset(method: str | None) -> str:
    """The training preset: the one recommended for IconThemes (the best method measured on
    it), or for a chosen method its IconThemes preset if it has one, else the base `icons`."""
    from training.config import RECOMMENDED_PRESETS, list_presets

    if method is None:
        return RECOMMENDED_PRESETS["IconThemes"]
    return f"{method}-icons" if f"{method}-icons" in list_presets() else "icons"


# A re-index needs the trained model to win by more than noise: one standard error of
# Recall@1 on IconThemes' 2,031 test queries is sqrt(0.35 * 0.65 / 2031) = 0.011.
MIN_RECALL_GAIN = 0.01


def train_job_of(client: Client, model_id: int) -> dict[str, Any]:
    jobs = client.jobs(job_type="train", state="succeeded")
    job = next((j for j in jobs if (j.get("result") or {}).get("model_id") == model_id), None)
    if job is None:
        raise DemoError(f"no succeeded train job produced model {model_id}; delete the model")
    return job


def show_comparison(result: dict[str, Any]) -> bool:
    """Print the trained and the baseline (built-in) model's test metrics side by side; True
    when the trained model's Recall@1 is higher by at least MIN_RECALL_GAIN, or when there was
    nothing to compare with."""
    baseline, trained = result["baseline"], result["metrics"]["test"]
    typer.echo(
        f"  test split (classes never seen in training), {result['epochs']} epochs "
        f"({result['iterations']} steps) trained:"
    )
    if baseline is None:
        typer.echo(f"    {result['model_name']}: Recall@1 {trained['recall@1']:.3f} (no baseline)")
        return True
    kind = "built-in" if baseline["builtin"] else "baseline"
    typer.echo(f"    {'model':<44} {'Recall@1':>9} {'MAP@R':>7}")
    for label, metrics in (
        (f"{baseline['model_name']} ({kind})", baseline["metrics"]),
        (f"{result['model_name']} (trained)", trained),
    ):
        typer.echo(f"    {label:<44} {metrics['recall@1']:>9.3f} {metrics['map@r']:>7.3f}")
    gain = result["gain_over_baseline"]
    typer.echo(f"    {'trained - ' + kind:<44} {gain['recall@1']:>+9.3f} {gain['map@r']:>+7.3f}")
    if 0 < gain["recall@1"] < MIN_RECALL_GAIN:
        typer.echo(
            f"  a gain under {MIN_RECALL_GAIN:.3f} Recall@1 is within the test split's noise "
            "(about one standard error): not counted as better"
        )
    return gain["recall@1"] >= MIN_RECALL_GAIN


def demo_command(
    settings: Settings,
    data: Path,
    host: str,
    port: int,
    method: str | None,
    train_minutes: float,
    train: bool,
) -> None:
    try:
        run_demo(
            settings,
            data,
            host=host,
            port=port,
            method=method,
            train_minutes=train_minutes,
            train=train,
        )
    except (DemoError, LookalikeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
