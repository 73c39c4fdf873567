"""The Celery application, configured from Settings only, after Celery's user guide
(optimizing.rst, routing.rst) and its Redis broker docs (redis.rst).

- Two queues: `gpu` (train, evaluate: one at a time on a `--pool solo -c 1` worker) and `cpu`
  (index, import, dataset builds), so cheap jobs are never stuck behind a training run.
- Late acknowledgement and prefetch 1: a worker reserves only the job it runs.
- A worker lost mid-job is not redelivered (`task_reject_on_worker_lost` off): the job is marked
  failed with a reason (see app/worker/tasks.py), never run twice. The Redis visibility timeout is
  longer than the longest job, so a slow job is not redelivered while it runs either; should a
  message come back anyway, the job row's atomic claim makes the second delivery a no-op.
- No result backend: the `jobs` table is the source of truth, Celery's task state is never read.
- Brokers: Redis in deployment; the embedded default is kombu's SQLAlchemy transport over
  DATA_DIR/broker.db (one SQLite file, no server; see docs/jobs.md for why not the filesystem
  transport).

`celery -A app.worker.celery_app worker` (or `lookalike worker`) uses `celery_app`, built from
the environment's Settings; the API builds its own with `make_celery(settings)` and only sends
tasks by name, so it never imports the task bodies.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
# Job type -> queue. The task for job type T is named `lookalike.T`.
QUEUE_OF_TYPE = {
    "train": GPU_QUEUE,
    "evaluate": GPU_QUEUE,
    "index": CPU_QUEUE,
    "import": CPU_QUEUE,
    "dataset": CPU_QUEUE,
}


def task_name(job_type: str) -> str:
    return f"lookalike.{job_type}"


class LookalikeCelery(Celery):
    """A Celery app that carries the Settings its tasks run with."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("lookalike", broker=settings.broker_url, include=["app.worker.tasks"])
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


def make_celery(settings: Settings) -> LookalikeCelery:
    app = LookalikeCelery(settings)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,
        task_ignore_result=True,
        task_default_queue=CPU_QUEUE,
        task_routes={task_name(t): {"queue": q} for t, q in QUEUE_OF_TYPE.items()},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=broker_transport_options(settings),
        broker_connection_timeout=settings.broker_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        # Workers reconnect to a restarted broker; the API never waits for one (see jobs
        # service: publishing does not retry).
        broker_connection_max_retries=None,
        worker_send_task_events=False,
        # Jobs run for hours: no soft limits from Celery, cancellation is cooperative.
        task_time_limit=None,
        enable_utc=True,
    )
    return app


celery_app = make_celery(get_settings())
