"""The job row's state machine: every transition of a job after it was queued.

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled            running --lost worker--> failed

- Claim: `UPDATE jobs SET state='running' WHERE id=? AND state='queued'` in one statement, so a
  message delivered twice (broker redelivery, two consumers) runs the job at most once; a job
  cancelled while queued is never started.
- Heartbeat: a thread writes `heartbeat_at` (and any pending progress) every
  `Settings.job_heartbeat_s` and reads `cancel_requested`. A job whose heartbeat is older than
  `Settings.job_heartbeat_timeout_s` has lost its worker and is marked failed by
  `fail_lost_jobs`; if this process is in fact still alive (stalled), its next beat finds the
  row no longer running and stops the run, so a job never runs twice.
- Cancel is cooperative: `should_stop()` turns true once the heartbeat has seen the flag; the
  job bodies check it between steps and raise `JobCancelled`.
- Finish: the outcome is written only while this run still owns the row (running, under this
  worker's name); a run declared lost meanwhile writes nothing.
- Logs: everything logged during the run also goes to DATA_DIR/jobs/<id>/job.log.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Job
from app.db.models.jobs import JobState
from app.db.session import updated_rows
from app.services.errors import Conflict, NotFound, ServiceError
from app.services.jobs.base import ARCHIVE_FILE, LOG_FILE, job_dir, now
from app.services.runtime import Runtime

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobCancelled(Exception):
    """Raised by a job body when `should_stop()` became true."""


class JobLost(Exception):
    """This run no longer owns its job row (declared lost); its outcome is discarded."""


class JobRun:
    """One claimed job, as seen by the task body."""

    def __init__(self, runtime: Runtime, job: Job, worker: str) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.job = job
        self.id = job.id
        self.worker = worker
        self.dir = job_dir(runtime.settings, job.id)
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # one row write at a time
        self._stop = threading.Event()  # ends the heartbeat thread
        self._cancelled = threading.Event()
        self._lost = threading.Event()
        self._last_write = 0.0
        self._started = time.monotonic()

    # ------------------------------------------------------------------ body API
    def session(self) -> Session:
        return self.runtime.session_factory()

    def should_stop(self) -> bool:
        return self._cancelled.is_set() or self._lost.is_set()

    def check(self) -> None:
        """Raise `JobCancelled` (or `JobLost`) when the run must stop; call between steps."""
        if self._lost.is_set():
            raise JobLost(f"job {self.id} was declared lost while this worker ran it")
        if self._cancelled.is_set():
            raise JobCancelled(f"job {self.id} was cancelled")

    def report(
        self,
        *,
        progress: float | None = None,
        eta_s: float | None = None,
        epoch: int | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        metrics: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Record progress; written at once when `force` or a heartbeat interval has passed
        since the last write, otherwise by the next heartbeat.

        `eta_s`, the seconds left as the body estimates them, sets the ETA; without it the ETA
        extrapolates `progress` linearly from the job's start, which is wrong wherever progress
        is not proportional to time (a training run that a time budget will stop early)."""
        values: dict[str, Any] = {}
        if eta_s is not None and math.isfinite(eta_s):
            values["eta"] = now() + timedelta(seconds=max(eta_s, 0.0))
        if progress is not None:
            progress = min(max(progress, 0.0), 1.0)
            values["progress"] = progress
            elapsed = time.monotonic() - self._started
            if progress > 0 and "eta" not in values:
                values["eta"] = now() + timedelta(seconds=elapsed * (1 - progress) / progress)
        for name, value in (
            ("epoch", epoch),
            ("step", step),
            ("total_steps", total_steps),
            ("metrics", metrics),
        ):
            if value is not None:
                values[name] = value
        with self._lock:
            self._pending.update(values)
        if force or time.monotonic() - self._last_write >= self.settings.job_heartbeat_s:
            self._write()

    # ------------------------------------------------------------------ heartbeat
    def _write(self) -> None:
        """Write the heartbeat and pending progress; learn about cancel and loss."""
        with self._write_lock:
            with self._lock:
                values, self._pending = self._pending, {}
            with self.session() as session:
                owned = updated_rows(
                    session,
                    update(Job)
                    .where(
                        Job.id == self.id, Job.state == JobState.running, Job.worker == self.worker
                    )
                    .values(heartbeat_at=now(), **values),
                )
                cancel = session.get_one(Job, self.id).cancel_requested if owned else False
                session.commit()
            self._last_write = time.monotonic()
        if not owned:
            self._lost.set()
        elif cancel:
            self._cancelled.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.job_heartbeat_s):
            try:
                self._write()
            except Exception:  # a database hiccup must not kill the heartbeat
                log.exception("job %d: heartbeat failed", self.id)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Heartbeat thread and the job's log file for the duration of the body."""
        self.dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.dir / LOG_FILE)
        handler.setFormatter(_NoTracebackFormatter(LOG_FORMAT))
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(handler)
        beat = threading.Thread(target=self._beat, name=f"job-{self.id}-heartbeat", daemon=True)
        beat.start()
        try:
            yield
        finally:
            self._stop.set()
            beat.join()
            root.removeHandler(handler)
            handler.close()

    # ------------------------------------------------------------------ outcome
    def finish(
        self, state: JobState, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> bool:
        """Write the outcome; False, and nothing written, when the row is no longer this run's
        (declared lost meanwhile)."""
        with self._write_lock, self.session() as session:
            with self._lock:
                values, self._pending = self._pending, {}
            values.update(
                state=state,
                result=result,
                error=error,
                finished_at=now(),
                heartbeat_at=now(),
                eta=None,
            )
            if state == JobState.succeeded:
                values["progress"] = 1.0
            owned = updated_rows(
                session,
                update(Job)
                .where(Job.id == self.id, Job.state == JobState.running, Job.worker == self.worker)
                .values(**values),
            )
            session.commit()
        if not owned:
            log.warning("job %d is no longer this worker's; its outcome is discarded", self.id)
        return bool(owned)


def claim(runtime: Runtime, job_id: int, worker: str) -> Job | None:
    """Move the job from queued to running for this worker; None when it is not queued (done,
    cancelled, running elsewhere, or unknown), in which case this delivery does nothing."""
    with runtime.session_factory() as session:
        claimed = updated_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.queued)
            .values(
                state=JobState.running,
                worker=worker,
                started_at=now(),
                heartbeat_at=now(),
                progress=0.0,
            ),
        )
        session.commit()
        job = session.get(Job, job_id)
    if job is None:
        log.warning("job %d does not exist; ignoring its message", job_id)
        return None
    if not claimed:
        log.info("job %d is %s, not queued; this delivery does nothing", job_id, job.state)
        return None
    return job


# Errors that are the job's input's fault: the message alone is the reason, no traceback.
def user_error_types() -> tuple[type[BaseException], ...]:
    from app.imaging import ImageRejected
    from training.errors import input_error_types

    return (ServiceError, ImageRejected, *input_error_types())


class _NoTracebackFormatter(logging.Formatter):
    """The job's log is served to every reader (`GET /jobs/{id}/logs`): it gets the message
    of a failure, never its traceback (which can quote SQL and server paths); the worker's own
    log keeps the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def without_server_paths(message: str, settings: Settings) -> str:
    """`message` with the server's own folders (data directory, dataset and model roots)
    replaced by their setting's name: a job's error is shown to every reader."""
    roots = {
        "DATA_DIR": settings.data_dir,
        "DATASET_ROOT": settings.dataset_root,
        "MODEL_ROOT": settings.model_root,
    }
    places = [
        (str(variant), name)
        for name, root in roots.items()
        if root is not None
        for variant in {root.resolve(), root.absolute()}
    ]
    for place, name in sorted(places, key=lambda item: -len(item[0])):
        message = message.replace(place, f"<{name}>")
    return message


def execute(
    runtime: Runtime, job_id: int, worker: str, body: Callable[[JobRun], dict[str, Any]]
) -> None:
    """Claim the job, run `body` (which returns the job's result) with heartbeats, record the
    outcome. Never raises for the job's own failures: the row says what happened, and Celery
    has nothing to retry."""
    job = claim(runtime, job_id, worker)
    if job is None:
        return
    run = JobRun(runtime, job, worker)
    with run.running():
        log.info("job %d (%s) started on %s with %s", job.id, job.type, worker, job.params)
        try:
            result = body(run)
            if run.finish(JobState.succeeded, result=result):
                log.info("job %d succeeded", job.id)
        except JobCancelled:
            log.info("job %d cancelled", job.id)
            run.finish(JobState.cancelled, error="cancelled on request")
        except JobLost as error:
            log.warning("%s", error)
        except user_error_types() as error:
            message = error.message if isinstance(error, ServiceError) else str(error)
            log.error("job %d failed: %s", job.id, message)
            run.finish(JobState.failed, error=without_server_paths(message, runtime.settings))
        except Exception as error:
            # Anyone who can read jobs sees the error: never a driver's SQL or a traceback.
            log.exception("job %d failed", job.id)
            run.finish(
                JobState.failed,
                error=f"internal error ({type(error).__name__}); the log of worker {worker} "
                f"has the details (job {job.id})",
            )


# ---------------------------------------------------------------------- API-side transitions
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
    failed = updated_rows(
        session,
        update(Job)
        .where(Job.state == JobState.running, Job.worker == worker)
        .values(state=JobState.failed, finished_at=now(), eta=None, error=reason),
    )
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
    cancelled_queued = updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.queued)
        .values(
            state=JobState.cancelled,
            cancel_requested=True,
            finished_at=now(),
            error="cancelled before it started",
        ),
    )
    if not cancelled_queued:
        asked = updated_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running)
            .values(cancel_requested=True),
        )
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
