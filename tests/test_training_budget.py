"""Time budgets, progress phases and the final evaluation of the training loop.

Time passes only where a test says so: the trainer reads its clock through `Trainer.clock`,
which these tests replace, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from training.config import TrainConfig
from training.engine.trainer import Trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiny_trainer(tiny_dataset: Path, tmp_path: Path, **config: Any) -> Trainer:
    cfg = TrainConfig(
        data=str(tiny_dataset),
        out=tmp_path / "run",
        image_size=32,
        batch_size=8,
        samples_per_class=2,
        num_workers=0,
        embedding_dim=16,
        eval_batch_size=32,
        weights="none",
        lr=1e-3,
        **config,
    )
    return Trainer(cfg, progress_bar=False)


def taking(owner: Any, name: str, clock: FakeClock, seconds: float) -> None:
    """Make `owner.name` take `seconds` of the fake clock's time."""
    original: Callable = getattr(owner, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        clock.now += seconds
        return original(*args, **kwargs)

    setattr(owner, name, slow)


def record_evaluations(trainer: Trainer, val_scores: list[float] | None = None) -> list[str]:
    """The splits `evaluate_split` is called on, in order; with `val_scores`, validation
    returns those recall@1 values instead of measuring."""
    seen: list[str] = []
    original = trainer.evaluate_split

    def evaluate(split, **kwargs):
        name = {id(trainer.data.val): "val", id(trainer.data.test): "test"}.get(id(split), "train")
        seen.append(name)
        if name == "val" and val_scores is not None:
            return {"recall@1": val_scores.pop(0)}
        return original(split, **kwargs)

    trainer.evaluate_split = evaluate
    return seen


def test_a_budget_covers_start_up_training_and_the_closing_validation(tiny_dataset, tmp_path):
    """One minute: a 10 s start-up (a queue fill), 2 s steps, 4 s evaluation passes (all faked:
    only the loop's decisions are under test)."""
    trainer = tiny_trainer(
        tiny_dataset,
        tmp_path,
        time_budget_min=1,
        iterations=1000,
        iterations_per_epoch=3,
        eval_every=2,
    )
    clock = trainer.clock = FakeClock()
    taking(trainer.method, "on_train_start", clock, 10)
    # A method's own loss term may be named like a report's field (DVML logs its "phase").
    trainer._step = lambda batch: (0.5, {"phase": 2.0})
    taking(trainer, "_step", clock, 2)
    trainer.evaluate_split = lambda split, **kwargs: {"recall@1": 0.5}
    taking(trainer, "evaluate_split", clock, 4)
    reports: list[dict[str, Any]] = []
    trainer.on_progress = reports.append
    results = trainer.fit()

    lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["elapsed_s"] == 10 + 3 * 2  # the start-up counts
    closing = records[-1]
    assert "val" in closing and closing["elapsed_s"] <= 60  # validated, within the budget
    assert closing["elapsed_s"] + 2 + 4 > 60  # and it stopped only when no step fitted
    assert results["iterations"] == 3 * len(records) < 1000
    # Only the final test evaluation of best (the first validated epoch) and last comes after.
    assert results["best"]["epoch"] != closing["epoch"]
    assert results["elapsed_s"] == closing["elapsed_s"] + 2 * 4
    first = reports[0]
    assert (first["phase"], first["terms"], first["elapsed_s"]) == ("train", {"phase": 2.0}, 12)


def test_a_budget_spent_before_the_first_step_is_a_warning_and_trains_nothing(
    tiny_dataset, tmp_path, caplog
):
    trainer = tiny_trainer(tiny_dataset, tmp_path, time_budget_min=0.5, iterations=100)
    clock = trainer.clock = FakeClock()
    taking(trainer.method, "on_train_start", clock, 40)
    evaluated = record_evaluations(trainer)
    with caplog.at_level(logging.WARNING, logger="training.engine.trainer"):
        results = trainer.fit()
    assert "40 s of the 30 s time budget had passed before the first training step" in caplog.text
    assert results["iterations"] == 0
    assert evaluated == ["test"]  # no validation; best and last are one model, tested once
    assert results["best"]["test"] == results["last"]["test"]


@pytest.mark.parametrize(("val_scores", "passes"), [([0.5, 0.9], 1), ([0.9, 0.5], 2)])
def test_the_final_evaluation_runs_once_when_best_and_last_are_one_checkpoint(
    tiny_dataset, tmp_path, val_scores, passes
):
    trainer = tiny_trainer(
        tiny_dataset, tmp_path, iterations=4, iterations_per_epoch=2, eval_train=True
    )
    evaluated = record_evaluations(trainer, val_scores)
    results = trainer.fit()
    assert evaluated == ["val", "val", *["test", "train"] * passes]
    assert results["best"]["epoch"] == (1 if passes == 1 else 0)
    for name in ("best", "last"):
        card = json.loads((trainer.out / name / "card.json").read_text())
        assert card["metrics"]["test"] == results[name]["test"]
        assert card["metrics"]["train"] == results[name]["train"]
    if passes == 1:
        assert results["best"] == results["last"]
    saved = json.loads((trainer.out / "results.json").read_text())
    assert set(saved) >= {"best", "last", "selected_by", "iterations", "epochs", "elapsed_s"}


def test_every_phase_reports_progress_that_only_grows_with_a_finite_eta(tiny_dataset, tmp_path):
    trainer = tiny_trainer(
        tiny_dataset,
        tmp_path,
        method="diva",
        method_params={"n_key_batches": 2},
        iterations=4,
        iterations_per_epoch=2,
        time_budget_min=30,
    )
    reports: list[dict[str, Any]] = []
    trainer.on_progress = reports.append
    trainer.fit()

    phases = list(dict.fromkeys(report["phase"] for report in reports))
    assert phases == ["queue", "train", "validate", "final evaluation"]
    progress = [report["progress"] for report in reports]
    assert progress == sorted(progress) and progress[0] >= 0 and progress[-1] == 1.0
    assert all(math.isfinite(r["eta_s"]) and r["eta_s"] >= 0 for r in reports)
    assert reports[-1]["eta_s"] == 0
    assert all(0 <= r["done"] <= r["total"] for r in reports)
    queue = [r for r in reports if r["phase"] == "queue"]
    assert (queue[0]["done"], queue[-1]["done"], queue[-1]["total"]) == (0, 16, 16)  # 2 x 8 keys
