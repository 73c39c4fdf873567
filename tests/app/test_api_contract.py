"""The OpenAPI document tells the truth (issue 17, item 11): one error body, every error status
declared, security as configured, 405 with every allowed method."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app

API = "/api/v1"


def test_every_error_answer_has_the_declared_error_body(client: TestClient):
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and schemas["Error"]["required"] == ["detail"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if int(code) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    upload = document["paths"][f"{API}/galleries/{{gallery_id}}/images"]["post"]["responses"]
    assert {"201", "207", "400", "404", "413", "415", "422"} <= set(upload)
    assert "202" in document["paths"][f"{API}/datasets"]["post"]["responses"]
    invalid = client.post(f"{API}/galleries", json={"name": ""})
    assert invalid.status_code == 422 and isinstance(invalid.json()["detail"], str)


def test_security_is_declared_as_configured(tmp_path: Path, model_root: Path):
    def document(**overrides) -> dict:
        settings = Settings(
            data_dir=tmp_path / "data", model_root=model_root, seed_builtin_model=False, **overrides
        )
        return create_app(settings).openapi()

    def secured(doc: dict) -> set[str]:
        return {
            f"{method.upper()} {path}"
            for path, operations in doc["paths"].items()
            for method, operation in operations.items()
            if operation.get("security")
        }

    open_reads = secured(document(api_keys=["k"]))
    assert f"POST {API}/galleries" in open_reads and f"GET {API}/galleries" not in open_reads
    assert f"POST {API}/galleries/{{gallery_id}}/search" not in open_reads
    closed = secured(document(api_keys=["k"], open_reads=False))
    assert {f"GET {API}/galleries", "GET /metrics"} <= closed
    assert secured(document(auto_api_key=False)) == set()  # no key: every route is open


def test_405_lists_every_method_and_literal_paths_are_not_captured(client: TestClient):
    captured = client.get(f"{API}/jobs/import")
    assert captured.status_code == 405 and captured.headers["allow"] == "POST"
    put = client.put(f"{API}/galleries")
    assert put.status_code == 405
    assert set(put.headers["allow"].split(", ")) == {"GET", "POST"}
    assert client.get(f"{API}/jobs/12345").status_code == 404
    assert client.get(f"{API}/nothing-here").status_code == 404
