"""A training job's progress on its row: the trainer's phase in the metrics, its ETA as it is."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.db.models import Job
from app.services.jobs.base import now
from app.services.jobs.lifecycle import JobRun, claim
from app.services.jobs.train import training_reporter
from app.services.runtime import Runtime
from tests.app.conftest import migrated_runtime, worker_settings


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with migrated_runtime(worker_settings(tmp_path)) as started:
        yield started


def _seconds_left(runtime: Runtime, job_id: int) -> float:
    with runtime.session_factory() as session:
        eta = session.get(Job, job_id).eta
    eta = eta if eta.tzinfo else eta.replace(tzinfo=UTC)  # SQLite hands back naive UTC
    return (eta - now()).total_seconds()


def test_an_eta_from_the_job_body_wins_over_the_linear_estimate(runtime):
    with runtime.session_factory() as session:
        job = Job(type="train", queue="gpu", params={})
        session.add(job)
        session.commit()
        job_id = job.id
    run = JobRun(runtime, claim(runtime, job_id, "w@host"), "w@host")
    # Half done a moment after the start: linearly, the job ends about now.
    run.report(progress=0.5, force=True)
    assert _seconds_left(runtime, job_id) < 60
    # A time budget says otherwise: ten more minutes.
    run.report(progress=0.5, eta_s=600.0, force=True)
    assert 540 < _seconds_left(runtime, job_id) <= 600


def test_training_progress_goes_to_the_row_with_its_phase_and_eta():
    calls: list[dict[str, Any]] = []
    report = training_reporter(SimpleNamespace(report=lambda **values: calls.append(values)))
    where = {"epoch": 1, "iteration": 3, "total_iterations": 10, "elapsed_s": 5.0}
    report({**where, "phase": "train", "done": 3, "total": 10, "progress": 0.2, "eta_s": 20.0,
            "loss": 0.7})  # fmt: skip
    report({**where, "phase": "validate", "done": 32, "total": 64, "progress": 0.3, "eta_s": 12.0})
    assert calls[-1] == {
        "progress": 0.3,
        "eta_s": 12.0,
        "epoch": 1,
        "step": 3,
        "total_steps": 10,
        # The loss of the last training report stays shown while validation runs.
        "metrics": {"phase": "validate", "phase_done": 32, "phase_total": 64, "loss": 0.7},
        "force": True,
    }
