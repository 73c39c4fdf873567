"""`index`: re-embed a gallery with a model and switch it to a new index version in one
transaction (the `cpu` queue); searches use the old index until that commit."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Job
from app.db.models.jobs import ACTIVE_STATES
from app.index_store import IndexType
from app.services.errors import Conflict
from app.services.galleries import get_gallery
from app.services.jobs.base import CPU_QUEUE, JobKind, JobParams, RowId, must_exist
from app.services.models import get_model

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

log = logging.getLogger(__name__)

TYPE = "index"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = "index: gallery_id, model_id, index_type (result: index_version, embedded)"
SWITCH_ATTEMPTS = 5  # an index job re-embeds late uploads this many times before giving up


class IndexParams(JobParams):
    gallery_id: RowId
    model_id: RowId
    index_type: IndexType | None = Field(None, description="default: the gallery's type")


def validate(session: Session, settings: Settings, params: IndexParams) -> None:
    must_exist(get_gallery, session, params.gallery_id)
    must_exist(get_model, session, params.model_id)
    active = session.scalars(
        select(Job).where(Job.type == TYPE, Job.state.in_(list(ACTIVE_STATES)))
    ).all()
    for job in active:
        if job.params.get("gallery_id") == params.gallery_id:
            raise Conflict(
                f"job {job.id} is already re-indexing gallery {params.gallery_id}; wait for it "
                f"or cancel it (POST /api/v1/jobs/{job.id}/cancel)"
            )


def body(run: JobRun) -> dict[str, Any]:
    from app.services.galleries import switch_index
    from app.services.images import embed_missing

    params = IndexParams.model_validate(run.job.params)

    def progress(done: int, total: int) -> None:
        run.report(progress=0.9 * done / max(total, 1), step=done, total_steps=total)
        run.check()

    embedded = 0
    with run.session() as session:
        for _ in range(SWITCH_ATTEMPTS):
            embedded += embed_missing(
                run.runtime, session, params.gallery_id, params.model_id, progress=progress
            )
            run.check()
            try:
                gallery = switch_index(
                    run.runtime,
                    session,
                    params.gallery_id,
                    model_id=params.model_id,
                    index_type=params.index_type,
                )
                break
            except Conflict as error:  # uploads arrived meanwhile: embed those too
                log.info("job %d: %s; embedding the rest", run.id, error.message)
        else:
            raise Conflict(
                f"gallery {params.gallery_id} kept receiving images faster than they could be "
                f"embedded ({SWITCH_ATTEMPTS} attempts); run the index job again"
            )
        return {
            "gallery_id": gallery.id,
            "model_id": gallery.model_id,
            "index_type": gallery.index_type,
            "index_version": gallery.index_version,
            "embedded": embedded,
        }


KIND = JobKind(TYPE, CPU_QUEUE, IndexParams, body, DESCRIPTION, validate)
