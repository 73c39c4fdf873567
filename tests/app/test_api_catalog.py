"""Models and galleries over HTTP: registration (path, upload), cards, conflicts, index switches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.app.conftest import png, write_tiny_artifact
from training import export
from training.evaluation.cluster_classifier import ClusterClassifier
from training.export import ONNX_FILE, ONNX_RECORD
from training.fsutil import file_digest

API = "/api/v1"


def test_model_registration_by_path_and_upload(client: TestClient, tiny_model: int, model_root):
    card = client.get(f"{API}/models/{tiny_model}").json()
    assert card["embedding_dim"] == 16 and card["method"] == "margin" and not card["builtin"]
    assert card["card"]["preprocessing"]["image_size"] == 32
    assert [m["id"] for m in client.get(f"{API}/models").json()] == [tiny_model]

    files = {
        "card": ("card.json", (model_root / "tiny" / "card.json").read_bytes()),
        "weights": ("model.safetensors", (model_root / "tiny" / "model.safetensors").read_bytes()),
    }
    uploaded = client.post(f"{API}/models", data={"name": "tiny-upload"}, files=files)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["card"] == card["card"]

    taken = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"})
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]
    broken = client.post(
        f"{API}/models",
        data={"name": "broken"},
        files={"card": ("card.json", b"{}"), "weights": ("model.safetensors", b"junk")},
    )
    assert broken.status_code == 422 and "not a valid model artifact" in broken.json()["detail"]
    not_text = client.post(
        f"{API}/models",
        data={"name": "not-text"},
        files={"card": ("card.json", b"\xff\xfe{"), "weights": ("model.safetensors", b"junk")},
    )
    assert not_text.status_code == 422 and "corrupt" in not_text.json()["detail"]
    neither = client.post(f"{API}/models", data={"name": "nothing"})
    assert neither.status_code == 422
    assert client.get(f"{API}/models/999").status_code == 404


def test_model_paths_outside_the_root_are_refused(client: TestClient, model_root: Path, tmp_path):
    outside = write_tiny_artifact(tmp_path / "elsewhere")
    link = model_root / f"escape-{os.getpid()}-{tmp_path.name}"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in (
            "../elsewhere",
            str(outside),
            link.name,
            "/etc",
            "tiny/../../x",
            "missing",
        ):
            response = client.post(f"{API}/models", data={"name": "evil", "path": path})
            assert response.status_code == 422, path
            assert (
                "not a model directory under the server's model root" in response.json()["detail"]
            )
        nul = client.post(f"{API}/models", data={"name": "evil", "path": "ti\x00ny"})
        assert nul.status_code == 422 and "NUL character" in nul.json()["detail"]
    finally:
        link.unlink()
    models_dir = client.app.state.settings.models_dir
    assert [p.name for p in models_dir.iterdir() if p.name.startswith(".")] == []


def test_gallery_lifecycle_and_index_switch(client: TestClient, tiny_model: int):
    created = client.post(f"{API}/galleries", json={"name": "g", "model_id": tiny_model})
    assert created.status_code == 201
    gallery = created.json()
    assert gallery["index_type"] == "flat" and gallery["index_version"] == 1
    gid = gallery["id"]
    assert (
        client.post(f"{API}/galleries", json={"name": "g", "model_id": tiny_model}).status_code
        == 409
    )
    unknown = client.post(f"{API}/galleries", json={"name": "h", "model_id": 12345})
    assert unknown.status_code == 404 and "model 12345 does not exist" in unknown.json()["detail"]
    bad_type = client.post(
        f"{API}/galleries", json={"name": "h", "model_id": tiny_model, "index_type": "lsh"}
    )
    assert bad_type.status_code == 422 and "index_type" in bad_type.json()["detail"]
    # Index parameters the build would fail on (at the first search) are refused at once.
    for kind, params, problem in (
        ("hnsw", {"m": "x"}, "must be an integer from 1 to 128"),
        ("hnsw", {"M": 8}, "unknown index parameter 'M'"),
        ("ivfpq", {"nlist": -5}, "must be an integer from 1 to 65536"),
        # Unbounded values would make the next search or build exhaust memory.
        ("hnsw", {"ef_search": 2147483647}, "must be an integer from 1 to 4096"),
        ("hnsw", {"ef_search": 2**70}, "outside the 64-bit integer range"),
        ("hnsw", {"ef_construction": 1e300}, "must be an integer from 1 to 4096"),
        ("hnsw", {"m": 1}, "at least 2"),
        ("hnsw", {"m": 4096}, "must be an integer from 1 to 128"),
        ("ivfpq", {"nprobe": 10**6}, "must be an integer from 1 to 65536"),
        ("ivfpq", {"m": 5}, "must divide the model's dimension 16"),
        ("flat", {"compact_fraction": 2}, "must be a number in (0, 1]"),
    ):
        body = {"name": "h", "model_id": tiny_model, "index_type": kind, "index_params": params}
        refused = client.post(f"{API}/galleries", json=body)
        assert refused.status_code == 422 and problem in refused.json()["detail"], params
        patch = {"index_type": kind, "index_params": params}
        refused = client.patch(f"{API}/galleries/{gid}", json=patch)
        assert refused.status_code == 422 and problem in refused.json()["detail"], params
    assert [g["id"] for g in client.get(f"{API}/galleries").json()] == [gid]
    assert client.get(f"{API}/galleries/{gid}").json()["index_version"] == 1

    files = [("files", (f"{i}.png", png(i % 3, i), "image/png")) for i in range(6)]
    assert client.post(f"{API}/galleries/{gid}/images", files=files).status_code == 201
    # Not searched yet (its index is not loaded in this process): the size is still reported.
    assert client.get(f"{API}/galleries/{gid}").json()["index_size"] == 6
    assert [g["index_size"] for g in client.get(f"{API}/galleries").json()] == [6]
    query = {"image": ("q.png", png(1, 1), "image/png")}
    before = client.post(f"{API}/galleries/{gid}/search", files=query, data={"k": "6"}).json()

    # A model in use cannot be deleted.
    in_use = client.delete(f"{API}/models/{tiny_model}")
    assert in_use.status_code == 409 and "used by 1 galleries" in in_use.json()["detail"]

    # Another index type: a new version built from the stored embeddings, same exact ranking.
    switched = client.patch(
        f"{API}/galleries/{gid}", json={"index_type": "hnsw", "index_params": {"ef_search": 32}}
    )
    assert switched.status_code == 200, switched.text
    assert switched.json()["index_type"] == "hnsw" and switched.json()["index_version"] == 2
    after = client.post(f"{API}/galleries/{gid}/search", files=query, data={"k": "6"}).json()
    assert after["index_version"] == 2
    assert [h["image_id"] for h in after["results"]] == [h["image_id"] for h in before["results"]]

    listed = client.get(f"{API}/galleries").json()
    assert [(g["id"], g["image_count"], g["index_size"]) for g in listed] == [(gid, 6, 6)]
    assert client.delete(f"{API}/galleries/{gid}").status_code == 204
    assert client.get(f"{API}/galleries/{gid}").status_code == 404
    assert not (client.app.state.settings.uploads_dir / str(gid)).exists()
    assert client.delete(f"{API}/models/{tiny_model}").status_code == 204
    assert client.get(f"{API}/models/{tiny_model}").status_code == 404


def test_magnet_model_classifies_with_its_clusters(client: TestClient, tmp_path: Path):
    centroids = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    classifier = ClusterClassifier(centroids, torch.tensor([0, 0, 1, 1]), 0.5)
    artifact = write_tiny_artifact(
        client.app.state.settings.model_root / f"magnet-{tmp_path.name}",
        method={"name": "magnet", "params": {}, "class_names": ["round", "square"]},
        extras=classifier.to_extras(),
    )
    try:
        model = client.post(f"{API}/models", data={"name": "magnet", "path": artifact.name})
        assert model.status_code == 201 and model.json()["method"] == "magnet"
        gid = client.post(
            f"{API}/galleries", json={"name": "m", "model_id": model.json()["id"]}
        ).json()["id"]
        files = [("files", (f"{i}.png", png(i, 0), "image/png")) for i in range(3)]
        client.post(f"{API}/galleries/{gid}/images", files=files, data={"label": ["x", "y", "x"]})
        response = client.post(
            f"{API}/galleries/{gid}/classify",
            files=[("images", ("q.png", png(0, 0), "image/png"))],
            data={"k": "3"},
        )
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["label"] == "x"
        assert prediction["cluster_label"] in {"round", "square"}
        assert abs(sum(prediction["cluster_probabilities"].values()) - 1.0) < 1e-5
    finally:
        shutil.rmtree(artifact)


def test_an_approximate_index_is_suggested_by_the_cost_of_exact_search(
    client: TestClient, tiny_model: int
):
    gid = client.post(f"{API}/galleries", json={"name": "g", "model_id": tiny_model}).json()["id"]
    files = [("files", (f"{i}.png", png(i % 3, i), "image/png")) for i in range(4)]
    assert client.post(f"{API}/galleries/{gid}/images", files=files).status_code == 201
    assert client.get(f"{API}/galleries/{gid}").json()["suggested_index_type"] is None
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    runtime.settings.exact_search_budget_ms = 1e-9  # 4 x 16 floats now cost too much
    assert client.get(f"{API}/galleries/{gid}").json()["suggested_index_type"] == "hnsw"
    query = {"image": ("q.png", png(1, 1), "image/png")}
    assert client.post(f"{API}/galleries/{gid}/search", files=query).status_code == 200
    assert client.get(f"{API}/galleries/{gid}").json()["suggested_index_type"] == "hnsw"
    switched = client.patch(f"{API}/galleries/{gid}", json={"index_type": "hnsw"})
    assert switched.json()["suggested_index_type"] is None


def test_registration_makes_its_own_checked_export(client: TestClient, model_root: Path, tmp_path):
    carrying = write_tiny_artifact(model_root / f"carrying-{tmp_path.name}")
    foreign = b"a graph the server did not make"
    (carrying / ONNX_FILE).write_bytes(foreign)
    record = {
        "weights_sha256": export.weights_digest(carrying),
        "onnx_sha256": file_digest(carrying / ONNX_FILE),
    }
    (carrying / ONNX_RECORD).write_text(json.dumps(record))
    response = client.post(f"{API}/models", data={"name": "carrying", "path": carrying.name})
    assert response.status_code == 201, response.text
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    stored = [p for p in runtime.settings.models_dir.iterdir() if not p.name.startswith(".")]
    assert len(stored) == 1
    assert (stored[0] / ONNX_FILE).read_bytes() != foreign
    assert export.current_export(stored[0]) == stored[0] / ONNX_FILE
    gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": response.json()["id"]})
    query = {"image": ("q.png", png(1, 1), "image/png")}
    search = client.post(f"{API}/galleries/{gallery.json()['id']}/search", files=query)
    assert search.status_code == 200
    assert runtime.embedders.get(str(response.json()["id"]), stored[0]).embedder.backend == (
        "onnxruntime"
    )


def test_a_gallery_whose_stored_index_settings_fail_does_not_stop_the_service(
    api_settings, tiny_model: int, client: TestClient
):
    from sqlalchemy import update

    from app.db.models import Gallery
    from app.main import create_app

    gid = client.post(f"{API}/galleries", json={"name": "g", "model_id": tiny_model}).json()["id"]
    files = [("files", (f"{i}.png", png(i % 3, i), "image/png")) for i in range(3)]
    assert client.post(f"{API}/galleries/{gid}/images", files=files).status_code == 201
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with runtime.session_factory() as session:  # stored by an older version, or by hand
        session.execute(
            update(Gallery)
            .where(Gallery.id == gid)
            .values(index_type="hnsw", index_params={"ef_search": "many"}, index_version=2)
        )
        session.commit()
    with TestClient(create_app(api_settings)) as restarted:  # starts all the same
        ready = restarted.get("/readyz")
        assert ready.status_code == 200
        assert "ValueError" in ready.json()["unavailable_galleries"][str(gid)]
        query = {"image": ("q.png", png(1, 1), "image/png")}
        refused = restarted.post(f"{API}/galleries/{gid}/search", files=query)
        assert refused.status_code == 503 and "PATCH the gallery" in refused.json()["detail"]
        fixed = restarted.patch(
            f"{API}/galleries/{gid}", json={"index_type": "hnsw", "index_params": {"ef_search": 16}}
        )
        assert fixed.status_code == 200, fixed.text
        found = restarted.post(f"{API}/galleries/{gid}/search", files=query)
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        assert restarted.get("/readyz").json()["unavailable_galleries"] == {}


def test_index_settings_that_fail_to_build_are_never_committed(
    client: TestClient, gallery: int, monkeypatch: pytest.MonkeyPatch
):
    """The new index is built before the switch is committed: a build that fails (settings
    within the documented ranges that still cannot be applied) is a 422, and the gallery keeps
    its settings, version and searchable index."""
    upload = client.post(
        f"{API}/galleries/{gallery}/images", files=[("files", ("a.png", png(0, 0)))]
    )
    assert upload.status_code == 201
    before = client.get(f"{API}/galleries/{gallery}").json()
    indexes = client.app.state.runtime.indexes  # type: ignore[attr-defined]
    real_build = indexes.build

    def failing_build(session, gallery, *, index_type, **kwargs):
        if index_type == "hnsw":
            raise RuntimeError("the engine could not allocate the graph")
        return real_build(session, gallery, index_type=index_type, **kwargs)

    monkeypatch.setattr(indexes, "build", failing_build)
    refused = client.patch(
        f"{API}/galleries/{gallery}", json={"index_type": "hnsw", "index_params": {"m": 16}}
    )
    assert refused.status_code == 422 and "nothing was changed" in refused.json()["detail"]
    after = client.get(f"{API}/galleries/{gallery}").json()
    assert after == before
    search = client.post(f"{API}/galleries/{gallery}/search", files={"image": ("q.png", png(0, 0))})
    assert search.status_code == 200 and search.json()["results"][0]["score"] > 0.99


def test_a_model_built_on_the_server_from_a_backbone_and_its_weights_file(
    client: TestClient, tmp_path: Path, api_settings, monkeypatch
):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    weights = {"weights": ("vit.safetensors", path.read_bytes())}
    made = client.post(
        f"{API}/models",
        data={"name": "vit", "backbone": "test_vit", "image_size": "96"},
        files=weights,
    )
    assert made.status_code == 201, made.text
    card = made.json()["card"]
    assert card["backbone_weights"] == {
        "source": "file:vit.safetensors",
        "sha256": file_digest(path),
    }
    assert card["preprocessing"]["image_size"] == 96 and made.json()["method"] == "pretrained"
    gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": made.json()["id"]})
    upload = client.post(
        f"{API}/galleries/{gallery.json()['id']}/images",
        files=[("files", (f"{i}.png", png(i, i))) for i in range(3)],
    )
    assert upload.status_code == 201, upload.text
    found = client.post(
        f"{API}/galleries/{gallery.json()['id']}/search",
        files={"image": ("q.png", png(1, 1))},
        data={"k": "1"},
    )
    assert found.json()["results"][0]["image_id"] == upload.json()["results"][1]["image"]["id"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused = {
        "no hub here": ({"name": "hub", "backbone": "test_vit"}, None),
        "wrong file": (
            {"name": "junk", "backbone": "test_vit"},
            {"weights": ("vit.pth", b"not a checkpoint")},
        ),
        "unknown backbone": ({"name": "nope", "backbone": "no_such_net"}, None),
        "two sources": ({"name": "two", "backbone": "test_vit", "path": "tiny"}, None),
        "not a weights file": (
            {"name": "txt", "backbone": "test_vit"},
            {"weights": ("w.txt", b"x")},
        ),
    }
    for case, (form, files) in refused.items():
        response = client.post(f"{API}/models", data=form, files=files)
        assert response.status_code == 422, (case, response.text)
        assert str(api_settings.models_dir) not in response.json()["detail"], case
    assert (
        "as a file"
        in client.post(f"{API}/models", data={"name": "hub", "backbone": "test_vit"}).json()[
            "detail"
        ]
    )
    assert [m["name"] for m in client.get(f"{API}/models").json()] == ["vit"]
    assert not [p.name for p in api_settings.models_dir.iterdir() if p.name.startswith(".")]


def test_index_types_list_each_types_parameters_with_the_ranges_patch_enforces(
    client: TestClient, gallery: int
):
    types = {t["type"]: t["params"] for t in client.get(f"{API}/index-types").json()}
    assert list(types) == ["flat", "hnsw", "ivfpq"]
    hnsw = {p["name"]: p for p in types["hnsw"]}
    assert set(hnsw) == {"m", "ef_search", "ef_construction", "compact_fraction"}
    assert (hnsw["ef_search"]["min"], hnsw["ef_search"]["max"], hnsw["ef_search"]["integer"]) == (
        1,
        4096,
        True,
    )
    assert {p["name"] for p in types["ivfpq"]} >= {"nlist", "nprobe", "refine_factor"}
    for name, param in hnsw.items():  # one past each bound is refused with the stated range
        outside = param["max"] + 1
        refused = client.patch(
            f"{API}/galleries/{gallery}",
            json={"index_type": "hnsw", "index_params": {name: outside}},
        )
        assert refused.status_code == 422 and param["expected"] in refused.json()["detail"], name
    accepted = client.patch(
        f"{API}/galleries/{gallery}",
        json={"index_type": "hnsw", "index_params": {"ef_search": hnsw["ef_search"]["max"]}},
    )
    assert accepted.status_code == 200 and accepted.json()["index_params"]["ef_search"] == 4096


def test_extra_built_in_models_are_registered_beside_lite0(tmp_path: Path, model_root: Path):
    settings = Settings(
        data_dir=tmp_path / "data",
        model_root=model_root,
        auto_api_key=False,
        embed_backend="torch",  # no ONNX export: this test is about the models' registration
        extra_builtin_models=["lite1"],
    )
    with TestClient(create_app(settings)) as client:
        models = {m["name"]: m for m in client.get(f"{API}/models").json()}
        assert set(models) == {"pretrained-efficientnet-lite0", "pretrained-efficientnet-lite1"}
        assert all(m["builtin"] for m in models.values())
        lite1 = client.get(f"{API}/models/{models['pretrained-efficientnet-lite1']['id']}").json()
        assert lite1["card"]["preprocessing"]["image_size"] == 240
        assert lite1["card"]["backbone_weights"]["source"].startswith("package:efficientnet-lite1")
        default = client.post(f"{API}/galleries", json={"name": "g"}).json()  # no model named
        assert default["model_id"] == models["pretrained-efficientnet-lite0"]["id"]
        refused = client.delete(f"{API}/models/{lite1['id']}")
        assert refused.status_code == 409 and "built-in" in refused.json()["detail"]
    with pytest.raises(ValueError, match="'vgg' is not a built-in backbone"):
        Settings(extra_builtin_models=["vgg"])
