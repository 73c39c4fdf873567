"""Jobs: validated and recorded by the API, queued on Celery, run by the workers.

Everything a job could fail on at once (unknown dataset, model or gallery, bad hyperparameters,
a folder outside the data root, a second index job for the same gallery) is checked here,
before anything is queued, and answered with a 4xx. The `jobs` row is written first; the
Celery message only carries its id. If the broker cannot take the message the row is removed
again and the client gets a 503, so nothing waits forever in `queued`.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Job
from app.db.models.jobs import ACTIVE_STATES, JobState, JobType
from app.index_store import IndexType
from app.services.errors import Conflict, Invalid, NotFound, ServiceError, TooLarge
from app.services.galleries import get_gallery
from app.services.models import get_model
from app.worker.celery_app import QUEUE_OF_TYPE, make_celery, task_name

log = logging.getLogger(__name__)

ARCHIVE_FILE = "upload.archive"
LOG_FILE = "job.log"
# Training options the service sets itself; a client gives `method` and `preset` as fields.
RESERVED_HYPERPARAMETERS = {"data", "out", "device", "preset", "method"}
SERVER_WEIGHTS = ("imagenet", "none")  # never a server-side file path from a client


class BrokerUnavailable(ServiceError):
    status_code = 503


class UnsupportedArchive(ServiceError):
    status_code = 415


# ---------------------------------------------------------------------- parameters per type
# A row id (PostgreSQL `integer`): a larger number is a 422 here, not an overflow in the driver.
RowId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainParams(_Params):
    dataset_id: RowId
    method: str | None = Field(
        None,
        description="margin, triplet, contrastive, npair, diva, dvml, magnet; default: the "
        "preset's method, and with neither method nor preset the best method measured for the "
        "dataset's kind of data (docs/results.md): the dvml-icons or dvml-cjk preset on the "
        "offline benchmarks, the dvml preset (DVML+margin) on any other data",
    )
    preset: str | None = None
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields (lr, epochs, batch_size, ...)"
    )
    model_name: str | None = Field(
        None, min_length=1, max_length=200, description="default: <method>-job<id>"
    )
    baseline_model_id: RowId | None = Field(
        None,
        description="the model the trained one is compared with on the same test split (the "
        "result's baseline and gain_over_baseline); default: the built-in model",
    )


class EvaluateParams(_Params):
    model_id: RowId
    dataset_id: RowId
    split: Literal["test", "train"] = "test"
    max_classes: int | None = Field(None, ge=2)


class IndexParams(_Params):
    gallery_id: RowId
    model_id: RowId
    index_type: IndexType | None = Field(None, description="default: the gallery's type")


class ImportParams(_Params):
    gallery_id: RowId
    folder: str | None = Field(None, description="a folder under the server's dataset root")
    label_from_folder: bool = Field(True, description="label = the file's parent folder name")
    archive: bool = Field(False, description="set by POST /jobs/import (an uploaded archive)")


class DatasetParams(_Params):
    dataset_id: RowId
    size: int = Field(128, ge=32, le=512)
    max_classes: int | None = Field(None, ge=2)


PARAMS: dict[str, type[_Params]] = {
    JobType.train: TrainParams,
    JobType.evaluate: EvaluateParams,
    JobType.index: IndexParams,
    JobType.import_: ImportParams,
    JobType.dataset: DatasetParams,
}


def parse_params(job_type: str, params: dict[str, Any]) -> _Params:
    try:
        return PARAMS[job_type].model_validate(params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in error.errors()
        )
        raise Invalid(f"invalid params for a {job_type} job: {problems}") from None


# ---------------------------------------------------------------------- the broker
class JobQueue:
    """Publishes job messages by task name (the API never imports the task bodies)."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)

    def publish(self, job: Job) -> None:
        try:
            self.celery.send_task(
                task_name(job.type),
                args=[job.id],
                task_id=job.celery_task_id,
                queue=job.queue,
                retry=False,
            )
        except Exception as error:  # kombu OperationalError, socket errors, driver errors
            log.warning("cannot queue job %d: %s", job.id, error)
            raise BrokerUnavailable(
                "the job queue (broker) is unreachable, so no job can be started now; searches "
                f"and uploads still work. Retry later or check the broker ({error})"
            ) from error

    def close(self) -> None:
        self.celery.close()


# ---------------------------------------------------------------------- validation
def now() -> datetime:
    return datetime.now(UTC)


def job_dir(settings: Settings, job_id: int) -> Path:
    """The job's own folder: its log, its uploaded archive, a train job's run directory."""
    return settings.jobs_dir / str(job_id)


def ready_dataset(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise Invalid(f"dataset {dataset_id} does not exist; GET /api/v1/datasets lists them")
    if dataset.status != "ready":
        raise Conflict(
            f"dataset {dataset_id} is {dataset.status}, not ready; check GET "
            f"/api/v1/datasets/{dataset_id}"
        )
    return dataset


def train_config(settings: Settings, params: TrainParams, dataset: Dataset, out: Path | None):
    """The TrainConfig a train job runs with (also how the API validates the request)."""
    from training.config import ConfigError, recommended_preset, resolve_config
    from training.methods import build_method
    from training.models.backbones import ALIASES, BACKBONES

    reserved = sorted(RESERVED_HYPERPARAMETERS & params.hyperparameters.keys())
    if reserved:
        raise Invalid(
            f"hyperparameters may not set {', '.join(reserved)}: the service sets data, out and "
            "device; give method and preset as their own fields"
        )
    overrides = {
        "num_workers": settings.worker_num_workers,
        **params.hyperparameters,
        "data": dataset.spec,
        "method": params.method,  # None: the preset's
        "out": out,
        "device": settings.worker_device,
    }
    preset = params.preset
    if preset is None and params.method is None:
        preset = recommended_preset(dataset.spec)
    try:
        cfg = resolve_config(overrides, preset=preset)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    if cfg.weights not in SERVER_WEIGHTS:
        raise Invalid(f"weights must be one of {', '.join(SERVER_WEIGHTS)}, not {cfg.weights!r}")
    if ALIASES.get(cfg.backbone, cfg.backbone) not in BACKBONES:
        raise Invalid(
            f"unknown backbone {cfg.backbone!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        )
    classes = (dataset.summary or {}).get("train", {}).get("classes", 2)
    try:
        build_method(
            cfg.method,
            num_classes=max(2, classes),
            embedding_dim=cfg.embedding_dim,
            **cfg.method_params,
        )
    except (ValueError, TypeError) as error:
        raise Invalid(f"invalid method or method_params: {error}") from None
    return cfg


def folder_under_root(settings: Settings, folder: str) -> Path:
    """An existing folder inside Settings.dataset_root (relative to it, or absolute inside);
    symlinks that lead out of the root are refused."""
    if settings.dataset_root is None:
        raise Invalid(
            "server folders are disabled: set LOOKALIKE_DATASET_ROOT on the server, or upload "
            "an archive"
        )
    root = settings.dataset_root.resolve()
    outside = Invalid(f"{folder!r} is not a folder under the server's dataset root")
    try:
        path = (root / folder).resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as error:  # ValueError: a NUL in the path
        raise outside from error
    if not path.is_relative_to(root) or not path.is_dir():
        raise outside
    return path


def _must_exist(lookup: Callable[[Session, int], object], session: Session, row_id: int) -> None:
    """A job parameter naming a missing gallery or model is a bad request (422), not a 404."""
    try:
        lookup(session, row_id)
    except NotFound as error:
        raise Invalid(error.message) from None


def validate(session: Session, settings: Settings, job_type: str, params: _Params) -> None:
    """Every check that can be made before queuing; raises a ServiceError (4xx)."""
    if isinstance(params, TrainParams):
        train_config(settings, params, ready_dataset(session, params.dataset_id), out=None)
        if params.baseline_model_id is not None:
            _must_exist(get_model, session, params.baseline_model_id)
    elif isinstance(params, EvaluateParams):
        _must_exist(get_model, session, params.model_id)
        ready_dataset(session, params.dataset_id)
    elif isinstance(params, IndexParams):
        _must_exist(get_gallery, session, params.gallery_id)
        _must_exist(get_model, session, params.model_id)
        _no_active_job(session, JobType.index, params.gallery_id)
    elif isinstance(params, ImportParams):
        _must_exist(get_gallery, session, params.gallery_id)
        if params.archive == (params.folder is not None):
            raise Invalid("an import job takes either a folder or an uploaded archive")
        if params.folder is not None:
            folder_under_root(settings, params.folder)


def _no_active_job(session: Session, job_type: str, gallery_id: int) -> None:
    active = session.scalars(
        select(Job).where(Job.type == job_type, Job.state.in_(list(ACTIVE_STATES)))
    ).all()
    for job in active:
        if job.params.get("gallery_id") == gallery_id:
            raise Conflict(
                f"job {job.id} is already re-indexing gallery {gallery_id}; wait for it or "
                f"cancel it (POST /api/v1/jobs/{job.id}/cancel)"
            )


# ---------------------------------------------------------------------- submission
def submit(
    session: Session,
    settings: Settings,
    queue: JobQueue,
    job_type: str,
    raw_params: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    archive: BinaryIO | None = None,
) -> Job:
    """Validate, record and queue a job. With an Idempotency-Key that was used before, the
    earlier job is returned (and nothing is queued)."""
    if job_type not in PARAMS or job_type == JobType.dataset:
        choices = ", ".join(t for t in PARAMS if t != JobType.dataset)
        raise Invalid(f"unknown job type {job_type!r}; choose one of {choices}")
    if job_type == JobType.import_ and raw_params.get("archive") and archive is None:
        raise Invalid("upload the archive with POST /api/v1/jobs/import (multipart)")
    params = parse_params(job_type, raw_params)
    if archive is not None:
        check_archive(archive)
    if idempotency_key is not None:
        earlier = _by_key(session, idempotency_key, job_type, params)
        if earlier is not None:
            return earlier
    fail_lost_jobs(session, settings)
    validate(session, settings, job_type, params)
    try:
        return create(session, settings, queue, job_type, params, idempotency_key, archive)
    except IntegrityError:  # the same key, concurrently
        session.rollback()
        earlier = _by_key(session, idempotency_key or "", job_type, params)
        if earlier is None:
            raise
        return earlier


def _by_key(session: Session, key: str, job_type: str, params: _Params) -> Job | None:
    job = session.scalar(select(Job).where(Job.idempotency_key == key))
    if job is not None and (job.type, job.params) != (job_type, params.model_dump(mode="json")):
        raise Invalid(
            f"Idempotency-Key {key!r} was used for a different request (job {job.id}); use a "
            "new key for a new job"
        )
    return job


def create(
    session: Session,
    settings: Settings,
    queue: JobQueue,
    job_type: str,
    params: _Params,
    idempotency_key: str | None = None,
    archive: BinaryIO | None = None,
) -> Job:
    """Record the job (committed), store its archive, then queue it; on a broker failure the
    row and its files are removed and BrokerUnavailable (503) is raised."""
    job = Job(
        type=job_type,
        state=JobState.queued,
        queue=QUEUE_OF_TYPE[job_type],
        params=params.model_dump(mode="json"),
        progress=0.0,
        celery_task_id=str(uuid.uuid4()),
        idempotency_key=idempotency_key,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    directory = job_dir(settings, job.id)
    try:
        if archive is not None:
            _store_archive(archive, directory, settings.max_archive_bytes)
        session.commit()
        queue.publish(job)
    except BaseException:
        session.rollback()
        session.execute(Job.__table__.delete().where(Job.id == job.id))
        session.commit()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return job


def check_archive(archive: BinaryIO) -> None:
    """A zip or a tar (plain or compressed) file; 415 otherwise."""
    recognised = False
    for is_kind in (zipfile.is_zipfile, tarfile.is_tarfile):
        archive.seek(0)
        recognised = recognised or is_kind(archive)
    archive.seek(0)
    if not recognised:
        raise UnsupportedArchive(
            "the upload is neither a zip nor a tar archive (.zip, .tar, .tar.gz, .tar.bz2, "
            ".tar.xz); pack the images into one of those"
        )


def _store_archive(source: BinaryIO, directory: Path, limit: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(directory / ARCHIVE_FILE, "wb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise TooLarge(f"the archive is larger than the limit of {limit:,} bytes")
            out.write(chunk)
    if not written:
        raise Invalid("the uploaded archive is empty")


# ---------------------------------------------------------------------- reading and control
def fail_lost_jobs(session: Session, settings: Settings) -> int:
    """Mark running jobs whose worker stopped beating as failed (the killed-worker policy:
    failed with a reason, never retried automatically); returns how many."""
    cutoff = now() - timedelta(seconds=settings.job_heartbeat_timeout_s)
    stale = session.execute(
        select(Job.id, Job.worker, Job.heartbeat_at).where(
            Job.state == JobState.running, Job.heartbeat_at < cutoff
        )
    ).all()
    for job_id, worker, heartbeat in stale:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running, Job.heartbeat_at < cutoff)
            .values(
                state=JobState.failed,
                finished_at=now(),
                eta=None,
                error=(
                    f"worker {worker} was lost: no heartbeat since {heartbeat:%Y-%m-%d %H:%M:%S} "
                    f"UTC (timeout {settings.job_heartbeat_timeout_s:g} s). The job was not "
                    "retried; submit it again"
                ),
            )
        )
    if stale:
        session.commit()
        log.warning("marked %d jobs failed: their workers were lost", len(stale))
    return len(stale)


def fail_job(session: Session, job_id: int, reason: str) -> None:
    """Mark one running job failed (its worker process died)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running)
        .values(state=JobState.failed, finished_at=now(), eta=None, error=reason)
    )
    session.commit()


def fail_worker_jobs(session: Session, worker: str, reason: str) -> int:
    """Mark the running jobs of one worker failed (it died or restarted); returns how many."""
    failed = session.execute(
        update(Job)
        .where(Job.state == JobState.running, Job.worker == worker)
        .values(state=JobState.failed, finished_at=now(), eta=None, error=reason)
    ).rowcount
    session.commit()
    return failed


def get_job(session: Session, settings: Settings, job_id: int) -> Job:
    fail_lost_jobs(session, settings)
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist; GET /api/v1/jobs lists the jobs")
    return job


def list_jobs(
    session: Session,
    settings: Settings,
    *,
    job_type: str | None,
    state: str | None,
    offset: int,
    limit: int,
) -> tuple[list[Job], int]:
    fail_lost_jobs(session, settings)
    where = []
    if job_type is not None:
        where.append(Job.type == job_type)
    if state is not None:
        where.append(Job.state == state)
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    jobs = session.scalars(
        select(Job).where(*where).order_by(Job.id.desc()).offset(offset).limit(limit)
    ).all()
    return list(jobs), total


def cancel(session: Session, settings: Settings, job_id: int) -> Job:
    """A queued job is cancelled at once (a worker that receives it later skips it); a running
    one is asked to stop and becomes `cancelled` at its next step."""
    job = get_job(session, settings, job_id)
    cancelled_queued = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.queued)
        .values(
            state=JobState.cancelled,
            cancel_requested=True,
            finished_at=now(),
            error="cancelled before it started",
        )
    ).rowcount
    if not cancelled_queued:
        asked = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running)
            .values(cancel_requested=True)
        ).rowcount
        if not asked:
            session.rollback()
            raise Conflict(
                f"job {job_id} is already {job.state}; only queued or running jobs can be cancelled"
            )
    session.commit()
    if cancelled_queued:  # no worker will run it: its uploaded archive is not kept
        (job_dir(settings, job_id) / ARCHIVE_FILE).unlink(missing_ok=True)
    session.refresh(job)
    return job


def log_tail(settings: Settings, job: Job, lines: int) -> str:
    """The last `lines` lines of the job's log ("" before the job has started)."""
    path = job_dir(settings, job.id) / LOG_FILE
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        block, data = 64 * 1024, b""
        while size > 0 and data.count(b"\n") <= lines:
            step = min(block, size)
            size -= step
            handle.seek(size)
            data = handle.read(step) + data
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) + "\n" if text else ""
