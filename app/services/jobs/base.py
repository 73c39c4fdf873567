"""What every job kind shares: the queues, the parameters' base class, the `JobKind` record the
registry lists, the job's folder, and the checks several kinds make before queuing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset
from app.services.errors import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

# Two queues, so that cheap jobs never wait behind a training run (docs/jobs.md): `gpu` for
# training and evaluation (one at a time on a solo-pool worker), `cpu` for the rest.
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"

LOG_FILE = "job.log"
ARCHIVE_FILE = "upload.archive"

# A row id (PostgreSQL `integer`): a larger number is a 422 here, not an overflow in the driver.
RowId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class JobParams(BaseModel):
    """A job kind's parameters, stored in `jobs.params` as JSON; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


def no_checks(session: Session, settings: Settings, params: Any) -> None:
    """The default `JobKind.validate`: nothing to check beyond the parameters' own types."""


@dataclass(frozen=True)
class JobKind:
    """One kind of job: everything the API, the registry and the workers need to know of it.

    `validate` runs in the API before anything is queued and raises a ServiceError (4xx);
    `body` runs in a worker and returns the job's result. `check_upload`, for kinds that take a
    file with the request (an import's archive), refuses a wrong file before it is stored.
    `submittable`: False for kinds that another endpoint creates (dataset builds)."""

    name: str  # the job type: `jobs.type`, the `type` of POST /jobs
    queue: str
    params: type[JobParams]
    body: Callable[[JobRun], dict[str, Any]]
    description: str
    validate: Callable[[Session, Settings, Any], None] = no_checks
    check_upload: Callable[[BinaryIO], None] | None = None
    submittable: bool = True


def now() -> datetime:
    return datetime.now(UTC)


def job_dir(settings: Settings, job_id: int) -> Path:
    """The job's own folder: its log, its uploaded archive, a train job's run directory."""
    return settings.jobs_dir / str(job_id)


def log_tail(settings: Settings, job_id: int, lines: int) -> str:
    """The last `lines` lines of the job's log ("" before the job has started)."""
    path = job_dir(settings, job_id) / LOG_FILE
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        block, data = 64 * 1024, b""
        while size > 0 and data.count(b"\n") <= lines:
            step = min(block, size)
            size -= step
            handle.seek(size)
            data = handle.read(step) + data
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) + "\n" if text else ""


def ready_dataset(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise Invalid(f"dataset {dataset_id} does not exist; GET /api/v1/datasets lists them")
    if dataset.status != "ready":
        raise Conflict(
            f"dataset {dataset_id} is {dataset.status}, not ready; check GET "
            f"/api/v1/datasets/{dataset_id}"
        )
    return dataset


def folder_under_root(settings: Settings, folder: str) -> Path:
    """An existing folder inside Settings.dataset_root (relative to it, or absolute inside);
    symlinks that lead out of the root are refused."""
    if settings.dataset_root is None:
        raise Invalid(
            "server folders are disabled: set LOOKALIKE_DATASET_ROOT on the server, or upload "
            "an archive"
        )
    root = settings.dataset_root.resolve()
    outside = Invalid(f"{folder!r} is not a folder under the server's dataset root")
    try:
        path = (root / folder).resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as error:  # ValueError: a NUL in the path
        raise outside from error
    if not path.is_relative_to(root) or not path.is_dir():
        raise outside
    return path


def must_exist(lookup: Callable[[Session, int], object], session: Session, row_id: int) -> None:
    """A job parameter naming a missing gallery or model is a bad request (422), not a 404."""
    try:
        lookup(session, row_id)
    except NotFound as error:
        raise Invalid(error.message) from None
