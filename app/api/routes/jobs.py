"""Jobs: submit (202 + Location), list, show, log tail, cancel. The work runs in Celery workers;
see docs/jobs.md."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from fastapi.responses import PlainTextResponse

from app.api.deps import JobQueueDep, ReadAccess, SessionDep, SettingsDep, WriteAccess
from app.api.schemas import API, MAX_INT, Id, JobCreate, JobOut, JobPage, ListOffset
from app.db.models import Job
from app.db.models.jobs import JobState
from app.services.jobs import imports, lifecycle, submission
from app.services.jobs.base import log_tail
from app.services.jobs.registry import JobType

router = APIRouter(prefix="/jobs", tags=["jobs"])
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="The same key returns the same job instead of starting another.",
    ),
]


def _accepted(job: Job, response: Response) -> JobOut:
    response.headers["Location"] = f"{API}/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.post("", response_model=JobOut, status_code=202, dependencies=[WriteAccess])
def submit_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    queue: JobQueueDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Validate and queue a job; 202 with the job and its `Location`. Invalid requests are
    answered at once (4xx), a missing broker with 503."""
    job = submission.submit(
        session, settings, queue, body.type, body.params, idempotency_key=idempotency_key
    )
    return _accepted(job, response)


@router.post("/import", response_model=JobOut, status_code=202, dependencies=[WriteAccess])
def submit_import(
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    queue: JobQueueDep,
    gallery_id: Annotated[int, Form(ge=1, le=MAX_INT)],
    archive: Annotated[UploadFile, File(description="A zip or tar (.tar, .tar.gz, ...) file.")],
    label_from_folder: Annotated[bool, Form()] = True,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Import the images of an uploaded archive into a gallery (an `import` job)."""
    params = {"gallery_id": gallery_id, "archive": True, "label_from_folder": label_from_folder}
    job = submission.submit(
        session,
        settings,
        queue,
        imports.TYPE,
        params,
        idempotency_key=idempotency_key,
        upload=archive.file,
    )
    return _accepted(job, response)


@router.get("", response_model=JobPage, dependencies=[ReadAccess])
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    type: Annotated[JobType | None, Query()] = None,
    state: Annotated[JobState | None, Query()] = None,
    offset: ListOffset = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Newest first."""
    jobs, total = lifecycle.list_jobs(
        session, settings, job_type=type, state=state, offset=offset, limit=limit
    )
    return JobPage(
        items=[JobOut.model_validate(j) for j in jobs], total=total, offset=offset, limit=limit
    )


@router.get("/{job_id}", response_model=JobOut, dependencies=[ReadAccess])
def get_job(job_id: Id, session: SessionDep, settings: SettingsDep) -> JobOut:
    return JobOut.model_validate(lifecycle.get_job(session, settings, job_id))


@router.get("/{job_id}/logs", response_class=PlainTextResponse, dependencies=[ReadAccess])
def job_logs(
    job_id: Id,
    session: SessionDep,
    settings: SettingsDep,
    lines: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> str:
    """The last `lines` lines of the job's log (empty until a worker starts it)."""
    job = lifecycle.get_job(session, settings, job_id)
    return log_tail(settings, job.id, lines)


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, dependencies=[WriteAccess])
def cancel_job(job_id: Id, session: SessionDep, settings: SettingsDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step (its state
    turns `cancelled` then). 409 when the job has already finished."""
    return JobOut.model_validate(lifecycle.cancel(session, settings, job_id))
