"""`lookalike demo`'s own pieces (the whole demo is measured by hand: README, Quick start)."""

from __future__ import annotations

from pathlib import Path

from app.demo import (
    by_name,
    demo_preset,
    held_out_query,
    hold_out,
    progress_line,
    show_comparison,
)


def test_progress_line_and_lookup() -> None:
    job = {
        "type": "train",
        "state": "running",
        "progress": 0.25,
        "epoch": 2,
        "step": 50,
        "total_steps": 200,
        "metrics": {"loss": 0.5, "note": "x", "phase": "train"},
        "eta": "2026-01-01T10:00:00Z",
    }
    expected = "running, 25%, epoch 2, step 50/200, train, loss 0.500, eta 10:00:00 UTC"
    assert progress_line(job) == expected
    assert progress_line({**job, "type": "index"}).endswith("eta 10:00:00 UTC")
    assert progress_line({**job, "state": "queued"}) == "queued"
    assert by_name([{"name": "a"}, {"name": "b"}], "b") == {"name": "b"}
    assert by_name([], "b") is None


def test_the_demo_trains_the_recommended_preset_unless_a_method_is_chosen() -> None:
    assert demo_preset(None) == "dvml-icons"  # the best method measured on IconThemes
    assert demo_preset("diva") == "diva-icons"
    assert demo_preset("margin") == "icons"


def train_result(trained: float, baseline: float) -> dict:
    return {
        "model_name": "icons-dvml-icons-demo",
        "epochs": 9,
        "iterations": 225,
        "metrics": {"test": {"recall@1": trained, "map@r": 0.12}},
        "baseline": {
            "model_name": "pretrained",
            "builtin": True,
            "metrics": {"recall@1": baseline, "map@r": 0.1},
        },
        "gain_over_baseline": {"recall@1": trained - baseline, "map@r": 0.02},
    }


def test_the_comparison_decides_the_reindex_and_prints_both_models(capsys) -> None:
    assert show_comparison(train_result(0.401, 0.356)) is True
    printed = capsys.readouterr().out
    assert "pretrained (built-in)" in printed and "icons-dvml-icons-demo (trained)" in printed
    assert "0.356" in printed and "0.401" in printed and "+0.045" in printed
    assert show_comparison(train_result(0.332, 0.356)) is False
    assert "-0.024" in capsys.readouterr().out
    assert show_comparison({**train_result(0.3, 0.2), "baseline": None}) is True
    assert show_comparison(train_result(0.360, 0.356)) is False  # +0.004: within the noise
    assert "within the test split's noise" in capsys.readouterr().out


class RecordingClient:
    """Answers the demo's gallery listing from a fixed list; records deletions."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        self.deleted: list[int] = []

    def images(self, gallery_id: int, *, label: str | None = None) -> list[dict]:
        assert label == "class a"
        return self.items

    def delete_image(self, image_id: int) -> None:
        self.deleted.append(image_id)


def test_the_example_query_is_held_out_of_the_gallery(tmp_path: Path) -> None:
    import hashlib

    for name in ("class b", "class a"):
        (tmp_path / name).mkdir()
        for index in (2, 1):
            (tmp_path / name / f"{index}.png").write_bytes(f"{name}{index}".encode())
    query = held_out_query(tmp_path)
    assert query == tmp_path / "class a" / "1.png"
    digest = hashlib.sha256(query.read_bytes()).hexdigest()
    client = RecordingClient(
        [{"id": 7, "content_hash": "0" * 64}, {"id": 9, "content_hash": digest}]
    )
    hold_out(client, 1, query)  # type: ignore[arg-type]
    assert client.deleted == [9]
    client = RecordingClient([{"id": 7, "content_hash": "0" * 64}])
    hold_out(client, 1, query)  # type: ignore[arg-type]  # a second run: already held out
    assert client.deleted == []
