"""The job kinds: the only list of them. The API validates and queues by it, the Celery app
routes by it and the worker generates one task per entry (app/worker/tasks.py).

Adding a kind is one module that defines its parameters, checks and body as a `JobKind`
(see train.py, or the worked example in docs/jobs.md) and one line in `KINDS` below."""

from __future__ import annotations

from enum import StrEnum

from app.services.errors import Invalid
from app.services.jobs import cluster, dataset, evaluate, imports, index, train
from app.services.jobs.base import JobKind

KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        train.KIND,
        evaluate.KIND,
        index.KIND,
        imports.KIND,
        dataset.KIND,
        cluster.KIND,
    )
}

# The kinds as an enum, for the API's `?type=` filter (OpenAPI lists the values).
JobType = StrEnum("JobType", [(name, name) for name in KINDS])  # type: ignore[misc]

QUEUES = tuple(sorted({kind.queue for kind in KINDS.values()}))


def task_name(job_type: str) -> str:
    """The Celery task that runs jobs of `job_type`; its messages carry only the job id."""
    return f"lookalike.{job_type}"


def submittable_kind(job_type: str) -> JobKind:
    """The kind a client may submit with POST /jobs; 422 naming the choices otherwise."""
    kind = KINDS.get(job_type)
    if kind is None or not kind.submittable:
        choices = ", ".join(name for name, k in KINDS.items() if k.submittable)
        raise Invalid(f"unknown job type {job_type!r}; choose one of {choices}")
    return kind
