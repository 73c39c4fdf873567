"""Submission: validate, record and queue a job.

Everything a job could fail on at once (unknown dataset, model or gallery, bad hyperparameters,
a folder outside the data root, a second index job for the same gallery) is checked here,
before anything is queued, and answered with a 4xx. The `jobs` row is written first; the
Celery message only carries its id. If the broker cannot take the message the row is removed
again and the client gets a 503, so nothing waits forever in `queued`.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Job
from app.db.models.jobs import JobState
from app.services.errors import Invalid, TooLarge
from app.services.jobs.base import ARCHIVE_FILE, JobKind, JobParams, job_dir
from app.services.jobs.broker import JobQueue
from app.services.jobs.lifecycle import fail_lost_jobs
from app.services.jobs.registry import KINDS, submittable_kind


def parse_params(kind: JobKind, params: dict[str, Any]) -> JobParams:
    try:
        return kind.params.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in error.errors()
        )
        raise Invalid(f"invalid params for a {kind.name} job: {problems}") from None


def submit(
    session: Session,
    settings: Settings,
    queue: JobQueue,
    job_type: str,
    raw_params: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    upload: BinaryIO | None = None,
) -> Job:
    """Validate, record and queue a job. With an Idempotency-Key that was used before, the
    earlier job is returned (and nothing is queued). `upload`: the file a kind takes with the
    request (an import's archive), checked before it is stored in the job's folder."""
    kind = submittable_kind(job_type)
    if kind.check_upload is not None and raw_params.get("archive") and upload is None:
        raise Invalid("upload the archive with POST /api/v1/jobs/import (multipart)")
    params = parse_params(kind, raw_params)
    if upload is not None:
        if kind.check_upload is None:
            raise Invalid(f"a {kind.name} job takes no uploaded file")
        kind.check_upload(upload)
    if idempotency_key is not None:
        earlier = _by_key(session, idempotency_key, kind.name, params)
        if earlier is not None:
            return earlier
    fail_lost_jobs(session, settings)
    kind.validate(session, settings, params)
    try:
        return create(session, settings, queue, kind.name, params, idempotency_key, upload)
    except IntegrityError:  # the same key, concurrently
        session.rollback()
        earlier = _by_key(session, idempotency_key or "", kind.name, params)
        if earlier is None:
            raise
        return earlier


def _by_key(session: Session, key: str, job_type: str, params: JobParams) -> Job | None:
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
    params: JobParams,
    idempotency_key: str | None = None,
    upload: BinaryIO | None = None,
) -> Job:
    """Record the job (committed), store its upload, then queue it; on a broker failure the
    row and its files are removed and BrokerUnavailable (503) is raised."""
    job = Job(
        type=job_type,
        state=JobState.queued,
        queue=KINDS[job_type].queue,
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
        if upload is not None:
            _store_upload(upload, directory, settings.max_archive_bytes)
        session.commit()
        queue.publish(job)
    except BaseException:
        session.rollback()
        session.execute(delete(Job).where(Job.id == job.id))
        session.commit()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return job


def _store_upload(source: BinaryIO, directory: Path, limit: int) -> None:
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
