"""DVML (Lin et al. 2018): its head, its four losses, the two phases and end-to-end training."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import training.methods.dvml  # noqa: F401  (registers the "dvml" method)
from tests.conftest import draw_sample
from training.checkpoint import load_embedder
from training.cli import app
from training.losses import MarginLoss, NPairLoss, TripletLoss
from training.methods.base import Batch
from training.methods.dvml import DVMLMethod, FeatureReconstructionLoss, StandardNormalKL
from training.models.embedding import EmbeddingModel, ModelSpec
from training.models.heads import DVMLHead

FEATURE_DIM, EMBEDDING_DIM, CLASSES = 12, 8, 4
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
TINY = [
    "--image-size", "32", "--batch-size", "8", "--samples-per-class", "2",
    "--workers", "0", "--embedding-dim", "16", "--set", "eval_batch_size=32",
]  # fmt: skip


class PooledFeaturesModel(nn.Module):
    """Stands in for `EmbeddingModel`: its "images" are already the pooled backbone features,
    so the tests see exactly which gradients reach h."""

    def __init__(self, method: DVMLMethod) -> None:
        super().__init__()
        options = {**method.head_options(), "decoder_hidden_dim": 16}
        self.head = DVMLHead(FEATURE_DIM, EMBEDDING_DIM, **options)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.head(images)
        outputs["features"] = images
        return outputs


def make_method(**params) -> DVMLMethod:
    return DVMLMethod(num_classes=CLASSES, embedding_dim=EMBEDDING_DIM, **params)


def only(term: str, **params) -> DVMLMethod:
    """A method whose total loss is one term (weight 1 in both phases, the others 0)."""
    weights = {f"{name}_weight": (0.0, 0.0) for name in ("kl", "rec", "syn", "inv")}
    weights[f"{term}_weight"] = (1.0, 1.0)
    return make_method(**weights, **params)


def step(method: DVMLMethod, phase: int = 1, prepare=None):
    """One backward pass on 4 classes x 2 random features; returns (model, features, loss, logs).

    `prepare(model)` runs before the step (e.g. to hook the decoder)."""
    torch.manual_seed(0)
    model = PooledFeaturesModel(method)
    if prepare is not None:
        prepare(model)
    features = torch.randn(len(LABELS), FEATURE_DIM, requires_grad=True)
    method.phase.fill_(phase)
    loss, logs = method.training_step(model, Batch([features], LABELS, torch.arange(len(LABELS))))
    loss.backward()
    return model, features, loss, logs


def gradient_size(tensor: torch.Tensor) -> float:
    return 0.0 if tensor.grad is None else tensor.grad.abs().sum().item()


def test_kl_equals_the_closed_form_by_hand():
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    log_variance = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # Row 1: 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)] = 1 - ln2 / 2; row 2: 0; batch mean.
    expected = (1.0 - math.log(2.0) / 2) / 2
    assert StandardNormalKL()(mean, log_variance).item() == pytest.approx(expected)


def test_reconstruction_is_the_mse_over_all_samples_and_reaches_the_target_by_hand():
    reconstructions = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])  # T = 2 samples of B = 1
    features = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = FeatureReconstructionLoss()(reconstructions, features)
    assert loss.item() == pytest.approx((0 + 4 + 1 + 0) / 4)
    loss.backward()
    # d/dh of mean (r - h)^2 over 4 entries, summed over both samples: -(r - h) / 2.
    torch.testing.assert_close(features.grad, torch.tensor([[0.5, -1.0]]))

    detached = torch.tensor([[1.0, 0.0]], requires_grad=True)
    FeatureReconstructionLoss(detach_target=True)(reconstructions, detached)
    assert detached.grad is None


@pytest.mark.parametrize("phase", [1, 2])
def test_syn_loss_trains_the_variance_encoder_through_the_reparameterised_sample(phase):
    model, _, _, logs = step(only("syn", base_loss="npair"), phase)
    assert logs["syn"] > 0
    assert gradient_size(model.head.mean.weight) > 0
    assert gradient_size(model.head.log_variance.weight) > 0


def test_rec_loss_reaches_the_encoders_in_phase_2_only():
    model, features, _, logs = step(only("rec"), phase=1)
    assert logs["rec"] > 0
    for encoder in (model.head.invariant, model.head.mean, model.head.log_variance):
        assert gradient_size(encoder.weight) == 0  # the decoder input z is detached
    assert gradient_size(model.head.decoder[0].weight) > 0
    assert gradient_size(features) > 0  # the target h is not detached (public codes)

    model, _, _, _ = step(only("rec"), phase=2)
    for encoder in (model.head.invariant, model.head.mean, model.head.log_variance):
        assert gradient_size(encoder.weight) > 0


def test_detach_target_stops_the_reconstruction_gradient_into_the_features():
    _, features, _, logs = step(only("rec", detach_target=True), phase=1)
    assert logs["rec"] > 0
    assert gradient_size(features) == 0


@pytest.mark.parametrize("term", ["kl", "syn"])
def test_detach_variance_input_keeps_the_variance_terms_off_the_features(term):
    _, features, _, _ = step(only(term, base_loss="npair"), phase=2)
    assert gradient_size(features) > 0  # the paper's default: KL and z_V reach h

    model, features, _, logs = step(only(term, base_loss="npair", detach_variance_input=True), 2)
    assert logs[term] > 0
    assert gradient_size(model.head.mean.weight) > 0
    assert gradient_size(model.head.log_variance.weight) > 0
    if term == "kl":
        assert gradient_size(features) == 0
    else:  # L_syn still trains h through z_I = invariant(h)
        assert gradient_size(features) > 0
        assert gradient_size(model.head.invariant.weight) > 0


def test_the_decoder_sees_T_samples_per_image_in_phase_2():
    rows: list[int] = []

    def record_decoder_rows(model: PooledFeaturesModel) -> None:
        model.head.decoder.register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))

    method = make_method()
    step(method, phase=1, prepare=record_decoder_rows)
    step(method, phase=2, prepare=record_decoder_rows)
    step(make_method(num_samples=(2, 3)), phase=2, prepare=record_decoder_rows)
    assert rows == [8, 20 * 8, 3 * 8]


@pytest.mark.parametrize(
    ("phase", "weights"), [(1, (1.0, 1.0, 0.1, 1.0)), (2, (0.8, 1.0, 0.2, 0.8))]
)
def test_the_loss_is_the_published_phase_weighted_sum_of_the_logged_terms(phase, weights):
    _, _, loss, logs = step(make_method(base_loss="margin"), phase)
    terms = ("kl", "rec", "syn", "inv")
    expected = sum(weight * logs[term] for weight, term in zip(weights, terms, strict=True))
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert logs["phase"] == phase


def test_the_phase_switches_at_the_configured_iteration_and_survives_a_state_dict():
    method = make_method(phase1_fraction=0.25)
    trainer = SimpleNamespace(total_iterations=8, iteration=0)
    method.setup(trainer)
    phases = [int(method.phase)]
    for trainer.iteration in range(1, 5):
        method.on_step_end(trainer)
        phases.append(int(method.phase))
    assert phases == [1, 1, 2, 2, 2]  # iterations 0 and 1 (25% of 8) are phase 1

    restored = make_method(phase1_fraction=0.25)
    assert int(restored.phase) == 1
    restored.load_state_dict(method.state_dict())
    assert int(restored.phase) == 2

    no_first_phase = make_method(phase1_fraction=0.0)
    no_first_phase.setup(trainer)
    assert int(no_first_phase.phase) == 2


@pytest.mark.parametrize(
    ("base_loss", "loss_type"),
    [("triplet", TripletLoss), ("npair", NPairLoss), ("margin", MarginLoss)],
)
def test_each_base_loss_runs_as_two_independent_instances(base_loss, loss_type):
    method = make_method(base_loss=base_loss)
    assert isinstance(method.synthesised_loss, loss_type)
    assert isinstance(method.invariant_loss, loss_type)
    assert method.synthesised_loss is not method.invariant_loss
    _, _, loss, logs = step(method, phase=2)
    assert torch.isfinite(loss) and set(logs) == {"kl", "rec", "syn", "inv", "phase"}
    groups = method.parameter_groups()
    if base_loss == "margin":  # one beta per instance, at the margin loss's own lr
        assert set(groups) == {"syn_loss", "inv_loss"}
        assert groups["syn_loss"] == ([method.synthesised_loss.beta], 5e-4)
        assert groups["inv_loss"] == ([method.invariant_loss.beta], 5e-4)
    else:
        assert groups == {}


def test_base_loss_params_reach_both_instances():
    method = make_method(base_loss="triplet", base_loss_params={"margin": 0.3, "mining": "hard"})
    for criterion in (method.synthesised_loss, method.invariant_loss):
        assert (criterion.margin, criterion.mining) == (0.3, "hard")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kl_weight": 1.0}, "one value per phase"),
        ({"syn_weight": [0.1, 0.2, 0.3]}, "one value per phase"),
        ({"num_samples": [0, 20]}, "at least 1"),
        ({"phase1_fraction": 1.5}, r"\[0, 1\]"),
        ({"base_loss": "nosuch"}, "unknown loss 'nosuch'"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        make_method(**params)


def test_the_test_time_embedding_is_the_deterministic_invariant_code():
    spec = ModelSpec(
        head="dvml", embedding_dim=EMBEDDING_DIM, head_options={"decoder_hidden_dim": 16}
    )
    torch.manual_seed(0)
    model = EmbeddingModel(spec, weights="none").eval()
    images = torch.randn(3, 3, 32, 32)
    first, second = model.embed(images), model.embed(images)
    assert first.shape == (3, EMBEDDING_DIM)
    assert torch.equal(first, second)
    with torch.no_grad():
        invariant = F.normalize(model.head.invariant(model.features(images)), dim=-1)
    torch.testing.assert_close(first, invariant)


@pytest.mark.parametrize("base_loss", ["triplet", "npair", "margin"])
def test_dvml_trains_through_both_phases_and_its_checkpoint_loads(
    tiny_dataset, tmp_path, base_loss
):
    out = tmp_path / base_loss
    runner = CliRunner()
    trained = runner.invoke(
        app,
        ["train", "--data", str(tiny_dataset), "--method", "dvml", "--iterations", "2",
         "--out", str(out), "--base-loss", base_loss,
         "--param", "phase1_fraction=0.5", *TINY],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["terms"]) == {"kl", "rec", "syn", "inv", "phase"}
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["method"]["name"] == "dvml"
    assert card["method"]["params"]["base_loss"] == base_loss
    assert card["architecture"]["head"] == "dvml"
    assert card["architecture"]["head_options"] == {
        "decoder_hidden_dim": 512,
        "detach_variance_input": False,
    }

    evaluated = runner.invoke(
        app,
        ["evaluate", "--model", str(out / "best"), "--data", str(tiny_dataset),
         "--json", str(tmp_path / "m.json"), "--workers", "0"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "recall@1" in json.loads((tmp_path / "m.json").read_text())

    embedder = load_embedder(out / "best")
    embeddings = embedder.embed([draw_sample(0, 0), draw_sample(1, 0)])
    assert embeddings.shape == (2, 16)
    assert embeddings == pytest.approx(embedder.embed([draw_sample(0, 0), draw_sample(1, 0)]))
