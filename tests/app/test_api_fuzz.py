"""Property-based fuzzing of the live API against its own OpenAPI document (schemathesis),
with the API key, on SQLite and on PostgreSQL (issue 17): requests that follow the document and
requests that break it; no answer is a 5xx, and every answer's status, content type and body
are the ones the document declares for that operation.

Bounded for CI: `FUZZ_EXAMPLES` generated requests per operation, hypothesis derandomised from
`FUZZ_SEED`, so a run is reproducible; each failure is reported with a curl command that
repeats it. `LOOKALIKE_FUZZ_EXAMPLES=500 pytest tests/app/test_api_fuzz.py` fuzzes longer."""

from __future__ import annotations

import os
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, strategies
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.config import Settings
from app.local import serve_processes
from tests.app.conftest import png
from tests.conftest import free_port

FUZZ_SEED = 20261203
FUZZ_EXAMPLES = int(os.environ.get("LOOKALIKE_FUZZ_EXAMPLES", "40"))
KEY = "fuzz-key"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def live_api(tmp_path, database_url: str, model_root) -> Iterator[str]:
    """The API over HTTP (uvicorn, no job workers) with a model, a gallery and two images, so
    that id 1 of each exists for the generated requests that hit it."""
    import httpx

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        model_root=model_root,
        dataset_root=tmp_path,
        seed_builtin_model=False,
        api_keys=[KEY],
        embed_max_wait_ms=1.0,
        threads=1,
    )
    with serve_processes(settings, port=free_port(), workers=False) as service:
        headers = {"X-API-Key": KEY}
        with httpx.Client(base_url=service.url, headers=headers, timeout=30) as client:
            model = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"})
            assert model.status_code == 201, model.text
            gallery = client.post(
                "/api/v1/galleries", json={"name": "g", "model_id": model.json()["id"]}
            )
            upload = client.post(
                f"/api/v1/galleries/{gallery.json()['id']}/images",
                files=[("files", ("a.png", png(0, 0))), ("files", ("b.png", png(1, 0)))],
                data={"label": ["a", "b"]},
            )
            assert upload.status_code == 201, upload.text
        yield service.url


def _fuzz(operation, base_url: str) -> None:
    """Up to FUZZ_EXAMPLES requests to `operation`; raises schemathesis's report (with a curl
    command that repeats the request) on the first answer that breaks a check."""

    @hypothesis.seed(FUZZ_SEED)
    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(
        case=strategies.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )
    )
    def fuzz(case) -> None:
        response = case.call(base_url=base_url, headers={"X-API-Key": KEY}, timeout=30)
        case.validate_response(response, checks=CHECKS, headers={"X-API-Key": KEY})

    fuzz()


def test_the_api_keeps_its_openapi_contract_under_fuzzing(live_api: str):
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        try:
            _fuzz(operation, live_api)
        except (Exception, BaseExceptionGroup) as error:
            failures.append(f"{operation.label}:\n{error}")
    assert operations >= 30
    assert not failures, "\n\n".join(failures)
