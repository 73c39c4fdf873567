"""Datasets for training and evaluation jobs.

A dataset on disk (an ImageFolder root with train/ and test/, or CUB-200-2011, Cars196, Stanford
Online Products in the layout their archives extract to) is registered by a path under
Settings.dataset_root and read at once with training's own readers, so a bad path or layout is
a 4xx now rather than a failed job later. The two offline benchmarks (icons, cjk) are built by a
worker (a `dataset` job) under DATA_DIR/datasets.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset
from app.db.models.jobs import BUILT_KINDS, DatasetKind
from app.services.errors import Conflict, Invalid, NotFound
from app.services.jobs import dataset as dataset_job
from app.services.jobs.base import folder_under_root
from app.services.jobs.broker import JobQueue
from app.services.jobs.lifecycle import fail_lost_jobs
from app.services.jobs.submission import create


class DatasetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    kind: DatasetKind
    path: str | None = Field(
        None, description="under the server's dataset root; not for icons/cjk (they are built)"
    )
    size: int = Field(128, ge=32, le=512, description="icons/cjk: image side in pixels")
    max_classes: int | None = Field(None, ge=2, description="cjk: keep the first N classes")


def summarize(spec: str) -> dict[str, Any]:
    """Classes and images per split, read with training's readers (raises DatasetError)."""
    from training.data.readers import load_dataset

    dataset = load_dataset(spec)
    return {
        split: {"classes": part.num_classes, "images": len(part)}
        for split, part in (("train", dataset.train), ("test", dataset.test))
    }


def register(
    session: Session, settings: Settings, queue: JobQueue, request: DatasetRequest
) -> Dataset:
    """Register a dataset; a built kind also queues its `dataset` job (the dataset is then
    `building` until that job finishes)."""
    from training.data.records import DatasetError

    if session.scalar(select(exists().where(Dataset.name == request.name))):
        raise Conflict(f"a dataset named {request.name!r} already exists; choose another name")
    if request.kind in BUILT_KINDS:
        if request.path is not None:
            raise Invalid(f"{request.kind} datasets are built by the server; omit path")
        if request.max_classes is not None and request.kind != DatasetKind.cjk:
            raise Invalid("max_classes applies to cjk datasets only")
        return _queue_build(session, settings, queue, request)
    if request.path is None:
        raise Invalid(f"a {request.kind} dataset needs a path under the server's dataset root")
    path = folder_under_root(settings, request.path)
    dataset = Dataset(name=request.name, kind=request.kind.value, path=str(path))
    try:
        dataset.summary = summarize(dataset.spec)
    except DatasetError as error:
        raise Invalid(
            f"cannot read {request.path!r} as a {request.kind} dataset: {error}"
        ) from None
    session.add(dataset)
    session.commit()
    return dataset


def _queue_build(
    session: Session, settings: Settings, queue: JobQueue, request: DatasetRequest
) -> Dataset:
    dataset = Dataset(name=request.name, kind=request.kind.value, path="")
    session.add(dataset)
    session.flush()
    dataset.path = str((settings.datasets_dir / f"{dataset.id}-{request.kind}").resolve())
    params = dataset_job.DatasetParams(
        dataset_id=dataset.id, size=request.size, max_classes=request.max_classes
    )
    try:
        job = create(session, settings, queue, dataset_job.TYPE, params)  # commits both rows
    except BaseException:
        session.execute(delete(Dataset).where(Dataset.id == dataset.id))
        session.commit()
        raise
    dataset.job_id = job.id
    session.commit()
    return dataset


def get_dataset(session: Session, settings: Settings, dataset_id: int) -> Dataset:
    fail_lost_jobs(session, settings)  # a lost build job makes its dataset `failed`
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} does not exist; GET /api/v1/datasets lists them")
    return dataset


def list_datasets(session: Session, settings: Settings) -> list[Dataset]:
    fail_lost_jobs(session, settings)
    return list(session.scalars(select(Dataset).order_by(Dataset.id)).unique())
