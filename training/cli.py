"""`lookalike`: the command-line interface (typer). Thin: it parses, calls the library, prints."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler

from training.fsutil import check_output_dir, check_output_file

app = typer.Typer(
    help="lookalike: deep metric learning (DiVA, DVML, Magnet) and image similarity search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Wide tables even when stderr is not a terminal (logs, CI).
console = Console(stderr=True, width=shutil.get_terminal_size((150, 24)).columns)
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """Turn the library's input errors into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from training.errors import input_error_types

        user_errors: tuple[type[BaseException], ...] = (*input_error_types(), ValueError)
        try:
            return command(*args, **kwargs)
        except user_errors as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def _parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """`--param key=value` pairs; values are parsed as JSON where possible (numbers, lists)."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


# Every method (training/methods/) and what it is; a test keeps this in step with the registry.
METHOD_HELP = (
    "margin (Wu et al. 2017, distance-weighted sampling), triplet, contrastive, npair, "
    "diva (Milbich et al. 2020), dvml (Lin et al. 2018; wraps --base-loss triplet, npair or "
    "margin), magnet (Rippel et al. 2016); default: the preset's, else margin"
)


def _presets_epilog() -> str:
    from training.config import list_presets

    return (
        "Presets (training/presets/): "
        + ", ".join(list_presets())
        + ". The best measured on each benchmark: dvml-icons, dvml-cjk (docs/results.md)."
    )


@app.command(epilog=_presets_epilog())
@_user_errors
def train(
    data: Annotated[
        str,
        typer.Option(
            help="ImageFolder root with train/ and test/, or cub200:PATH, cars196:PATH, "
            "sop:PATH, manifest:FILE"
        ),
    ],
    method: Annotated[str | None, typer.Option(help=METHOD_HELP)] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON or TOML file with training options")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="named preset (listed below), e.g. dvml-icons")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (resumes an interrupted run)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    iterations: Annotated[int | None, typer.Option(min=1)] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            help="minutes for the whole run (queue fill, training, validation); only the "
            "final test evaluation comes after it"
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="efficientnet_lite0, resnet50, resnet18")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet, none, or a weights file")] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    embedding_dim: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    samples_per_class: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="backbone learning rate")] = None,
    head_lr: Annotated[float | None, typer.Option()] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    label_noise: Annotated[float | None, typer.Option(help="fraction of random labels")] = None,
    max_classes: Annotated[int | None, typer.Option(help="first N classes of each split")] = None,
    eval_every: Annotated[int | None, typer.Option(help="epochs between validation passes")] = None,
    eval_train: Annotated[bool | None, typer.Option(help="also report train-split metrics")] = None,
    workers: Annotated[int | None, typer.Option(help="data loader processes")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    base_loss: Annotated[
        str | None, typer.Option(help="dvml: the metric loss it wraps (triplet, npair, margin)")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="method hyperparameter KEY=VALUE (repeatable)")
    ] = None,
    set_option: Annotated[
        list[str] | None,
        typer.Option("--set", help="any other training option KEY=VALUE (repeatable)"),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="a model to compare with on the test split at the end, e.g. the untrained "
            "backbone from `lookalike pretrained`"
        ),
    ] = None,
) -> None:
    """Train an embedding model; writes best/ and last/ model artifacts into --out."""
    from training.config import resolve_config
    from training.engine.trainer import Trainer
    from training.evaluation.metrics import format_metrics_table

    _setup_logging()
    overrides = {
        "data": data,
        "method": method,
        "out": out,
        "epochs": epochs,
        "iterations": iterations,
        "time_budget_min": time_budget,
        "device": device,
        "backbone": backbone,
        "weights": weights,
        "image_size": image_size,
        "embedding_dim": embedding_dim,
        "batch_size": batch_size,
        "samples_per_class": samples_per_class,
        "lr": lr,
        "head_lr": head_lr,
        "val_fraction": val_fraction,
        "label_noise": label_noise,
        "max_classes": max_classes,
        "eval_every": eval_every,
        "eval_train": eval_train,
        "num_workers": workers,
        "seed": seed,
        "baseline": baseline,
        **_parse_params(set_option),
        "method_params": {
            **({"base_loss": base_loss} if base_loss else {}),
            **_parse_params(param),
        },
    }
    cfg = resolve_config(overrides, config_file=config, preset=preset)
    if cfg.out is not None:  # None: the trainer names a fresh folder under runs/
        check_output_dir(Path(cfg.out), "--out")
    trainer = Trainer(cfg)
    console.print(
        f"training [bold]{cfg.method}[/] on {trainer.data.dataset.name}: "
        f"{trainer.data.train.num_classes} train classes / {len(trainer.data.train)} images, "
        f"{trainer.total_iterations} iterations -> {trainer.out}",
        highlight=False,
    )
    results = trainer.fit()
    if results:
        rows = {
            f"{name} ({split})": results[name][split]
            for name in ("best", "last")
            for split in ("val", "test", "train")
            if results[name].get(split)
        }
        if "baseline" in results:
            rows[f"baseline {results['baseline']['model']} (test)"] = results["baseline"]["test"]
        console.print(format_metrics_table(rows, title=f"{cfg.method}: {trainer.out}"))
        if "gain_over_baseline" in results:
            gains = ", ".join(f"{k} {v:+.3f}" for k, v in results["gain_over_baseline"].items())
            console.print(f"best (test) minus the baseline: {gains}", highlight=False)


def _load_split(data: str, split: str, max_classes: int | None):
    from training.evaluation.embed import load_split

    chosen, skipped = load_split(data, split, max_classes)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images[/]")
    return chosen


def _embed_split(
    model_dir: Path,
    data: str,
    split: str,
    max_classes: int | None,
    device: str,
    batch_size: int,
    workers: int,
):
    from training.engine.trainer import resolve_device
    from training.evaluation.embed import embed_split_with_artifact

    chosen = _load_split(data, split, max_classes)
    embeddings, labels = embed_split_with_artifact(
        model_dir,
        chosen,
        device=resolve_device(device),
        batch_size=batch_size,
        num_workers=workers,
    )
    return embeddings, labels, chosen


@app.command()
@_user_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="model artifact directory")],
    data: Annotated[str, typer.Option(help="dataset (same forms as train --data)")],
    split: Annotated[str, typer.Option(help="test or train")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="write metrics here")] = None,
    max_classes: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option()] = 128,
    workers: Annotated[int, typer.Option()] = 2,
) -> None:
    """Leave-one-out retrieval and clustering metrics of a model on a dataset split."""
    from training.evaluation.metrics import evaluate_embeddings, format_metrics_table

    if json_out:
        check_output_file(json_out, "--json")
    embeddings, labels, _ = _embed_split(
        model, data, split, max_classes, device, batch_size, workers
    )
    metrics = evaluate_embeddings(embeddings, labels)
    console.print(format_metrics_table({f"{model} ({split})": metrics}))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


@app.command()
@_user_errors
def embed(
    model: Annotated[Path, typer.Option(help="model artifact directory")],
    data: Annotated[str, typer.Option(help="dataset (same forms as train --data)")],
    out: Annotated[Path, typer.Option(help=".npz file with embeddings, labels, paths")],
    split: Annotated[str, typer.Option()] = "test",
    max_classes: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option()] = 128,
    workers: Annotated[int, typer.Option()] = 2,
) -> None:
    """Embed a dataset split into an .npz file (arrays embeddings, labels, paths)."""
    check_output_file(out, "--out")
    embeddings, labels, chosen = _embed_split(
        model, data, split, max_classes, device, batch_size, workers
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        embeddings=embeddings,
        labels=labels,
        paths=np.array([str(p) for p in chosen.paths]),
        class_names=np.array(chosen.class_names),
    )
    console.print(f"wrote {len(embeddings)} x {embeddings.shape[1]} embeddings to {out}")


@app.command()
@_user_errors
def pretrained(
    out: Annotated[Path, typer.Argument(help="where to write the model artifact")],
    backbone: Annotated[
        str,
        typer.Option(
            help="efficientnet_lite0/1/2, resnet18, resnet50, or any timm model name "
            "(e.g. vit_small_patch14_dinov2.lvd142m)"
        ),
    ] = "efficientnet_lite0",
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet (built-ins: shipped or cached; timm models: their hub weights, "
            "online only), none, or a weights FILE (.safetensors/.pth/.bin)"
        ),
    ] = "imagenet",
    image_size: Annotated[
        int | None, typer.Option(help="default: the backbone's native resolution")
    ] = None,
    test_crop_pct: Annotated[float | None, typer.Option(help="default: the backbone's")] = None,
    pooling: Annotated[str, typer.Option(help="avg or avgmax")] = "avg",
    force: Annotated[bool, typer.Option(help="replace what is at OUT")] = False,
) -> None:
    """Export a pretrained backbone (pooled features, untrained) as a model artifact; its card
    records where the weights came from and their SHA-256."""
    check_output_dir(out, "OUT", must_be_empty=not force)
    from training.checkpoint import export_pretrained, read_card

    if pooling not in ("avg", "avgmax"):
        raise ValueError(f"pooling must be avg or avgmax, not {pooling!r}")
    model = export_pretrained(
        out,
        backbone,
        weights=weights,
        image_size=image_size,
        test_crop_pct=test_crop_pct,
        pooling="avgmax" if pooling == "avgmax" else "avg",
    )
    card = read_card(out)
    console.print(
        f"wrote pretrained {backbone} ({model.embedding_dim}-d, "
        f"{card.preprocessing.image_size} px) to {out}; weights "
        f"{card.backbone_weights.get('source')} sha256 {card.backbone_weights.get('sha256')}"
    )


@app.command()
@_user_errors
def export(
    model: Annotated[Path, typer.Argument(help="model artifact directory")],
    out: Annotated[
        Path | None, typer.Option(help="where to write it; default MODEL/model.onnx")
    ] = None,
    format: Annotated[str, typer.Option(help="onnx (the only format so far)")] = "onnx",
) -> None:
    """Export a model for serving elsewhere: ONNX with a dynamic batch axis, input `images`
    (N, 3, H, W) preprocessed as the card says, output `embeddings` (N, d), L2-normalised;
    checked against torch before it is written."""
    from training.export import MIN_COSINE, ExportError, export_onnx

    if format != "onnx":
        raise ValueError(f"unknown format {format!r}; the only one is onnx")
    if out is not None:
        check_output_file(out, "--out")
    try:
        written = export_onnx(model, out)
    except ExportError as error:
        raise ValueError(f"could not export {model}: {error}") from error
    console.print(
        f"wrote {written} (embeddings within cosine {MIN_COSINE} of torch's on the check "
        f"images; record in {written.name}.json)"
    )


def _mount_data_commands() -> None:
    from training.data.benchmarks.cli import app as data_app

    app.add_typer(
        data_app, name="data", help="Build the offline benchmarks (IconThemes, CJK-Fonts)."
    )


_mount_data_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
