"""The Celery tasks: one per job kind in the registry (app/services/jobs/registry.py), each
carrying only a job id; `lifecycle.execute` claims the row, runs the kind's body with heartbeats
and records the outcome. And the worker signals that fail the jobs of a dead worker process.

The per-process `Runtime` (DB engine, embedder and index caches) is built by the first task,
never at import or in the prefork parent, and models load in the first job that needs them:
CUDA must not be initialised before a fork (importing torch does not; loading a model on the
GPU does), and Celery kills `worker_process_init` handlers that block for more than 4 s
(Celery docs, userguide/signals.rst).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.signals import task_failure, worker_process_shutdown, worker_ready, worker_shutdown
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.session import make_engine, make_session_factory
from app.services.jobs.base import JobKind
from app.services.jobs.lifecycle import execute, fail_job, fail_worker_jobs
from app.services.jobs.registry import KINDS, task_name
from app.services.runtime import Runtime

log = logging.getLogger(__name__)

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


def _task(kind: JobKind) -> Callable[..., None]:
    def run(self: Task, job_id: int) -> None:
        settings: Settings = self.app.settings
        execute(runtime(settings), job_id, self.request.hostname or "worker", kind.body)

    run.__name__ = run.__qualname__ = f"run_{kind.name}"
    return shared_task(name=task_name(kind.name), bind=True)(run)


TASKS = {job_type: _task(kind) for job_type, kind in KINDS.items()}


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
