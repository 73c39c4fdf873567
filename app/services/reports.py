"""Evaluation reports for the web interface (read-only): what is known about a model's quality
on a dataset, gathered from the model's card, the train job that produced it (its per-epoch
metrics.jsonl) and the evaluate jobs run on it; plus the plots, rendered with matplotlib
(PNG, no display needed): Recall@K curves, training curves, train vs test Recall@1, and a 2-D
t-SNE map of the test embeddings (computed once and cached under DATA_DIR/reports)."""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Job, Model
from app.db.models.jobs import JobState
from app.services.errors import Invalid, NotFound
from app.services.jobs import evaluate as evaluate_kind
from app.services.jobs import train as train_kind
from app.services.models import artifact_dir, get_model

log = logging.getLogger(__name__)

PLOTS = ("recall", "training", "memorisation", "tsne")
TSNE_MAX_POINTS = 1000  # a stratified sample of the split keeps t-SNE to seconds on a CPU
TSNE_SEED = 0
TSNE_MAX_COLOURED = 20  # tab20's colours; more classes cannot be told apart
TSNE_DEFAULT_COLOURED = 10
TSNE_THUMBNAILS = 120
_RECALL_PREFIX = "recall@"
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def recall_curve(metrics: dict[str, float]) -> dict[int, float]:
    """{K: Recall@K} from a metrics dict's `recall@K` entries, by K."""
    points = {
        int(name[len(_RECALL_PREFIX) :]): float(value)
        for name, value in metrics.items()
        if name.startswith(_RECALL_PREFIX) and name[len(_RECALL_PREFIX) :].isdigit()
    }
    return dict(sorted(points.items()))


@dataclass
class Source:
    """One set of metrics on one split: from training (the model card) or an evaluate job."""

    name: str  # e.g. "test (training)", "test (evaluation job 7)"
    split: str
    metrics: dict[str, float]
    job_id: int | None = None


@dataclass
class Report:
    model: Model
    dataset: Dataset | None
    train_job: Job | None
    sources: list[Source] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def recall_curves(self) -> dict[str, dict[int, float]]:
        curves = {source.name: recall_curve(source.metrics) for source in self.sources}
        return {name: curve for name, curve in curves.items() if curve}

    def memorisation(self) -> dict[str, float] | None:
        """Train vs test Recall@1, from evaluate jobs when both exist, else from training."""
        for origin in ("evaluation", "training"):
            found: dict[str, float] = {}
            for source in self.sources:
                if origin in source.name and "recall@1" in source.metrics:
                    found.setdefault(source.split, float(source.metrics["recall@1"]))
            if "train" in found and "test" in found:
                return {"train": found["train"], "test": found["test"]}
        return None

    def plots(self) -> list[str]:
        available = []
        if self.recall_curves():
            available.append("recall")
        if self.epochs:
            available.append("training")
        if self.memorisation():
            available.append("memorisation")
        if self.dataset is not None and self.dataset.status == "ready":
            available.append("tsne")
        return available

    def as_dict(self) -> dict[str, Any]:
        model, dataset, job = self.model, self.dataset, self.train_job
        return {
            "model": {
                "id": model.id,
                "name": model.name,
                "method": model.method,
                "embedding_dim": model.embedding_dim,
            },
            "dataset": None
            if dataset is None
            else {"id": dataset.id, "name": dataset.name, "status": dataset.status},
            "train_job_id": None if job is None else job.id,
            "sources": [
                {"name": s.name, "split": s.split, "job_id": s.job_id, "metrics": s.metrics}
                for s in self.sources
            ],
            "recall_curves": {
                name: {str(k): v for k, v in curve.items()}
                for name, curve in self.recall_curves().items()
            },
            "epochs": self.epochs,
            "memorisation": self.memorisation(),
            "plots": self.plots(),
        }


def _flat_metrics(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


def _train_job(session: Session, model_id: int) -> Job | None:
    jobs = session.scalars(
        select(Job)
        .where(Job.type == train_kind.TYPE, Job.state == JobState.succeeded)
        .order_by(Job.id.desc())
    )
    return next((j for j in jobs if (j.result or {}).get("model_id") == model_id), None)


def _epochs(job: Job | None) -> list[dict[str, Any]]:
    """Per-epoch loss and validation metrics from the run's metrics.jsonl."""
    run_dir = (job.result or {}).get("run_dir") if job is not None else None
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    epochs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        epochs.append(
            {
                "epoch": record.get("epoch"),
                "iteration": record.get("iteration"),
                "loss": record.get("loss"),
                "val": _flat_metrics(record.get("val")),
                "test": _flat_metrics(record.get("test")),
            }
        )
    return epochs


def build_report(session: Session, model_id: int, dataset_id: int | None = None) -> Report:
    """The report of `model_id` on `dataset_id` (default: the dataset it was trained on)."""
    model = get_model(session, model_id)
    train_job = _train_job(session, model_id)
    if dataset_id is None and train_job is not None:
        dataset_id = train_job.params.get("dataset_id")
    dataset = None
    if dataset_id is not None:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist; GET /api/v1/datasets lists them")
    report = Report(model, dataset, train_job, epochs=_epochs(train_job))
    card_metrics = (model.card or {}).get("metrics") or {}
    trained_on = train_job is not None and train_job.params.get("dataset_id") == dataset_id
    if trained_on or train_job is None:
        for split in ("val", "test", "train"):
            metrics = _flat_metrics(card_metrics.get(split))
            if metrics:
                report.sources.append(Source(f"{split} (training)", split, metrics))
    baseline = (train_job.result or {}).get("baseline") if trained_on and train_job else None
    if baseline:  # what the train job measured its baseline at on the same test images
        kind = "built-in" if baseline["builtin"] else "baseline"
        report.sources.append(
            Source(
                f"{baseline['split']} ({kind} {baseline['model_name']}, for comparison)",
                baseline["split"],
                _flat_metrics(baseline["metrics"]),
                train_job.id if train_job is not None else None,
            )
        )
    if dataset is not None:
        evaluations = session.scalars(
            select(Job)
            .where(Job.type == evaluate_kind.TYPE, Job.state == JobState.succeeded)
            .order_by(Job.id.desc())
        )
        seen = set()
        for job in evaluations:
            params = job.params or {}
            if params.get("model_id") != model_id or params.get("dataset_id") != dataset.id:
                continue
            split = params.get("split", "test")
            metrics = _flat_metrics((job.result or {}).get("metrics"))
            if split in seen or not metrics:
                continue  # only the latest evaluation per split
            seen.add(split)
            report.sources.append(
                Source(f"{split} (evaluation job {job.id})", split, metrics, job.id)
            )
    return report


@dataclass
class Comparison:
    """Several models' metrics on the same split of one dataset, one source per model."""

    dataset: Dataset
    split: str
    entries: list[tuple[Model, Source | None]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": {"id": self.dataset.id, "name": self.dataset.name},
            "split": self.split,
            "models": [
                {
                    "model": {"id": model.id, "name": model.name, "method": model.method},
                    "source": None if source is None else source.name,
                    "job_id": None if source is None else source.job_id,
                    "metrics": {} if source is None else source.metrics,
                }
                for model, source in self.entries
            ],
        }


def compare_models(
    session: Session, model_ids: list[int], dataset_id: int, split: str
) -> Comparison:
    """Each model's metrics on `split` of the dataset: its latest evaluate job there, else the
    metrics its train job measured when it trained on this dataset; None when neither exists
    (run an evaluate job). Only sources on these images count: not a baseline's numbers copied
    into another model's report, nor a card's metrics from data this server does not know."""
    if not 2 <= len(model_ids) <= 6:
        raise Invalid("compare 2 to 6 models")
    if split not in ("test", "train", "val"):
        raise Invalid("split must be test, train or val")
    if not all(1 <= model_id <= 2**31 - 1 for model_id in model_ids):
        raise Invalid("model ids are positive integers below 2^31")
    entries: list[tuple[Model, Source | None]] = []
    dataset: Dataset | None = None
    for model_id in model_ids:
        report = build_report(session, model_id, dataset_id)
        dataset = report.dataset
        job = report.train_job
        trained_here = job is not None and job.params.get("dataset_id") == dataset_id
        own = [
            s
            for s in report.sources
            if s.split == split
            and (s.job_id is not None or trained_here)  # a card's metrics of unknown data: no
            and "for comparison" not in s.name
        ]
        evaluated = [s for s in own if s.job_id is not None]
        chosen = evaluated or own
        entries.append((report.model, chosen[0] if chosen else None))
    assert dataset is not None
    return Comparison(dataset, split, entries)


def compare_png(comparison: Comparison) -> bytes:
    """The models' Recall@K curves on one plot."""
    curves = {
        model.name: recall_curve(source.metrics)
        for model, source in comparison.entries
        if source is not None
    }
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        raise NotFound("none of these models has Recall@K on this split yet; evaluate them")
    figure = _figure()
    axes = figure.add_subplot()
    _draw_recall_curves(axes, curves)
    axes.set_title(f"{comparison.dataset.name}, {comparison.split} split")
    return _png(figure)


# ---------------------------------------------------------------------- plots
def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def epoch_axis(axes: Any, epochs: list[int]) -> None:
    """Whole epochs on the x axis; one epoch alone gets a window of one epoch either side
    (matplotlib would zoom to +-0.05 around it and label no whole epoch)."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(epochs)) == 1:
        axes.set_xlim(epochs[0] - 1, epochs[0] + 1)


def _draw_recall_curves(axes: Any, curves: dict[str, dict[int, float]]) -> None:
    """Recall@K curves, one per label, on a log2 K axis (the report's and the comparison's)."""
    for label, curve in curves.items():
        axes.plot(list(curve), list(curve.values()), marker="o", label=label)
    ks = sorted({k for curve in curves.values() for k in curve})
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.minorticks_off()
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K")
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize="small")


def plot(
    settings: Settings,
    session: Session,
    report: Report,
    name: str,
    split: str,
    tsne_view: TsneView | None = None,
) -> bytes:
    """One plot of the report as PNG bytes; NotFound when the report lacks its data."""
    if name not in PLOTS:
        raise NotFound(f"no plot {name!r}; choose one of: {', '.join(PLOTS)}")
    if name not in report.plots():
        raise NotFound(f"the report has no data for the {name} plot yet")
    if name == "tsne":
        return tsne_png(settings, report, split, tsne_view or TsneView())

    figure = _figure()
    axes = figure.add_subplot()
    if name == "recall":
        _draw_recall_curves(axes, report.recall_curves())
    elif name == "training":
        epochs = [e["epoch"] for e in report.epochs]
        losses = [e["loss"] for e in report.epochs]
        axes.plot(epochs, losses, marker="o", color="tab:red", label="training loss")
        epoch_axis(axes, epochs)
        axes.set_ylabel("training loss", color="tab:red")
        recall = [(e["epoch"], e["val"].get("recall@1")) for e in report.epochs]
        recall = [(x, y) for x, y in recall if y is not None]
        if recall:
            other = axes.twinx()
            other.plot(*zip(*recall, strict=True), marker="s", color="tab:blue")
            other.set_ylabel("validation Recall@1", color="tab:blue")
            other.set_ylim(0, 1.02)
    else:  # memorisation
        values = report.memorisation() or {}
        colours = ["tab:orange", "tab:blue"]
        bars = axes.bar(["train", "test"], [values["train"], values["test"]], color=colours)
        axes.bar_label(bars, fmt="%.3f")
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("Recall@1")
    axes.grid(alpha=0.3)
    return _png(figure)


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def tsne_points(settings: Settings, report: Report, split: str) -> dict[str, Any]:
    """{"x", "y", "labels", "classes", "paths"}: a stratified sample of the split's embeddings
    by the model, mapped to 2-D with t-SNE; cached in DATA_DIR/reports (models are immutable)."""
    assert report.dataset is not None
    if split not in ("test", "train"):
        raise Invalid("split must be test or train")
    key = f"tsne2-model{report.model.id}-dataset{report.dataset.id}-{split}"
    cache = settings.data_dir / "reports" / f"{key}.json"
    with _lock(key):
        if cache.is_file():
            return json.loads(cache.read_text())
        points = _compute_tsne(settings, report, split)
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(".tmp")
        temporary.write_text(json.dumps(points))
        temporary.replace(cache)
        return points


def _compute_tsne(settings: Settings, report: Report, split_name: str) -> dict[str, Any]:
    from sklearn.manifold import TSNE

    from training.evaluation.embed import embed_split_with_artifact, load_split

    assert report.dataset is not None
    split, _ = load_split(report.dataset.spec, split_name)
    if len(split) < 5:
        raise Invalid(f"the {split_name} split has {len(split)} images: too few for a map")
    if len(split) > TSNE_MAX_POINTS:  # a random sample keeps every class's share
        rng = np.random.default_rng(TSNE_SEED)
        split = split.subset(sorted(rng.permutation(len(split))[:TSNE_MAX_POINTS].tolist()))
    embeddings, codes = embed_split_with_artifact(
        artifact_dir(settings, report.model), split, num_workers=0
    )
    perplexity = float(min(30.0, max(2.0, (len(embeddings) - 1) / 3)))
    coords = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=TSNE_SEED
    ).fit_transform(embeddings)
    return {
        "x": coords[:, 0].round(4).tolist(),
        "y": coords[:, 1].round(4).tolist(),
        "labels": codes.astype(int).tolist(),
        "classes": list(split.class_names),
        "paths": [str(path) for path in split.paths],
    }


@dataclass
class TsneView:
    """How the t-SNE map is drawn: which classes get colours (None: the most frequent ones
    when there are too many to tell apart) and whether a sample of the images is drawn as
    thumbnails at their points."""

    classes: list[str] | None = None
    thumbnails: bool = False


def tsne_png(settings: Settings, report: Report, split: str, view: TsneView) -> bytes:
    points = tsne_points(settings, report, split)
    figure = _figure(6.4, 5.2)
    axes = figure.add_subplot()
    labels = np.asarray(points["labels"])
    xs, ys = np.asarray(points["x"]), np.asarray(points["y"])
    classes = points["classes"]
    present = [int(code) for code in np.unique(labels)]
    if view.classes:
        index = {name: code for code, name in enumerate(classes)}
        unknown = [name for name in view.classes if name not in index]
        if unknown:
            examples = ", ".join(classes[code] for code in present[:5])
            raise Invalid(f"no class {unknown[0]!r} in this split (its classes include {examples})")
        if len(view.classes) > TSNE_MAX_COLOURED:
            raise Invalid(f"colour at most {TSNE_MAX_COLOURED} classes")
        coloured = [index[name] for name in view.classes]
    elif len(present) <= TSNE_MAX_COLOURED:
        coloured = present
    else:  # 142 colours are confetti: the most frequent classes, the rest in grey
        counts = np.bincount(labels)
        coloured = sorted(present, key=lambda code: (-counts[code], code))[:TSNE_DEFAULT_COLOURED]
    import matplotlib

    palette = 10 if len(coloured) <= 10 else 20
    colours = matplotlib.colormaps[f"tab{palette}"]
    markers = "os^Dv<>p*h"
    size = 36 if len(labels) <= 300 else 14
    rest = ~np.isin(labels, coloured)
    if rest.any():
        axes.scatter(xs[rest], ys[rest], s=size / 2, color="0.82", label="other classes")
    colour_of = {}
    for position, code in enumerate(coloured):
        chosen = labels == code
        colour_of[code] = colours(position % palette)
        axes.scatter(
            xs[chosen],
            ys[chosen],
            s=size,
            color=colour_of[code],
            marker=markers[(position // palette) % len(markers)],
            label=classes[code] if code < len(classes) else str(code),
            alpha=0.9,
        )
    if view.thumbnails:
        _draw_thumbnails(axes, xs, ys, labels, points["paths"], colour_of)
    axes.legend(fontsize="x-small", markerscale=1.2, loc="best", ncols=2)
    axes.set_xticks([])
    axes.set_yticks([])
    dataset = report.dataset.name if report.dataset else ""
    shown = "" if len(coloured) == len(present) else f", {len(coloured)} coloured"
    axes.set_title(
        f"t-SNE of {len(labels)} {split} embeddings ({dataset}), {len(present)} classes{shown}",
        fontsize="medium",
    )
    return _png(figure)


def _draw_thumbnails(
    axes: Any,
    xs: np.ndarray,
    ys: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    colour_of: dict[int, Any],
) -> None:
    """Up to TSNE_THUMBNAILS images at their points, none overlapping another (chosen in a
    seeded random order), framed in their class's colour when it has one."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from PIL import Image

    span = np.array([np.ptp(xs) or 1.0, np.ptp(ys) or 1.0])
    placed: list[np.ndarray] = []
    for i in np.random.default_rng(TSNE_SEED).permutation(len(xs)):
        where = np.array([xs[i], ys[i]]) / span
        if any(np.abs(where - other).max() < 0.07 for other in placed):
            continue
        try:
            with Image.open(paths[i]) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((40, 40))
        except (OSError, ValueError):
            continue  # a file gone since the map was cached: its point stays
        colour = colour_of.get(int(labels[i]), "0.6")
        box = AnnotationBbox(
            OffsetImage(np.asarray(thumb), zoom=0.55),
            (xs[i], ys[i]),
            frameon=True,
            pad=0.1,
            bboxprops={"edgecolor": colour, "linewidth": 1.2},
        )
        axes.add_artist(box)
        placed.append(where)
        if len(placed) >= TSNE_THUMBNAILS:
            break
