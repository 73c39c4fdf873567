"""Evaluation reports (read-only, for the web interface): a model's metrics on a dataset from
its training and evaluate jobs, and the report's plots as PNG."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response

from app.api.deps import ReadAccess, SessionDep, SettingsDep
from app.api.schemas import MAX_INT, Id
from app.services import reports as service

router = APIRouter(prefix="/reports", tags=["reports"], dependencies=[ReadAccess])

DatasetId = Annotated[
    int | None,
    Query(
        le=MAX_INT,
        description="The dataset (default: the one the model was trained on by a train job).",
    ),
]


@router.get("/models/{model_id}")
def model_report(model_id: Id, session: SessionDep, dataset_id: DatasetId = None) -> dict[str, Any]:
    """Metrics per split and source (`sources`: the model card's val/test/train metrics from
    training, the latest evaluate job per split on the dataset), Recall@K curves, per-epoch
    training metrics (`epochs`), train vs test Recall@1 (`memorisation`) and the names of the
    plots that have data (`plots`; fetch them from `.../plots/{name}.png`)."""
    return service.build_report(session, model_id, dataset_id).as_dict()


@router.get(
    "/models/{model_id}/plots/{name}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def model_report_plot(
    model_id: Id,
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    dataset_id: DatasetId = None,
    split: Annotated[Literal["test", "train"], Query(description="t-SNE only.")] = "test",
) -> Response:
    """One plot: `recall`, `training`, `memorisation` or `tsne` (the split's embeddings by the
    model mapped to 2-D, coloured by class; computed on first request, then cached)."""
    report = service.build_report(session, model_id, dataset_id)
    png = service.plot(settings, session, report, name, split)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})
