"""Jobs run by the Celery workers, and datasets registered for training and evaluation.

The `jobs` row is the source of truth for a job: the API creates it (state `queued`), a worker
claims it atomically (`queued` -> `running`) and writes progress, heartbeat and the outcome to it.
The Celery task id is only an attribute; Celery's own task state is never read.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base
from app.db.models.catalog import utcnow


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = frozenset({JobState.queued, JobState.running})


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_type", "state", "type"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued)
    queue: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    epoch: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    eta: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Which worker runs it and when it last proved to be alive (see app/services/jobs/lifecycle.py).
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DatasetKind(StrEnum):
    imagefolder = "imagefolder"  # ROOT/train/<class>/<image> and ROOT/test/<class>/<image>
    cub200 = "cub200"
    cars196 = "cars196"
    sop = "sop"
    icons = "icons"  # built by a worker from Debian packages
    cjk = "cjk"


BUILT_KINDS = frozenset({DatasetKind.icons, DatasetKind.cjk})


class Dataset(Base):
    """A labelled image collection on the server, as `training.data.readers.load_dataset` reads
    it; only paths under Settings.dataset_root (or built ones under DATA_DIR) are accepted.

    A dataset is ready once `summary` is set; a built one (icons, cjk) is building while its job
    is queued or running, and failed if that job failed or was cancelled.
    """

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Resolved absolute path; `spec` is what `load_dataset` is given.
    path: Mapped[str] = mapped_column(String(1000))
    # {"train": {"classes": C, "images": N}, "test": {...}} once the dataset is readable.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job | None] = relationship(lazy="joined")

    @property
    def spec(self) -> str:
        if self.kind in (DatasetKind.cub200, DatasetKind.cars196, DatasetKind.sop):
            return f"{self.kind}:{self.path}"
        return f"imagefolder:{self.path}"

    @property
    def status(self) -> str:
        """ready, building or failed (see the class docstring)."""
        if self.summary is not None:
            return "ready"
        if self.job is not None and self.job.state in ACTIVE_STATES:
            return "building"
        return "failed"
