"""The job bodies. Each Celery task only carries a job id; `runner.execute` claims the row and
records the outcome, the body does the work and returns the job's result.

The per-process `Runtime` (DB engine, embedder and index caches) is built by the first task,
never at import or in the prefork parent, and models load in the first job that needs them:
CUDA must not be initialised before a fork (importing torch does not; loading a model on the
GPU does), and Celery kills `worker_process_init` handlers that block for more than 4 s
(Celery docs, userguide/signals.rst).
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import tarfile
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.signals import task_failure, worker_process_shutdown, worker_ready, worker_shutdown
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Model
from app.db.models.jobs import DatasetKind
from app.db.session import make_engine, make_session_factory
from app.services.errors import Conflict, Invalid
from app.services.jobs import (
    ARCHIVE_FILE,
    DatasetParams,
    EvaluateParams,
    ImportParams,
    IndexParams,
    TrainParams,
    fail_job,
    fail_worker_jobs,
    folder_under_root,
    job_dir,
    ready_dataset,
    train_config,
)
from app.services.runtime import Runtime
from app.worker.runner import JobRun, execute
from training.data.readers import is_image_file

log = logging.getLogger(__name__)

IMPORT_BATCH = 32  # files decoded and embedded together by an import job
IMPORT_BATCHES_IN_FLIGHT = 2  # one decoding while the other embeds
SWITCH_ATTEMPTS = 5  # an index job re-embeds late uploads this many times before giving up

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime(settings: Settings) -> Runtime:
    """This worker process's Runtime, built on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            # Sizes torch's pools for this thread too: training and evaluation run in it.
            _runtime = Runtime.start(settings)
        return _runtime


def _run(task: Task, job_id: int, body: Callable[[JobRun], dict[str, Any]]) -> None:
    settings: Settings = task.app.settings
    execute(runtime(settings), job_id, task.request.hostname or "worker", body)


# ---------------------------------------------------------------------- train
@shared_task(name="lookalike.train", bind=True)
def train(self: Task, job_id: int) -> None:
    _run(self, job_id, train_body)


def training_reporter(run: JobRun) -> Callable[[dict[str, Any]], None]:
    """The trainer's `on_progress` for a job. The trainer's progress and ETA cover the whole
    run (queue fill, training, validation, final evaluation) and go to the row as they are; the
    phase and how far it is go into the metrics, beside the latest loss and validation scores,
    which stay shown while a phase that has none runs."""
    trainer_keys = {"epoch", "iteration", "total_iterations", "progress", "elapsed_s", "eta_s"}
    latest: dict[str, Any] = {}

    def on_progress(info: dict[str, Any]) -> None:
        latest.update({k: v for k, v in info.items() if k not in trainer_keys})
        latest["phase_done"], latest["phase_total"] = latest.pop("done"), latest.pop("total")
        run.report(
            progress=info["progress"],
            eta_s=info["eta_s"],
            epoch=info["epoch"],
            step=info["iteration"],
            total_steps=info["total_iterations"],
            metrics=dict(latest),
            force=True,
        )

    return on_progress


def train_body(run: JobRun) -> dict[str, Any]:
    from app.services.models import artifact_dir, register_artifact
    from training.engine.trainer import Trainer, TrainingStopped

    params = TrainParams.model_validate(run.job.params)
    with run.session() as session:
        dataset = ready_dataset(session, params.dataset_id)
        baseline = baseline_model(session, params.baseline_model_id)
    cfg = train_config(run.settings, params, dataset, out=run.dir / "run")
    if baseline is not None:  # measured on the same test images in the final evaluation
        cfg.baseline = artifact_dir(run.settings, baseline)
    trainer = Trainer(
        cfg, on_progress=training_reporter(run), should_stop=run.should_stop, progress_bar=False
    )
    run.report(progress=0.0, epoch=0, step=0, total_steps=trainer.total_iterations, force=True)
    try:
        results = trainer.fit()
    except TrainingStopped:
        run.check()
        raise
    run.check()  # a cancel that came during the final evaluation: register nothing
    name = params.model_name or f"{cfg.method}-job{run.id}"
    with run.session() as session:
        model = register_artifact(session, run.settings, trainer.out / "best", name)
    best = results["best"]
    run.report(metrics={"val": best.get("val"), "test": best.get("test")}, force=True)
    return {
        "model_id": model.id,
        "model_name": model.name,
        "method": cfg.method,
        "preset": cfg.preset,
        "metrics": best,
        "last": results["last"],
        "baseline": None
        if baseline is None
        else {
            "model_id": baseline.id,
            "model_name": baseline.name,
            "builtin": baseline.builtin,
            "split": "test",
            "metrics": results["baseline"]["test"],
        },
        "gain_over_baseline": results.get("gain_over_baseline"),
        "selected_by": results["selected_by"],
        "iterations": results["iterations"],
        "epochs": results["epochs"],
        "run_dir": str(trainer.out),
    }


def baseline_model(session: Session, model_id: int | None) -> Model | None:
    """What a train job compares its model with on the test split, so the job, the report and
    the demo can say whether training helped (on IconThemes a short run can end below the
    untrained ImageNet features): `model_id`, else the built-in model, if there is one."""
    from app.services.models import builtin_model, get_model

    return builtin_model(session) if model_id is None else get_model(session, model_id)


# ---------------------------------------------------------------------- evaluate
@shared_task(name="lookalike.evaluate", bind=True)
def evaluate(self: Task, job_id: int) -> None:
    _run(self, job_id, evaluate_body)


def evaluate_body(run: JobRun) -> dict[str, Any]:
    from app.services.models import artifact_dir, get_model
    from training.data.image_dataset import drop_unreadable
    from training.data.readers import load_dataset
    from training.engine.trainer import resolve_device
    from training.evaluation.embed import embed_split_with_artifact
    from training.evaluation.metrics import evaluate_embeddings

    params = EvaluateParams.model_validate(run.job.params)
    with run.session() as session:
        model = get_model(session, params.model_id)
        dataset = ready_dataset(session, params.dataset_id)
    split = getattr(load_dataset(dataset.spec), params.split)
    if params.max_classes:
        split = split.select_classes(split.class_names[: params.max_classes])
    split, skipped = drop_unreadable(split)
    run.report(progress=0.05, force=True)
    run.check()
    embeddings, labels = embed_split_with_artifact(
        artifact_dir(run.settings, model),
        split,
        device=resolve_device(run.settings.worker_device),
        num_workers=run.settings.worker_num_workers,
    )
    run.report(progress=0.8, force=True)
    run.check()
    metrics = evaluate_embeddings(embeddings, labels)
    run.report(metrics=metrics, force=True)
    return {
        "model_id": model.id,
        "dataset_id": dataset.id,
        "split": params.split,
        "classes": split.num_classes,
        "images": len(split),
        "skipped_unreadable": len(skipped),
        "metrics": metrics,
    }


# ---------------------------------------------------------------------- index
@shared_task(name="lookalike.index", bind=True)
def index(self: Task, job_id: int) -> None:
    _run(self, job_id, index_body)


def index_body(run: JobRun) -> dict[str, Any]:
    """Embed every image of the gallery with the model, then switch the gallery to a new index
    version in one transaction; searches use the old index until that commit."""
    from app.services.galleries import switch_index
    from app.services.images import embed_missing

    params = IndexParams.model_validate(run.job.params)

    def progress(done: int, total: int) -> None:
        run.report(progress=0.9 * done / max(total, 1), step=done, total_steps=total)
        run.check()

    embedded = 0
    with run.session() as session:
        for _ in range(SWITCH_ATTEMPTS):
            embedded += embed_missing(
                run.runtime, session, params.gallery_id, params.model_id, progress=progress
            )
            run.check()
            try:
                gallery = switch_index(
                    run.runtime,
                    session,
                    params.gallery_id,
                    model_id=params.model_id,
                    index_type=params.index_type,
                )
                break
            except Conflict as error:  # uploads arrived meanwhile: embed those too
                log.info("job %d: %s; embedding the rest", run.id, error.message)
        else:
            raise Conflict(
                f"gallery {params.gallery_id} kept receiving images faster than they could be "
                f"embedded ({SWITCH_ATTEMPTS} attempts); run the index job again"
            )
        return {
            "gallery_id": gallery.id,
            "model_id": gallery.model_id,
            "index_type": gallery.index_type,
            "index_version": gallery.index_version,
            "embedded": embedded,
        }


# ---------------------------------------------------------------------- import
@shared_task(name="lookalike.import", bind=True)
def import_images(self: Task, job_id: int) -> None:
    _run(self, job_id, import_body)


class _BudgetExceeded(Exception):
    """The import read past `import_max_bytes` (raised by `_CountingReader`)."""


class _Budget:
    """Import limits: files, and every decompressed byte (archive bombs), per job."""

    def __init__(self, settings: Settings) -> None:
        self.files_left = settings.import_max_files
        self.bytes_left = settings.import_max_bytes
        self.max_bytes = settings.import_max_bytes
        self.per_file = settings.max_upload_bytes
        self.stopped: str | None = None

    def take_file(self) -> bool:
        if self.files_left <= 0:
            self.stopped = "stopped at the import_max_files limit"
            return False
        self.files_left -= 1
        return True

    def consume(self, size: int) -> None:
        self.bytes_left -= size
        if self.bytes_left < 0:
            self.bytes_left = 0
            self.stopped = (
                f"stopped at the import_max_bytes limit: more than {self.max_bytes:,} bytes "
                "decompressed (members skipped or not)"
            )
            raise _BudgetExceeded(self.stopped)

    def read(self, handle: IO[bytes], *, counted: bool = False) -> bytes | str:
        """The file's bytes, or why it was refused; never reads more than the limits allow.
        `counted`: the handle's bytes already count (a tar stream read through
        `_CountingReader`)."""
        limit = self.per_file if counted else min(self.per_file, self.bytes_left)
        data = handle.read(limit + 1)
        if len(data) > limit:
            if limit < self.per_file:
                self.stopped = "stopped at the import_max_bytes limit"
                self.bytes_left = 0
                return "not read: the import's total size limit was reached"
            return f"larger than the {self.per_file:,}-byte limit per image"
        if not counted:
            self.bytes_left -= len(data)
        return data


class _CountingReader(io.RawIOBase):
    """A decompressed stream that charges every byte read, skipped members included, to the
    import's budget: a small archive that inflates to gigabytes stops at the budget."""

    def __init__(self, stream: IO[bytes], budget: _Budget) -> None:
        self.stream = stream
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = self.stream.read(len(buffer))
        self.budget.consume(len(data))
        buffer[: len(data)] = data
        return len(data)


def _readable_text(name: str) -> str:
    """A member name as text that every database and JSON encoder accepts: names that are not
    valid UTF-8 (tar keeps their bytes as surrogate escapes) get U+FFFD where bytes were bad."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "")


def _label(name: PurePosixPath, by_folder: bool) -> str | None:
    """The name of the folder holding the file (None at the top level or when not asked)."""
    folder = name.parent.name
    return folder if by_folder and folder not in ("", ".", "..") else None


def _folder_files(
    settings: Settings, params: ImportParams, budget: _Budget
) -> tuple[int, Iterator[tuple[str, str | None, bytes | str]]]:
    """(how many image files, the files) of a folder under the dataset root."""
    root = folder_under_root(settings, ".")
    folder = folder_under_root(settings, params.folder or "")
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and is_image_file(p)]

    def files() -> Iterator[tuple[str, str | None, bytes | str]]:
        for path in paths:
            if not budget.take_file():
                return
            relative = PurePosixPath(_readable_text(path.relative_to(folder).as_posix()))
            label = _label(relative, params.label_from_folder)
            if not path.resolve().is_relative_to(root):
                yield str(relative), label, "a link leading out of the dataset root"
                continue
            with open(path, "rb") as handle:
                yield str(relative), label, budget.read(handle)
            if budget.stopped:
                return

    return len(paths), files()


def _archive_files(
    archive: Path, params: ImportParams, budget: _Budget
) -> tuple[int | None, Iterator[tuple[str, str | None, bytes | str]]]:
    """(how many image members, if known without reading it all, the members) of a zip or tar
    archive. Member names are only reported and used as labels, never as paths, so `../` or
    absolute names cannot write anywhere; links, devices and folders are skipped; every read
    is capped (a bomb's declared sizes are not trusted), and a tar's whole decompressed stream
    counts toward the import's byte budget."""
    total = None
    is_zip = zipfile.is_zipfile(archive)
    if is_zip:
        with _open_zip(archive) as bundle:
            names = [PurePosixPath(i.filename).name for i in bundle.infolist() if not i.is_dir()]
        total = sum(is_image_file(Path(name)) for name in names)

    def files() -> Iterator[tuple[str, str | None, bytes | str]]:
        members = _zip_members(archive) if is_zip else _tar_members(archive, budget)
        try:
            for raw_name, handle in members:
                name = _readable_text(raw_name)
                path = PurePosixPath(name)
                if not is_image_file(Path(path.name)):
                    continue
                if not budget.take_file():
                    return
                try:
                    data = (
                        handle
                        if isinstance(handle, str)
                        else budget.read(handle, counted=not is_zip)
                    )
                except (
                    zipfile.BadZipFile,
                    tarfile.TarError,
                    RuntimeError,
                    OSError,
                    EOFError,
                ) as error:
                    data = f"unreadable archive member: {error}"
                yield name, _label(path, params.label_from_folder), data
                if budget.stopped:
                    return
        except _BudgetExceeded:
            return
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as error:
            budget.stopped = f"stopped: the rest of the archive cannot be read ({error})"

    return total, files()


def _open_zip(archive: Path) -> zipfile.ZipFile:
    """zipfile decodes every name when it opens the archive, strictly when the archive says
    they are UTF-8: such an archive that lies cannot be read member by member."""
    try:
        return zipfile.ZipFile(archive)
    except UnicodeDecodeError as error:
        raise Invalid(
            f"the zip archive flags its member names as UTF-8 but one is not ({error.reason}); "
            "re-create it, or upload a tar archive"
        ) from None


def _zip_members(archive: Path) -> Iterator[tuple[str, IO[bytes] | str]]:
    with _open_zip(archive) as bundle:
        for info in bundle.infolist():
            if info.is_dir():
                continue
            try:
                handle = bundle.open(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as error:
                yield info.filename, f"unreadable archive member: {error}"  # e.g. encrypted
                continue
            with handle:
                yield info.filename, handle


# Compressed tar formats by their first bytes, and the module that decompresses each.
_DECOMPRESSORS: tuple[tuple[bytes, Any], ...] = (
    (b"\x1f\x8b", gzip),
    (b"BZh", bz2),
    (b"\xfd7zXZ\x00", lzma),
)


def _tar_members(archive: Path, budget: _Budget) -> Iterator[tuple[str, IO[bytes] | str]]:
    """A tar's members in stream mode over the decompressed bytes, each one counted."""
    with open(archive, "rb") as head:
        magic = head.read(6)
    module = next((m for prefix, m in _DECOMPRESSORS if magic.startswith(prefix)), None)
    with (
        module.open(archive, "rb") if module else open(archive, "rb") as raw,
        io.BufferedReader(_CountingReader(raw, budget), 1024 * 1024) as counted,
        tarfile.open(fileobj=counted, mode="r|") as bundle,
    ):
        for member in bundle:
            handle = bundle.extractfile(member) if member.isfile() else None
            if handle is not None:
                yield member.name, handle
            bundle.members = []  # tarfile keeps every header it read: millions of tiny members


def import_body(run: JobRun) -> dict[str, Any]:
    params = ImportParams.model_validate(run.job.params)
    budget = _Budget(run.settings)
    if not params.archive:
        return _import_files(run, params, budget, *_folder_files(run.settings, params, budget))
    archive = job_dir(run.settings, run.id) / ARCHIVE_FILE
    try:
        return _import_files(run, params, budget, *_archive_files(archive, params, budget))
    finally:  # whatever the outcome (done, failed, cancelled): the upload is not kept
        archive.unlink(missing_ok=True)


def _import_files(
    run: JobRun,
    params: ImportParams,
    budget: _Budget,
    total: int | None,
    files: Iterator[tuple[str, str | None, bytes | str]],
) -> dict[str, Any]:
    """Add `files` (name, label, bytes or why it was refused) in batches; the job's result."""
    from app.services.images import Upload, UploadResult, add_images

    total = None if total is None else min(total, run.settings.import_max_files)
    run.report(progress=0.0, step=0, total_steps=total, force=True)
    entries: list[dict[str, Any]] = []
    batch: list[tuple[str, str | None, bytes]] = []

    def add(files: list[tuple[str, str | None, bytes]]) -> list[UploadResult]:
        uploads = [Upload(data=data, filename=name, label=label) for name, label, data in files]
        with run.session() as session:
            return add_images(run.runtime, session, params.gallery_id, uploads)

    def record(results: list[UploadResult]) -> None:
        for result in results:
            status = "rejected" if result.error else "duplicate" if result.duplicate else "added"
            entries.append(
                {
                    "name": result.filename,
                    "status": status,
                    "image_id": result.image.id if result.image else None,
                    "error": result.error,
                }
            )
        run.report(
            progress=len(entries) / total if total else None,
            step=len(entries),
            metrics=_counts(entries),
        )
        run.check()

    # Two batches in flight: one decodes and preprocesses while the other's forward pass runs
    # (the embedder batches both callers' images). Results are recorded in batch order.
    in_flight: deque[Future[list[UploadResult]]] = deque()
    prefix = f"import-{run.id}"
    with ThreadPoolExecutor(IMPORT_BATCHES_IN_FLIGHT, thread_name_prefix=prefix) as pool:
        try:
            for name, label, data in files:
                if isinstance(data, str):
                    entries.append(
                        {"name": name, "status": "rejected", "image_id": None, "error": data}
                    )
                    continue
                batch.append((name, label, data))
                if len(batch) >= IMPORT_BATCH:
                    in_flight.append(pool.submit(add, list(batch)))
                    batch.clear()
                    if len(in_flight) >= IMPORT_BATCHES_IN_FLIGHT:
                        record(in_flight.popleft().result())
            if batch:
                in_flight.append(pool.submit(add, list(batch)))
            while in_flight:
                record(in_flight.popleft().result())
        finally:
            # Cancelled or failed: leaving the pool waits for the batch still running, which
            # commits its images, so a cancelled import stops within two batches (64 files).
            for pending in in_flight:
                pending.cancel()
    return {
        "gallery_id": params.gallery_id,
        **_counts(entries),
        "stopped": budget.stopped,
        "files": entries,
    }


def _counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"added": 0, "duplicate": 0, "rejected": 0}
    for entry in entries:
        counts[entry["status"]] += 1
    return counts


# ---------------------------------------------------------------------- dataset builds
@shared_task(name="lookalike.dataset", bind=True)
def build_dataset(self: Task, job_id: int) -> None:
    _run(self, job_id, dataset_body)


def dataset_body(run: JobRun) -> dict[str, Any]:
    """Build the icons or cjk benchmark (Debian packages -> ImageFolder), then record its
    summary, which makes the dataset ready. A build cannot be interrupted half-way."""
    from app.services.datasets import summarize
    from training.data.benchmarks.cjk import build_cjk
    from training.data.benchmarks.icons import build_icons

    params = DatasetParams.model_validate(run.job.params)
    with run.session() as session:
        dataset = session.get_one(Dataset, params.dataset_id)
        kind, out = dataset.kind, Path(dataset.path)
    if kind == DatasetKind.icons:
        build_icons(out, size=params.size, progress=False)
    else:
        build_cjk(out, size=params.size, max_classes=params.max_classes, progress=False)
    run.check()
    summary = summarize(f"imagefolder:{out}")
    with run.session() as session:
        session.get_one(Dataset, params.dataset_id).summary = summary
        session.commit()
    return {"dataset_id": params.dataset_id, "summary": summary}


# ---------------------------------------------------------------------- worker signals
@contextmanager
def _parent_session(settings: Settings) -> Iterator[Session]:
    """A session for the worker's main process, on an engine of its own: the cached Runtime
    belongs to the process running tasks, and a prefork child must not inherit an engine."""
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


@worker_ready.connect
def _fail_jobs_of_previous_run(sender, **_: Any) -> None:
    """Jobs still `running` under this node name belonged to its previous process, which died
    (SIGKILL, OOM, power): fail them now rather than after the heartbeat timeout."""
    with _parent_session(sender.app.settings) as session:
        failed = fail_worker_jobs(
            session,
            sender.hostname,
            f"worker {sender.hostname} restarted while running this job (the previous worker "
            "process died). The job was not retried; submit it again",
        )
    if failed:
        log.warning("marked %d jobs of the previous %s failed", failed, sender.hostname)


@task_failure.connect
def _fail_job_of_lost_child(sender=None, exception=None, args=None, **_: Any) -> None:
    """A prefork child killed mid-job (SIGKILL, OOM): the parent learns it at once."""
    if not isinstance(exception, WorkerLostError) or not args:
        return
    with _parent_session(sender.app.settings) as session:
        fail_job(
            session,
            int(args[0]),
            f"the worker process running this job died ({exception}). The job was not "
            "retried; submit it again",
        )


@worker_process_shutdown.connect
@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
