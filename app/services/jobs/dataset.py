"""`dataset`: build the IconThemes or CJK-Fonts benchmark from Debian packages into an
ImageFolder and record its summary, which makes the dataset ready (the `cpu` queue). Created
by POST /datasets (app.services.datasets), not by POST /jobs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from app.db.models import Dataset
from app.db.models.jobs import DatasetKind
from app.services.jobs.base import CPU_QUEUE, JobKind, JobParams, RowId

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

TYPE = "dataset"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = "dataset: dataset_id, size, max_classes (started by POST /datasets)"


class DatasetParams(JobParams):
    dataset_id: RowId
    size: int = Field(128, ge=32, le=512)
    max_classes: int | None = Field(None, ge=2)


def body(run: JobRun) -> dict[str, Any]:
    """Build the icons or cjk benchmark (Debian packages -> ImageFolder), then record its
    summary, which makes the dataset ready. A build cannot be interrupted half-way."""
    from app.services.datasets import summarize
    from training.data.benchmarks.cjk import build_cjk
    from training.data.benchmarks.icons import build_icons

    params = DatasetParams.model_validate(run.job.params)
    with run.session() as session:
        dataset = session.get_one(Dataset, params.dataset_id)
        kind, out = dataset.kind, Path(dataset.path)
    if kind == DatasetKind.icons:
        build_icons(out, size=params.size, progress=False)
    else:
        build_cjk(out, size=params.size, max_classes=params.max_classes, progress=False)
    run.check()
    summary = summarize(f"imagefolder:{out}")
    with run.session() as session:
        session.get_one(Dataset, params.dataset_id).summary = summary
        session.commit()
    return {"dataset_id": params.dataset_id, "summary": summary}


KIND = JobKind(TYPE, CPU_QUEUE, DatasetParams, body, DESCRIPTION, submittable=False)
