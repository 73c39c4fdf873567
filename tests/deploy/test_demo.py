"""`lookalike demo`'s own pieces (the whole demo is measured by hand: README, Quick start)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.testclient import TestClient

from app.demo import by_name, multipart, progress_line


def test_multipart_body_is_what_fastapi_parses(tmp_path: Path) -> None:
    app = FastAPI()

    @app.post("/echo")
    def echo(image: UploadFile = File(...), k: int = Form(...)) -> dict:
        return {"name": image.filename, "size": len(image.file.read()), "k": k}

    path = tmp_path / "query.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    body, content_type = multipart({"k": "5"}, [("image", path)])
    response = TestClient(app).post("/echo", content=body, headers={"Content-Type": content_type})
    assert response.json() == {"name": "query.png", "size": 264, "k": 5}


def test_progress_line_and_lookup() -> None:
    job = {
        "type": "train",
        "state": "running",
        "progress": 0.25,
        "epoch": 2,
        "step": 50,
        "total_steps": 200,
        "metrics": {"loss": 0.5, "note": "x"},
        "eta": "2026-01-01T10:00:00Z",
    }
    assert progress_line(job) == "running, 25%, epoch 2, step 50/200, loss 0.500"
    assert progress_line({**job, "type": "index"}).endswith("eta 10:00:00 UTC")
    assert progress_line({**job, "state": "queued"}) == "queued"
    assert by_name([{"name": "a"}, {"name": "b"}], "b") == {"name": "b"}
    assert by_name([], "b") is None
