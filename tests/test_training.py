"""The training loop and the `lookalike` CLI, end to end on a tiny dataset."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import training.config
from tests.conftest import write_image_folder
from training.cli import app
from training.config import list_presets, read_preset, resolve_config
from training.methods import METHODS

runner = CliRunner()
TINY = [
    "--image-size", "32", "--batch-size", "8", "--samples-per-class", "2",
    "--workers", "0", "--embedding-dim", "16", "--set", "eval_batch_size=32",
]  # fmt: skip
METRIC_KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r", "r_precision"}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.parametrize("method", ["margin", "triplet", "contrastive", "npair"])
def test_each_baseline_trains_and_its_checkpoint_evaluates(tiny_dataset, tmp_path, method):
    out = tmp_path / method
    result = invoke(
        "train", "--data", tiny_dataset, "--method", method, "--iterations", 2, "--out", out, *TINY
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["best"]["test"]) == METRIC_KEYS
    assert results["iterations"] == 2
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["method"]["name"] == method
    assert card["training_data"]["train"]["classes"] == 6  # 8 minus a 25% validation fold
    assert card["training_data"]["val"]["classes"] == 2
    assert set(card["metrics"]["test"]) == METRIC_KEYS
    assert not (out / "state.pt").exists()

    evaluated = invoke("evaluate", "--model", out / "best", "--data", tiny_dataset,
                       "--json", tmp_path / "m.json", "--workers", 0)  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == METRIC_KEYS
    # The artifact alone reproduces the numbers the training run recorded.
    assert metrics["recall@1"] == pytest.approx(results["best"]["test"]["recall@1"], abs=1e-6)


def test_a_baseline_is_measured_on_the_same_test_split_and_the_gain_reported(
    tiny_dataset, tmp_path
):
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", first, *TINY).exit_code
        == 0
    )
    result = invoke("train", "--data", tiny_dataset, "--iterations", 2, "--out", second,
                    "--baseline", first / "best", "--seed", 1, *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    earlier = json.loads((first / "results.json").read_text())["best"]["test"]
    results = json.loads((second / "results.json").read_text())
    baseline = results["baseline"]
    assert baseline["model"] == str(first / "best") and set(baseline["test"]) == METRIC_KEYS
    for metric in ("recall@1", "map@r"):  # the same images, the same protocol
        assert baseline["test"][metric] == pytest.approx(earlier[metric], abs=1e-6)
        gain = results["best"]["test"][metric] - baseline["test"][metric]
        assert results["gain_over_baseline"][metric] == pytest.approx(gain)
    assert "minus the baseline: recall@1" in result.output


def test_embed_writes_embeddings_labels_and_paths(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert (
        invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", out, *TINY).exit_code
        == 0
    )
    npz = tmp_path / "emb.npz"
    result = invoke(
        "embed", "--model", out / "last", "--data", tiny_dataset, "--out", npz, "--workers", 0
    )
    assert result.exit_code == 0, result.output
    arrays = np.load(npz)
    assert arrays["embeddings"].shape == (20, 16) and arrays["embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(arrays["embeddings"], axis=1), 1, atol=1e-5)
    assert sorted(set(arrays["labels"].tolist())) == [0, 1, 2, 3]
    assert all(Path(p).exists() for p in arrays["paths"])


def test_training_lowers_the_loss_and_writes_per_epoch_metrics(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train", "--data", tiny_dataset, "--method", "margin", "--epochs", 6, "--out", out,
        "--lr", "1e-3", "--head-lr", "1e-2", "--eval-train", "--set", "iterations_per_epoch=5",
        *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))
    assert all(set(r["val"]) >= METRIC_KEYS and r["images_per_s"] > 0 for r in records)
    assert 0 <= records[0]["data_wait_fraction"] <= 1
    assert np.mean([r["loss"] for r in records[-2:]]) < records[0]["loss"]
    results = json.loads((out / "results.json").read_text())
    best_epoch = results["best"]["epoch"]
    assert results["best"]["val"]["recall@1"] == max(r["val"]["recall@1"] for r in records)
    assert records[best_epoch]["val"] == results["best"]["val"]
    assert "recall@1" in results["best"]["train"]  # memorisation check: train next to test


def test_finished_and_foreign_run_directories_are_refused(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert (
        invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", out, *TINY).exit_code
        == 0
    )
    again = invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", out, *TINY)
    assert again.exit_code == 2 and "finished run" in again.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", foreign, *TINY)
    assert refused.exit_code == 2 and "not a lookalike run" in refused.output
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/place"], "/nonexistent/place"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--preset", "nosuch"], "unknown preset 'nosuch'"),
        (["--batch-size", "7"], "not a multiple of samples_per_class"),
        (["--param", "nosuch=1"], "nosuch"),
        (["--base-loss", "triplet"], "base_loss"),
        (["--set", "image_size=abc"], "image_size"),
        (["--baseline", "/nonexistent/model"], "is not a lookalike model"),
    ],
)
def test_bad_training_arguments_end_in_one_line_errors(tiny_dataset, tmp_path, args, message):
    base = {"--data": str(tiny_dataset), "--method": "margin"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    extra = [part for pair in base.items() for part in pair]
    result = invoke("train", *TINY, *extra, "--iterations", 1, "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_max_classes_validates_on_training_classes_it_leaves_out(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", out,
                    "--max-classes", 4, "--val-fraction", 0.5, *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "last" / "card.json").read_text())["training_data"]
    assert data["train"] == {"classes": 4, "images": 24}  # all of train_0 .. train_3
    assert data["val"]["classes"] == 2  # two of train_4 .. train_7
    assert data["test"]["classes"] == 4


def test_a_class_with_one_image_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    write_image_folder(root / "train", ["a", "b"], per_class=3)
    write_image_folder(root / "train", ["lonely"], per_class=1, offset=5)
    write_image_folder(root / "test", ["c", "d"], per_class=3, offset=2)
    result = invoke("train", "--data", root, "--iterations", 1, "--out", tmp_path / "r", *TINY)
    assert result.exit_code == 2 and "lonely" in result.output and "1 image" in result.output


def test_unreadable_images_are_skipped_with_a_count(tiny_dataset, tmp_path):
    (tiny_dataset / "train" / "train_0" / "broken.png").write_bytes(b"not a png")
    (tiny_dataset / "test" / "test_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "run"
    result = invoke("train", "--data", tiny_dataset, "--iterations", 1, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "last" / "card.json").read_text())
    assert card["training_data"]["skipped_unreadable"] == 2


def test_corrupt_checkpoint_is_a_clear_cli_error(tiny_dataset, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{")
    result = invoke("evaluate", "--model", broken, "--data", tiny_dataset)
    assert result.exit_code == 2 and "corrupt" in result.output and "Traceback" not in result.output


def test_pretrained_export_is_a_loadable_1280d_model(tiny_dataset, tmp_path):
    result = invoke("pretrained", tmp_path / "pre", "--image-size", 32)
    assert result.exit_code == 0, result.output
    evaluated = invoke(
        "evaluate", "--model", tmp_path / "pre", "--data", tiny_dataset, "--workers", 0
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["recall@8"] >= metrics["recall@1"] > 0


def test_pretrained_takes_any_timm_backbone_and_a_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(weights))
    result = invoke("pretrained", tmp_path / "vit", "--backbone", "test_vit", "--weights", weights)
    assert result.exit_code == 0, result.output
    assert "160 px" in result.output and "file:vit.safetensors" in result.output
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for args, reason in [
        (("--backbone", "test_vit", "--weights", tmp_path / "junk.pth"), "cannot load timm model"),
        (("--backbone", "no_such_net"), "unknown backbone"),
        (("--backbone", "test_vit", "--weights", "none", "--image-size", 100), "cannot embed"),
    ]:
        failed = invoke("pretrained", tmp_path / "out", *args)
        assert failed.exit_code == 2 and reason in failed.output, (args, failed.output)
        assert "Traceback" not in failed.output and not (tmp_path / "out").exists()


def _lookalike(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *[str(a) for a in args]]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    """Kill a run mid-epoch with SIGKILL, rerun the same command: same final weights."""
    common = ["train", "--data", tiny_dataset, "--method", "margin", "--epochs", 3,
              "--set", "iterations_per_epoch=6", "--set", "checkpoint_every=2", "--lr", "1e-3",
              "--eval-every", 0, *TINY, "--image-size", 64]  # fmt: skip
    reference = tmp_path / "reference"
    subprocess.run(_lookalike(*common, "--out", reference), check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_lookalike(*common, "--out", resumed),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (resumed / "state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # the first snapshot is at batch 2 of 6: mid-epoch
    process.wait()
    assert not (resumed / "results.json").exists(), "the run finished before it could be killed"
    snapshot = torch.load(resumed / "state.pt", weights_only=False)
    assert 0 < snapshot["iteration"] < 18

    finished = subprocess.run(_lookalike(*common, "--out", resumed), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    expected = load_file(str(reference / "last" / "model.safetensors"))
    actual = load_file(str(resumed / "last" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_distributed_training_with_two_cpu_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()),
        "-m", "training.cli", "train", "--data", str(tiny_dataset), "--iterations", "3",
        "--device", "cpu", "--out", str(out), "--set", "iterations_per_epoch=3", *TINY,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 3
    assert set(results["last"]["test"]) == METRIC_KEYS


def test_every_shipped_preset_is_a_valid_config_for_its_method():
    """Presets are JSON a typo can break: each must validate, name a known method, and give that
    method only parameters its constructor takes."""
    tuned = {"diva-icons", "dvml-icons", "diva-cjk", "dvml-cjk"}
    assert {"icons", "cjk", "diva-cub200", *tuned} <= set(list_presets())
    for name in list_presets():
        config = resolve_config({"data": "unused"}, preset=name)
        method = METHODS[config.method]
        accepted = inspect.signature(method.__init__).parameters
        assert set(config.method_params) <= set(accepted), (name, config.method_params)
    variant = resolve_config({"data": "unused"}, preset="diva-icons")
    base = resolve_config({"data": "unused"}, preset="icons")
    assert variant.frozen_bn and variant.epochs == base.epochs and variant.lr == base.lr
    assert (variant.method, variant.method_params, variant.embedding_dim) == (
        "diva",
        {"rho": 0, "alpha_ssl": 0.1, "alpha_shared": 0.1, "alpha_intra": 0.1},  # validation's
        32,
    )


def test_the_recommended_preset_is_the_benchmarks_best_and_dvml_elsewhere(tmp_path):
    from training.config import RECOMMENDED_PRESETS, recommended_preset
    from training.data.benchmarks.common import write_manifest

    for benchmark, preset in (("IconThemes", "dvml-icons"), ("CJK-Fonts", "dvml-cjk")):
        root = tmp_path / benchmark
        root.mkdir()
        write_manifest(root, {"benchmark": benchmark})
        assert recommended_preset(str(root)) == preset
        assert recommended_preset(f"imagefolder:{root}") == preset  # the service's spec
    assert recommended_preset(str(tmp_path)) == "dvml"  # a user's ImageFolder: no manifest
    assert recommended_preset(f"cub200:{tmp_path}") == "dvml"
    for preset in (*RECOMMENDED_PRESETS.values(), "dvml"):
        config = resolve_config({"data": "unused"}, preset=preset)
        assert config.method == "dvml" and config.method_params["base_loss"] == "margin"


def test_train_help_lists_every_method_and_preset():
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for name in [*METHODS, *list_presets()]:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", shown), name


def test_every_benchmark_variant_names_a_method_and_parameters_it_takes():
    """benchmarks/baselines.py builds `lookalike train` commands from VARIANTS; a misspelt
    `--param` or a missing method preset would only fail minutes into a benchmark run."""
    from benchmarks.baselines import VARIANTS, variant_options

    for name, dataset in itertools.product(VARIANTS, ("icons", "cjk")):
        options = variant_options(name, dataset)
        flags_and_values = list(zip(options[::2], options[1::2], strict=True))
        pairs = dict(flags_and_values)
        assert pairs["--preset"] in list_presets(), (name, dataset)
        params = [value for flag, value in flags_and_values if flag == "--param"]
        overrides = {
            "data": "unused",
            "method": pairs.get("--method"),
            "method_params": dict(param.split("=") for param in params),
        }
        config = resolve_config(overrides, preset=pairs["--preset"])
        accepted = inspect.signature(METHODS[config.method].__init__).parameters
        assert set(config.method_params) <= set(accepted), (name, config.method_params)


def test_a_variant_preset_merges_its_method_params_into_its_base(tmp_path, monkeypatch):
    """`extends` overrides fields, but method parameters add up: a child that sets one
    parameter keeps the others its base chose."""
    base = {"epochs": 4, "method": "dvml", "method_params": {"base_loss": "margin", "rho": 1}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    child = {"extends": "base", "epochs": 2, "method_params": {"rho": 0}}
    (tmp_path / "child.json").write_text(json.dumps(child))
    monkeypatch.setattr(training.config, "PRESET_DIR", tmp_path)
    assert read_preset("child") == {
        "epochs": 2,
        "method": "dvml",
        "method_params": {"base_loss": "margin", "rho": 0},
    }


def test_the_benchmark_table_reports_mean_and_spread_over_seeds_for_both_models():
    from benchmarks.baselines import COLUMNS, spread_row

    def result(best_r1: float, last_r1: float, train_r1: float | None) -> dict:
        best = {"test": dict.fromkeys(COLUMNS, best_r1)}
        if train_r1 is not None:
            best["train"] = {"recall@1": train_r1}
        return {"best": best, "last": {"test": dict.fromkeys(COLUMNS, last_r1)}, "images_per_s": 10}

    results = [result(0.4, 0.5, 0.6), result(0.2, 0.5, 0.8)]
    best = spread_row("icons", "margin", results, "best").split(" | ")
    assert best[2] == "best-by-val, mean ± sd of 2 seeds"
    assert best[3] == "0.300 ± 0.141"  # recall@1: sample sd of (0.4, 0.2)
    assert best[3 + len(COLUMNS)] == "0.700 ± 0.141"  # train recall@1
    last = spread_row("icons", "margin", results, "last").split(" | ")
    assert last[3] == "0.500 ± 0.000"
    assert last[3 + len(COLUMNS)] == "-"  # no train metrics for the last model


def test_unwritable_outputs_are_one_error_line_and_exit_2_before_any_work(
    tiny_dataset, tmp_path, monkeypatch
):
    """`--out` on a file, `--json`/`--out` below a file, `pretrained` onto an existing artifact:
    one `error:` line and exit 2, checked before any model is loaded or image read."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    model = tmp_path / "pre"
    assert invoke("pretrained", model, "--image-size", 32).exit_code == 0

    def no_work(*_args, **_kwargs):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr("training.evaluation.embed.embed_split_with_artifact", no_work)
    monkeypatch.setattr("training.engine.trainer.Trainer.__init__", no_work)
    data = ("--data", tiny_dataset)
    cases = [
        (("train", *data, "--iterations", 1, "--out", a_file, *TINY), "is a file"),
        (("evaluate", "--model", model, *data, "--json", a_file / "m.json"), "is a file"),
        (("embed", "--model", model, *data, "--out", a_file / "e.npz"), "is a file"),
        (("embed", "--model", model, *data, "--out", tmp_path), "is a folder"),
        (("pretrained", model, "--image-size", 32), "already exists"),
        (("pretrained", a_file), "is a file"),
        (("export", model, "--out", a_file / "m.onnx"), "is a file"),
    ]  # fmt: skip
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and message in result.output, (args, result.output)
        assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1
    assert a_file.read_text() == "keep me"
    assert invoke("pretrained", model, "--image-size", 32, "--force").exit_code == 0
