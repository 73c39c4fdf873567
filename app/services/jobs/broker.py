"""The Celery application, configured from Settings only, after Celery's user guide
(optimizing.rst, routing.rst) and its Redis broker docs (redis.rst), and the API's publisher.

- Two queues (`base.GPU_QUEUE`, `base.CPU_QUEUE`), routed by the registry, so cheap jobs are
  never stuck behind a training run.
- Late acknowledgement and prefetch 1: a worker reserves only the job it runs.
- A worker lost mid-job is not redelivered (`task_reject_on_worker_lost` off): the job is marked
  failed with a reason (lifecycle.py), never run twice. The Redis visibility timeout is longer
  than the longest job, so a slow job is not redelivered while it runs either; should a message
  come back anyway, the job row's atomic claim makes the second delivery a no-op.
- No result backend: the `jobs` table is the source of truth, Celery's task state is never read.
- Brokers: Redis in deployment; the embedded default is kombu's SQLAlchemy transport over
  DATA_DIR/broker.db (one SQLite file, no server; see docs/jobs.md for why not the filesystem
  transport).

The worker's app (app/worker/celery_app.py) includes the generated tasks; the API's only sends
tasks by name (`JobQueue`), so it never imports the task bodies' dependencies into Celery.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery

from app.core.config import Settings
from app.db.models import Job
from app.services.errors import ServiceError
from app.services.jobs.base import CPU_QUEUE
from app.services.jobs.registry import KINDS, task_name

log = logging.getLogger(__name__)


class BrokerUnavailable(ServiceError):
    status_code = 503


class LookalikeCelery(Celery):
    """A Celery app that carries the Settings its tasks run with."""

    def __init__(self, settings: Settings, include: Sequence[str] = ()) -> None:
        super().__init__("lookalike", broker=settings.broker_url, include=list(include))
        self.settings = settings


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker (the SQLAlchemy transport passes its options
    to `create_engine`, so each transport gets only the ones it understands)."""
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        options: dict[str, Any] = {
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": settings.broker_connect_timeout_s,
            "socket_timeout": max(settings.broker_connect_timeout_s, 10.0),
        }
        if settings.broker_key_prefix:
            options["global_keyprefix"] = settings.broker_key_prefix
        return options
    if url.startswith("sqla+sqlite"):
        # The API and the local workers share the file; wait for its lock rather than fail.
        return {"connect_args": {"timeout": 30}}
    return {}


def make_celery(settings: Settings, include: Sequence[str] = ()) -> LookalikeCelery:
    app = LookalikeCelery(settings, include)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,
        task_ignore_result=True,
        task_default_queue=CPU_QUEUE,
        task_routes={task_name(t): {"queue": kind.queue} for t, kind in KINDS.items()},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=broker_transport_options(settings),
        broker_connection_timeout=settings.broker_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        # Workers reconnect to a restarted broker; the API never waits for one (publishing
        # does not retry).
        broker_connection_max_retries=None,
        worker_send_task_events=False,
        # Jobs run for hours: no soft limits from Celery, cancellation is cooperative.
        task_time_limit=None,
        enable_utc=True,
    )
    return app


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
