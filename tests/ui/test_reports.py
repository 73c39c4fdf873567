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
        name = f"tsne2-model{model['id']}-dataset{dataset['id']}-test.json"
        cache = settings.data_dir / "reports" / name
        points = json.loads(cache.read_text())
        assert len(points["x"]) == len(points["y"]) == 20
        assert sorted(set(points["labels"])) == [0, 1, 2, 3]
        assert points["classes"] == ["t0", "t1", "t2", "t3"] and len(points["paths"]) == 20
        plots = f"{reports}/plots/tsne.png"
        views = {
            "subset": {"classes": ["t1", "t2"]},
            "thumbnails": {"thumbnails": "true"},
            "both": {"classes": ["t3"], "thumbnails": "true"},
        }
        drawn = {tsne.content}
        for view, params in views.items():
            response = client.get(plots, params={"dataset_id": dataset["id"], **params})
            assert response.status_code == 200 and response.content.startswith(PNG), view
            drawn.add(response.content)
        assert len(drawn) == 4  # each view draws another picture
        unknown_class = client.get(plots, params={"dataset_id": dataset["id"], "classes": "zz"})
        assert unknown_class.status_code == 422 and "no class 'zz'" in unknown_class.text
        too_many = client.get(
            plots, params={"dataset_id": dataset["id"], "classes": [f"c{i}" for i in range(21)]}
        )
        assert too_many.status_code == 422
        cache.write_text(json.dumps({**points, "classes": ["w", "x", "y", "z"]}))
        again = client.get(f"{reports}/plots/tsne.png", params={"dataset_id": dataset["id"]})
        assert again.status_code == 200 and again.content != tsne.content  # drawn from the cache

        # Two models side by side on the same split: the first by its training's metrics, the
        # second by an evaluate job on the dataset; none yet for the second, then one.
        other = client.post("/api/v1/models", data={"name": "other", "path": "tiny"}).json()
        compare = "/api/v1/reports/compare"
        both = {"models": [model["id"], other["id"]], "dataset_id": dataset["id"]}
        side = client.get(compare, params=both).json()
        assert [m["source"] for m in side["models"]] == ["test (training)", None]
        assert side["models"][0]["metrics"] == TEST and side["split"] == "test"
        assert client.get(f"{compare}.png", params=both).content.startswith(PNG)
        with client.app.state.session_factory() as session:
            evaluation = Job(
                type="evaluate",
                state="succeeded",
                queue="gpu",
                params={"model_id": other["id"], "dataset_id": dataset["id"], "split": "test"},
                result={"metrics": {"recall@1": 0.6, "recall@2": 0.7}},
            )
            session.add(evaluation)
            session.commit()
            evaluation_id = evaluation.id
        side = client.get(compare, params=both).json()
        assert side["models"][1]["source"] == f"test (evaluation job {evaluation_id})"
        assert side["models"][1]["metrics"] == {"recall@1": 0.6, "recall@2": 0.7}
        assert client.get(f"{compare}.png", params=both).content.startswith(PNG)
        nothing = client.get(
            f"{compare}.png", params={**both, "split": "val", "models": [other["id"]] * 2}
        )
        assert nothing.status_code == 404 and "evaluate them" in nothing.json()["detail"]
        for bad in ({"models": [model["id"]]}, {"models": [model["id"], 2**40]}, {"split": "x"}):
            assert client.get(compare, params={**both, **bad}).status_code == 422, bad
        assert client.get(compare, params={**both, "models": [model["id"], 999]}).status_code == 404

        assert client.get("/api/v1/reports/models/999").status_code == 404
        unknown = client.get(reports, params={"dataset_id": 999})
        assert unknown.status_code == 404 and "dataset 999" in unknown.json()["detail"]
