"""`train`: train a model on a registered dataset (the `gpu` queue), register its best
checkpoint, and compare it with a baseline model on the same test split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Model
from app.services.errors import Invalid
from app.services.jobs.base import GPU_QUEUE, JobKind, JobParams, RowId, must_exist, ready_dataset
from app.services.models import get_model

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun
    from training.config import TrainConfig

TYPE = "train"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = (
    "train: dataset_id, method, preset, hyperparameters, model_name, "
    "baseline_model_id (result: model_id, metrics, baseline, gain_over_baseline)"
)

# Training options the service sets itself; a client gives `method` and `preset` as fields.
RESERVED_HYPERPARAMETERS = {"data", "out", "device", "preset", "method"}
SERVER_WEIGHTS = ("imagenet", "none")  # never a server-side file path from a client


class TrainParams(JobParams):
    dataset_id: RowId
    method: str | None = Field(
        None,
        description="margin, triplet, contrastive, npair, diva, dvml, magnet; default: the "
        "preset's method, and with neither method nor preset the best method measured for the "
        "dataset's kind of data (docs/results.md): the dvml-icons or dvml-cjk preset on the "
        "offline benchmarks, the dvml preset (DVML+margin) on any other data",
    )
    preset: str | None = None
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields (lr, epochs, batch_size, ...)"
    )
    model_name: str | None = Field(
        None, min_length=1, max_length=200, description="default: <method>-job<id>"
    )
    baseline_model_id: RowId | None = Field(
        None,
        description="the model the trained one is compared with on the same test split (the "
        "result's baseline and gain_over_baseline); default: the built-in model",
    )


def train_config(
    settings: Settings, params: TrainParams, dataset: Dataset, out: Path | None
) -> TrainConfig:
    """The TrainConfig a train job runs with (also how the API validates the request)."""
    from training.config import ConfigError, recommended_preset, resolve_config
    from training.methods import build_method
    from training.models.backbones import ALIASES, BACKBONES

    reserved = sorted(RESERVED_HYPERPARAMETERS & params.hyperparameters.keys())
    if reserved:
        raise Invalid(
            f"hyperparameters may not set {', '.join(reserved)}: the service sets data, out and "
            "device; give method and preset as their own fields"
        )
    overrides = {
        "num_workers": settings.worker_num_workers,
        **params.hyperparameters,
        "data": dataset.spec,
        "method": params.method,  # None: the preset's
        "out": out,
        "device": settings.worker_device,
    }
    preset = params.preset
    if preset is None and params.method is None:
        preset = recommended_preset(dataset.spec)
    try:
        cfg = resolve_config(overrides, preset=preset)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    if cfg.weights not in SERVER_WEIGHTS:
        raise Invalid(f"weights must be one of {', '.join(SERVER_WEIGHTS)}, not {cfg.weights!r}")
    if ALIASES.get(cfg.backbone, cfg.backbone) not in BACKBONES:
        raise Invalid(
            f"unknown backbone {cfg.backbone!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        )
    classes = (dataset.summary or {}).get("train", {}).get("classes", 2)
    try:
        build_method(
            cfg.method,
            num_classes=max(2, classes),
            embedding_dim=cfg.embedding_dim,
            **cfg.method_params,
        )
    except (ValueError, TypeError) as error:
        raise Invalid(f"invalid method or method_params: {error}") from None
    return cfg


def validate(session: Session, settings: Settings, params: TrainParams) -> None:
    train_config(settings, params, ready_dataset(session, params.dataset_id), out=None)
    if params.baseline_model_id is not None:
        must_exist(get_model, session, params.baseline_model_id)


def training_reporter(run: JobRun) -> Callable[[dict[str, Any]], None]:
    """The trainer's `on_progress` for a job. The trainer's progress and ETA cover the whole
    run (queue fill, training, validation, final evaluation) and go to the row as they are; the
    phase and how far it is go into the metrics, beside the latest loss and validation scores,
    which stay shown while a phase that has none runs."""
    trainer_keys = {"epoch", "iteration", "total_iterations", "progress", "elapsed_s", "eta_s"}
    latest: dict[str, Any] = {}

    def on_progress(info: dict[str, Any]) -> None:
        latest.update({k: v for k, v in info.items() if k not in trainer_keys})
        latest["phase_done"], latest["phase_total"] = latest.pop("done"), latest.pop("total")
        run.report(
            progress=info["progress"],
            eta_s=info["eta_s"],
            epoch=info["epoch"],
            step=info["iteration"],
            total_steps=info["total_iterations"],
            metrics=dict(latest),
            force=True,
        )

    return on_progress


def baseline_model(session: Session, model_id: int | None) -> Model | None:
    """What a train job compares its model with on the test split, so the job, the report and
    the demo can say whether training helped (on IconThemes a short run can end below the
    untrained ImageNet features): `model_id`, else the built-in model, if there is one."""
    from app.services.models import builtin_model

    return builtin_model(session) if model_id is None else get_model(session, model_id)


def body(run: JobRun) -> dict[str, Any]:
    from app.services.models import artifact_dir, register_artifact
    from training.engine.trainer import Trainer, TrainingStopped

    params = TrainParams.model_validate(run.job.params)
    with run.session() as session:
        dataset = ready_dataset(session, params.dataset_id)
        baseline = baseline_model(session, params.baseline_model_id)
    cfg = train_config(run.settings, params, dataset, out=run.dir / "run")
    if baseline is not None:  # measured on the same test images in the final evaluation
        cfg.baseline = artifact_dir(run.settings, baseline)
    trainer = Trainer(
        cfg, on_progress=training_reporter(run), should_stop=run.should_stop, progress_bar=False
    )
    run.report(progress=0.0, epoch=0, step=0, total_steps=trainer.total_iterations, force=True)
    try:
        results = trainer.fit()
    except TrainingStopped:
        run.check()
        raise
    run.check()  # a cancel that came during the final evaluation: register nothing
    name = params.model_name or f"{cfg.method}-job{run.id}"
    with run.session() as session:
        model = register_artifact(session, run.settings, trainer.out / "best", name)
    best = results["best"]
    run.report(metrics={"val": best.get("val"), "test": best.get("test")}, force=True)
    return {
        "model_id": model.id,
        "model_name": model.name,
        "method": cfg.method,
        "preset": cfg.preset,
        "metrics": best,
        "last": results["last"],
        "baseline": None
        if baseline is None
        else {
            "model_id": baseline.id,
            "model_name": baseline.name,
            "builtin": baseline.builtin,
            "split": "test",
            "metrics": results["baseline"]["test"],
        },
        "gain_over_baseline": results.get("gain_over_baseline"),
        "selected_by": results["selected_by"],
        "iterations": results["iterations"],
        "epochs": results["epochs"],
        "run_dir": str(trainer.out),
    }


KIND = JobKind(TYPE, GPU_QUEUE, TrainParams, body, DESCRIPTION, validate)
