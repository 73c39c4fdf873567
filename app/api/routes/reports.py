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
    classes: Annotated[
        list[str] | None,
        Query(
            max_length=service.TSNE_MAX_COLOURED,
            description="t-SNE only: the classes to colour (others are grey); default: all, "
            "or the 10 most frequent when there are more than 20.",
        ),
    ] = None,
    thumbnails: Annotated[
        bool, Query(description="t-SNE only: draw a sample of the images at their points.")
    ] = False,
) -> Response:
    """One plot: `recall`, `training`, `memorisation` or `tsne` (the split's embeddings by the
    model mapped to 2-D, coloured by class; computed on first request, then cached)."""
    report = service.build_report(session, model_id, dataset_id)
    view = service.TsneView(classes=classes or None, thumbnails=thumbnails)
    png = service.plot(settings, session, report, name, split, view)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


ModelIds = Annotated[list[int], Query(min_length=2, max_length=6, description="2 to 6 model ids.")]
CompareDataset = Annotated[int, Query(ge=1, le=MAX_INT, description="The dataset.")]
Split = Annotated[Literal["test", "train", "val"], Query()]


@router.get("/compare")
def compare_models(
    session: SessionDep, models: ModelIds, dataset_id: CompareDataset, split: Split = "test"
) -> dict[str, Any]:
    """Models side by side on one split of one dataset: each one's latest evaluate job there,
    else its training's metrics when it was trained on this dataset (`source` null: neither;
    run an evaluate job)."""
    return service.compare_models(session, models, dataset_id, split).as_dict()


@router.get(
    "/compare.png", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
def compare_plot(
    session: SessionDep, models: ModelIds, dataset_id: CompareDataset, split: Split = "test"
) -> Response:
    """The models' Recall@K curves on one plot."""
    png = service.compare_png(service.compare_models(session, models, dataset_id, split))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})
