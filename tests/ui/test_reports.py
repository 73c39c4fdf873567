"""The evaluation-report routes the web interface draws its report from (no browser needed):
metrics gathered from the model card, a finished train job's per-epoch metrics and evaluate
jobs; PNG plots; the t-SNE map computed once and cached under DATA_DIR/reports."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.db.models import Job
from app.main import create_app
from tests.app.conftest import write_tiny_artifact
from tests.conftest import write_image_folder

PNG = b"\x89PNG\r\n\x1a\n"
VAL = {"recall@1": 0.8, "recall@2": 0.9, "recall@4": 1.0, "nmi": 0.6}
TEST = {"recall@1": 0.4, "recall@2": 0.55, "recall@4": 0.7, "nmi": 0.35}
TRAIN = {"recall@1": 0.95, "recall@2": 0.97, "recall@4": 0.99}


def _settings(root: Path) -> Settings:
    write_tiny_artifact(root / "models-in" / "tiny")
    card_path = root / "models-in" / "tiny" / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = {"epoch": 1, "val": VAL, "test": TEST, "train": TRAIN}
    card_path.write_text(json.dumps(card))
    write_image_folder(root / "datasets" / "tiny" / "train", ["a", "b", "c"], per_class=4)
    write_image_folder(
        root / "datasets" / "tiny" / "test", [f"t{i}" for i in range(4)], per_class=5, offset=3
    )
    return Settings(
        data_dir=root / "data",
        database_url="",
        model_root=root / "models-in",
        dataset_root=root / "datasets",
        seed_builtin_model=False,
        auto_api_key=False,
        embed_max_wait_ms=1.0,
        threads=1,
    )


def test_a_models_report_and_its_plots(tmp_path):
    settings = _settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        model = client.post("/api/v1/models", data={"name": "tiny", "path": "tiny"}).json()
        reports = f"/api/v1/reports/models/{model['id']}"

        # Only the card's metrics: no dataset, no train job.
        report = client.get(reports).json()
        assert report["dataset"] is None and report["train_job_id"] is None
        assert [s["name"] for s in report["sources"]] == [
            "val (training)",
            "test (training)",
            "train (training)",
        ]
        assert report["recall_curves"]["test (training)"] == {"1": 0.4, "2": 0.55, "4": 0.7}
        assert report["memorisation"] == {"train": 0.95, "test": 0.4}
        assert report["plots"] == ["recall", "memorisation"]
        for name in ("recall", "memorisation"):
            plot = client.get(f"{reports}/plots/{name}.png")
            assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
            assert plot.content.startswith(PNG)
        missing = client.get(f"{reports}/plots/training.png")
        assert missing.status_code == 404 and "no data" in missing.json()["detail"]
        assert client.get(f"{reports}/plots/pie.png").status_code == 404

        # A dataset and a finished train job of this model on it (its run's metrics.jsonl,
        # the last line cut short as by a crash).
        dataset = client.post(
            "/api/v1/datasets", json={"name": "tiny", "kind": "imagefolder", "path": "tiny"}
        ).json()
        run = tmp_path / "run"
        run.mkdir()
        lines = [
            {"epoch": 0, "iteration": 2, "loss": 0.5, "val": {"recall@1": 0.5}},
            {"epoch": 1, "iteration": 4, "loss": 0.3, "val": {"recall@1": 0.8}},
        ]
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 2, "lo'
        )
        with client.app.state.session_factory() as session:
            job = Job(
                type="train",
                state="succeeded",
                queue="gpu",
                params={"dataset_id": dataset["id"], "method": "margin"},
                result={"model_id": model["id"], "run_dir": str(run)},
            )
            session.add(job)
            session.commit()
            job_id = job.id

        report = client.get(reports).json()  # the dataset defaults to the training one
        assert report["dataset"]["id"] == dataset["id"] and report["train_job_id"] == job_id
        assert [(e["epoch"], e["loss"], e["val"]["recall@1"]) for e in report["epochs"]] == [
            (0, 0.5, 0.5),
            (1, 0.3, 0.8),
        ]
        assert report["plots"] == ["recall", "training", "memorisation", "tsne"]
        assert client.get(f"{reports}/plots/training.png").content.startswith(PNG)

        tsne = client.get(f"{reports}/plots/tsne.png", params={"dataset_id": dataset["id"]})
        assert tsne.status_code == 200, tsne.text
        assert tsne.content.startswith(PNG)
        name = f"tsne-model{model['id']}-dataset{dataset['id']}-test.json"
        cache = settings.data_dir / "reports" / name
        points = json.loads(cache.read_text())
        assert len(points["x"]) == len(points["y"]) == 20
        assert sorted(set(points["labels"])) == [0, 1, 2, 3]
        assert points["classes"] == ["t0", "t1", "t2", "t3"]
        cache.write_text(json.dumps({**points, "classes": ["w", "x", "y", "z"]}))
        again = client.get(f"{reports}/plots/tsne.png", params={"dataset_id": dataset["id"]})
        assert again.status_code == 200 and again.content != tsne.content  # drawn from the cache

        assert client.get("/api/v1/reports/models/999").status_code == 404
        unknown = client.get(reports, params={"dataset_id": 999})
        assert unknown.status_code == 404 and "dataset 999" in unknown.json()["detail"]
