"""`evaluate`: a model's retrieval metrics (Recall@K, MAP@R, NMI, ...) on a split of a
registered dataset (the `gpu` queue)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services.jobs.base import GPU_QUEUE, JobKind, JobParams, RowId, must_exist, ready_dataset
from app.services.models import get_model

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

TYPE = "evaluate"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = "evaluate: model_id, dataset_id, split, max_classes (result: metrics)"


class EvaluateParams(JobParams):
    model_id: RowId
    dataset_id: RowId
    split: Literal["test", "train"] = "test"
    max_classes: int | None = Field(None, ge=2)


def validate(session: Session, settings: Settings, params: EvaluateParams) -> None:
    must_exist(get_model, session, params.model_id)
    ready_dataset(session, params.dataset_id)


def body(run: JobRun) -> dict[str, Any]:
    from app.services.models import artifact_dir
    from training.engine.trainer import resolve_device
    from training.evaluation.embed import embed_split_with_artifact, load_split
    from training.evaluation.metrics import evaluate_embeddings

    params = EvaluateParams.model_validate(run.job.params)
    with run.session() as session:
        model = get_model(session, params.model_id)
        dataset = ready_dataset(session, params.dataset_id)
    split, skipped = load_split(dataset.spec, params.split, params.max_classes)
    run.report(progress=0.05, force=True)
    run.check()
    embeddings, labels = embed_split_with_artifact(
        artifact_dir(run.settings, model),
        split,
        device=resolve_device(run.settings.worker_device),
        num_workers=run.settings.worker_num_workers,
    )
    run.report(progress=0.8, force=True)
    run.check()
    metrics = evaluate_embeddings(embeddings, labels)
    run.report(metrics=metrics, force=True)
    return {
        "model_id": model.id,
        "dataset_id": dataset.id,
        "split": params.split,
        "classes": split.num_classes,
        "images": len(split),
        "skipped_unreadable": len(skipped),
        "metrics": metrics,
    }


KIND = JobKind(TYPE, GPU_QUEUE, EvaluateParams, body, DESCRIPTION, validate)
