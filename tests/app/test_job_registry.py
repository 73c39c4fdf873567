"""The job registry is the only list of job kinds: the worker's tasks, the Celery routes, the
API's type filter and submission all follow it, and the worked example in docs/jobs.md is a
kind that works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.services.errors import Invalid
from app.services.jobs import registry, submission
from app.services.jobs.base import JobKind

ROOT = Path(__file__).resolve().parents[2]


def documented_example() -> JobKind:
    text = (ROOT / "docs/jobs.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/jobs.md", "exec", dont_inherit=True), namespace)
    kind = namespace["KIND"]
    assert isinstance(kind, JobKind)
    return kind


def test_every_kind_has_a_worker_task_routed_to_its_queue() -> None:
    import app.worker.tasks  # noqa: F401  (registers the tasks on the shared app)
    from app.worker.celery_app import celery_app

    routes = celery_app.conf.task_routes
    for job_type, kind in registry.KINDS.items():
        name = registry.task_name(job_type)
        assert name in celery_app.tasks, name
        assert routes[name] == {"queue": kind.queue}
    assert set(registry.QUEUES) == {"cpu", "gpu"}


def test_the_api_filter_and_submission_follow_the_registry() -> None:
    assert [member.value for member in registry.JobType] == list(registry.KINDS)
    with pytest.raises(Invalid, match=r"choose one of train, evaluate, index, import, cluster$"):
        registry.submittable_kind("dataset")  # built by POST /datasets only
    assert registry.submittable_kind("index") is registry.KINDS["index"]


def test_the_documented_example_is_a_working_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    kind = documented_example()
    assert (kind.name, kind.queue, kind.submittable) == ("prune", "cpu", True)
    monkeypatch.setitem(registry.KINDS, kind.name, kind)
    assert registry.submittable_kind("prune") is kind
    params = submission.parse_params(kind, {"gallery_id": 3, "before": "2026-01-01T00:00:00Z"})
    assert params.model_dump(mode="json")["gallery_id"] == 3
    with pytest.raises(Invalid, match="invalid params for a prune job: gallery_id"):
        submission.parse_params(kind, {"gallery_id": 0, "before": "2026-01-01T00:00:00Z"})
    with pytest.raises(Invalid, match="extra"):
        submission.parse_params(kind, {"gallery_id": 3, "before": "2026-01-01", "extra": 1})


def test_presets_are_served_from_the_library_recommended_first(tmp_path, model_root) -> None:
    from tests.app.conftest import make_client
    from training.config import list_presets

    with make_client(tmp_path, model_root) as client:
        presets = client.get("/api/v1/presets").json()
    names = [preset["name"] for preset in presets]
    assert sorted(names) == list_presets()  # every preset file, once
    assert names[:3] == ["dvml-icons", "dvml-cjk", "dvml"]
    assert [p["recommended"] for p in presets].count(True) == 3
    by_name = {preset["name"]: preset for preset in presets}
    assert by_name["diva-cjk"]["method"] == "diva" and by_name["icons"]["method"] == "margin"
    assert "IconThemes" in by_name["dvml-icons"]["description"]
