"""Jobs: submit (202 + Location), list, show, log tail, cancel. The work runs in Celery workers;
see docs/jobs.md."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import ReadAccess, SessionDep, SettingsDep, WriteAccess
from app.api.schemas import API, MAX_INT, Id, ListOffset, Timestamp
from app.db.models import Job
from app.db.models.jobs import JobState, JobType
from app.services import jobs as service
from app.services.jobs import JobQueue

router = APIRouter(prefix="/jobs", tags=["jobs"])
_queue_lock = threading.Lock()


def get_job_queue(request: Request) -> JobQueue:
    """The process's publisher, created on first use (the API starts without a broker)."""
    state = request.app.state
    with _queue_lock:
        if getattr(state, "job_queue", None) is None:
            state.job_queue = JobQueue(state.settings)
        return state.job_queue


JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="The same key returns the same job instead of starting another.",
    ),
]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="train, evaluate, index or import")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="train: dataset_id, method, preset, hyperparameters, model_name; "
        "evaluate: model_id, dataset_id, split, max_classes; index: gallery_id, model_id, "
        "index_type; import: gallery_id, folder, label_from_folder",
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    queue: str
    params: dict[str, Any]
    progress: float = Field(description="0 to 1")
    epoch: int | None
    step: int | None
    total_steps: int | None
    metrics: dict[str, Any] | None = Field(description="The latest metrics the job reported.")
    eta: Timestamp | None = Field(description="Estimated completion time (UTC).")
    error: str | None
    result: dict[str, Any] | None = Field(
        description="train: model_id and metrics; evaluate: metrics; index: index_version; "
        "import: counts and per-file results"
    )
    cancel_requested: bool
    worker: str | None
    heartbeat_at: Timestamp | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    celery_task_id: str | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    offset: int
    limit: int


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
    job = service.submit(
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
    job = service.submit(
        session,
        settings,
        queue,
        JobType.import_,
        params,
        idempotency_key=idempotency_key,
        archive=archive.file,
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
    jobs, total = service.list_jobs(
        session, settings, job_type=type, state=state, offset=offset, limit=limit
    )
    return JobPage(
        items=[JobOut.model_validate(j) for j in jobs], total=total, offset=offset, limit=limit
    )


@router.get("/{job_id}", response_model=JobOut, dependencies=[ReadAccess])
def get_job(job_id: Id, session: SessionDep, settings: SettingsDep) -> JobOut:
    return JobOut.model_validate(service.get_job(session, settings, job_id))


@router.get("/{job_id}/logs", response_class=PlainTextResponse, dependencies=[ReadAccess])
def job_logs(
    job_id: Id,
    session: SessionDep,
    settings: SettingsDep,
    lines: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> str:
    """The last `lines` lines of the job's log (empty until a worker starts it)."""
    return service.log_tail(settings, service.get_job(session, settings, job_id), lines)


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, dependencies=[WriteAccess])
def cancel_job(job_id: Id, session: SessionDep, settings: SettingsDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step (its state
    turns `cancelled` then). 409 when the job has already finished."""
    return JobOut.model_validate(service.cancel(session, settings, job_id))
