"""Datasets for train and evaluate jobs: register (a folder under the dataset root, or a
benchmark a worker builds), list, show."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import JobQueueDep, ReadAccess, SessionDep, SettingsDep, WriteAccess
from app.api.schemas import API, DatasetOut, Id
from app.services import datasets as service
from app.services.datasets import DatasetRequest

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post(
    "",
    response_model=DatasetOut,
    status_code=201,
    dependencies=[WriteAccess],
    responses={202: {"model": DatasetOut, "description": "Accepted: a worker builds it."}},
)
def register_dataset(
    body: DatasetRequest,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    queue: JobQueueDep,
) -> DatasetOut:
    """A folder dataset is read at once (201); icons and cjk are built by a worker (202, the
    dataset is `building` until its job succeeds)."""
    dataset = service.register(session, settings, queue, body)
    response.headers["Location"] = f"{API}/datasets/{dataset.id}"
    if dataset.job_id is not None:
        response.status_code = 202
    return DatasetOut.of(dataset)


@router.get("", response_model=list[DatasetOut], dependencies=[ReadAccess])
def list_datasets(session: SessionDep, settings: SettingsDep) -> list[DatasetOut]:
    return [DatasetOut.of(d) for d in service.list_datasets(session, settings)]


@router.get("/{dataset_id}", response_model=DatasetOut, dependencies=[ReadAccess])
def get_dataset(dataset_id: Id, session: SessionDep, settings: SettingsDep) -> DatasetOut:
    return DatasetOut.of(service.get_dataset(session, settings, dataset_id))
