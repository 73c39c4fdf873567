"""DiVA (Milbich et al. 2020): its losses, miners, head, momentum encoder and queue, a CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import training.methods.diva  # noqa: F401  (registers the method and its miners)
from training.checkpoint import load_embedder
from training.cli import app
from training.config import TrainConfig
from training.data.readers import load_dataset
from training.data.transforms import TransformConfig
from training.losses.dance import AdversarialDecorrelation, DaNCELoss, reverse_gradient
from training.losses.diva_miners import (
    IntraClassRandomMiner,
    RandomPermutedDistanceMiner,
    SharedNegativeDistanceMiner,
)
from training.losses.mining import MINERS, build_miner
from training.methods.base import Batch
from training.methods.diva import DiVA
from training.models.heads import DIVA_HEAD_NAMES as HEAD_NAMES
from training.models.heads import DiVAHead

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


class TinyNetwork(nn.Module):
    """Flatten, a learnable per-feature scale as the "backbone", then a DiVA head; returns the
    features under "features" as EmbeddingModel does, for DiVA's gradient norms."""

    def __init__(self, feature_dim: int, head_dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(feature_dim))
        self.head = DiVAHead(feature_dim, head_dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = images.flatten(1) * self.scale
        return {**self.head(features), "features": features}


def tiny_context(feature_dim: int = 12, head_dim: int = 4, batch_size: int = 4, **config):
    """What DiVA's hooks read of a run (a TrainingContext), around a tiny network."""
    cfg = TrainConfig(
        data="unused",
        batch_size=batch_size,
        samples_per_class=2,
        num_workers=0,
        image_size=32,
        channels_last=False,
        **config,
    )
    model = TinyNetwork(feature_dim, head_dim)
    return SimpleNamespace(
        model=model,
        cfg=cfg,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        transform=TransformConfig(image_size=32),
        report_phase=lambda phase, done, total: None,
    )


def diva_with_setup(run, head_dim: int = 4, **params) -> DiVA:
    method = DiVA(num_classes=4, embedding_dim=head_dim, **params)
    method.setup(run)
    return method


# ---------------------------------------------------------------- gradient reversal, decorrelation
def test_gradient_reversal_is_identity_forward_and_negates_the_gradient():
    x = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    (reverse_gradient(x) * upstream).sum().backward()
    reversed_grad = x.grad.clone()
    x.grad = None
    (x * upstream).sum().backward()
    torch.testing.assert_close(reverse_gradient(x), x)
    torch.testing.assert_close(x.grad, upstream)
    torch.testing.assert_close(reversed_grad, -upstream)


def identity_regressors(decorrelation: AdversarialDecorrelation) -> None:
    """xi(z) = relu(z): both linear layers identity, no bias."""
    for regressor in decorrelation.regressors.values():
        for layer in (regressor[0], regressor[2]):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)


def test_decorrelation_loss_matches_hand_computation_and_reverses_only_encoder_gradients():
    decorrelation = AdversarialDecorrelation(
        [("source", "target")], [2.0], 2, hidden_dim=2
    ).double()
    identity_regressors(decorrelation)
    # Inputs are L2-normalised first: (3, 4) -> (0.6, 0.8). xi = relu, then normalised:
    # row 1: (0.6, 0.8) against target (1, 0): squared products (0.36, 0) -> mean 0.18;
    # row 2: relu(-0.6, 0.8) = (0, 0.8) -> (0, 1) against (0.6, 0.8): (0, 0.64) -> mean 0.32.
    # l = -rho * mean(0.18, 0.32) = -2 * 0.25.
    source = torch.tensor([[3.0, 4.0], [-0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    terms = decorrelation({"source": source, "target": target})
    assert list(terms) == ["source-target"]
    assert terms["source-target"].item() == pytest.approx(-0.5)

    terms["source-target"].backward()
    regressor = decorrelation.regressors["source-target"]
    reversed_grads = [source.grad.clone(), target.grad.clone(), regressor[0].weight.grad.clone()]
    for tensor in (source, target, regressor[0].weight):
        tensor.grad = None
    # The same loss written out without the reversal layer.
    predicted = F.normalize(regressor(F.normalize(source, dim=-1)), dim=-1)
    plain = -2.0 * (F.normalize(target, dim=-1) * predicted).square().mean()
    plain.backward()
    torch.testing.assert_close(reversed_grads[0], -source.grad)
    torch.testing.assert_close(reversed_grads[1], -target.grad)
    torch.testing.assert_close(reversed_grads[2], regressor[0].weight.grad)  # xi learns normally


# ---------------------------------------------------------------- DaNCE
def log_inverse_density(d: float, dim: int = 4) -> float:
    return (2 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4)


def test_dance_loss_matches_hand_computation_with_per_row_weights():
    tau = 0.1
    queries = unit([1, 0, 0, 0], [0, 1, 0, 0])
    keys = unit([0.2, math.sqrt(0.96), 0, 0], [0, 0.3, math.sqrt(0.91), 0])
    queue = unit(
        [0.5, math.sqrt(0.75), 0, 0],  # q1.c = 0.5 (d = 1); q2.c = 0.866 (d = 0.518)
        [-0.5, 0, math.sqrt(0.75), 0],  # q1.c = -0.5 (d = 1.73 > 1.4: weight 0); q2.c = 0
        [0.8, 0, 0, 0.6],  # q1.c = 0.8 (d = 0.632); q2.c = 0 (d = 1.414 > 1.4: weight 0)
        [0, 0.95, math.sqrt(1 - 0.95**2), 0],  # q1.c = 0 (weight 0); q2.c = 0.95, d -> 0.5
    )
    loss = DaNCELoss(temperature=tau, normalise="row")(queries, keys, queue)

    # Row 1: the kept keys 1 and 3 share the weight; key 2 has weight 0 but similarity -0.5, so
    # its logit is 0 (exp(0) = 1 in the denominator), not -0.5 / tau.
    a, b = math.exp(log_inverse_density(1.0)), math.exp(log_inverse_density(math.sqrt(0.4)))
    row1 = [0.2, 0.5 * a / (a + b), 0.0, 0.8 * b / (a + b), 0.0]
    # Row 2: keys 1 and 4 (distance 0.316 clamped to 0.5) share the weight.
    c = math.exp(log_inverse_density(math.sqrt(2 - 2 * math.sqrt(0.75))))
    d = math.exp(log_inverse_density(0.5))
    row2 = [0.3, math.sqrt(0.75) * c / (c + d), 0.0, 0.0, 0.95 * d / (c + d)]

    def cross_entropy(logits: list[float]) -> float:
        return -logits[0] / tau + math.log(sum(math.exp(x / tau) for x in logits))

    expected = (cross_entropy(row1) + cross_entropy(row2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # Dropping the zero-weighted keys instead would give a different (lower) loss.
    dropped = (cross_entropy([x for i, x in enumerate(row1) if i != 2 and i != 4]) +
               cross_entropy(row2[:2] + row2[4:])) / 2  # fmt: skip
    assert dropped < expected - 0.005


def test_logit_weighting_is_importance_weighted_infonce_by_hand():
    tau = 0.1
    queries = unit([1, 0, 0, 0])
    keys = unit([0.2, math.sqrt(0.96), 0, 0])
    queue = unit(
        [0.5, math.sqrt(0.75), 0, 0],  # d = 1
        [-0.5, 0, math.sqrt(0.75), 0],  # d = 1.73 > 1.4: weight 0, drops out
        [0.8, 0, 0, 0.6],  # d = 0.632
    )
    loss = DaNCELoss(temperature=tau, weighting="logit", normalise="row")(queries, keys, queue)
    a, b = math.exp(log_inverse_density(1.0)), math.exp(log_inverse_density(math.sqrt(0.4)))
    # Weights a/(a+b), 0, b/(a+b), times N = 3 keys, on the exponentials.
    denominator = math.exp(0.2 / tau) + 3 * (
        a / (a + b) * math.exp(0.5 / tau) + b / (a + b) * math.exp(0.8 / tau)
    )
    assert loss.item() == pytest.approx(-0.2 / tau + math.log(denominator), rel=1e-6)


def test_logit_weighting_with_equal_weights_is_plain_infonce():
    queries = unit([1, 0, 0, 0], [0, 1, 0, 0])
    keys = unit([0.6, 0.8, 0, 0], [0, 0.6, 0.8, 0])
    # Every queue key at distance 1 from each query: uniform weights.
    h = math.sqrt(0.5)
    queue = unit([0.5, 0.5, h, 0], [0.5, 0.5, -h, 0], [0.5, 0.5, 0, h])
    loss = DaNCELoss(temperature=0.1, weighting="logit")(queries, keys, queue)
    logits = torch.cat([(queries * keys).sum(1, keepdim=True), queries @ queue.T], 1) / 0.1
    expected = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        DaNCELoss(weighting="exp")


def test_dance_gradient_reaches_only_the_queries():
    queries = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1).requires_grad_()
    keys = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1).requires_grad_()
    DaNCELoss()(queries, keys, queue).backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert keys.grad is None and queue.grad is None


def batch_weights_by_hand(queries, queue, lower=0.5, upper=1.4) -> list[list[float]]:
    """DiVA's released weights (`criteria/fast_moco.py`), one pair at a time."""
    dim, rows, columns = queries.shape[1], queries.tolist(), queue.tolist()
    weights = []
    for query in rows:
        row = []
        for key in columns:
            similarity = sum(a * b for a, b in zip(query, key, strict=True))
            d = max(math.sqrt(max(2 - 2 * similarity, 0.0)), lower)
            row.append(max(0.0 if d > upper else math.exp(log_inverse_density(d, dim)), 1e-45))
        weights.append(row)
    for j in range(len(columns)):  # each key's weights sum to 1 over the batch
        column = sum(row[j] for row in weights)
        for row in weights:
            row[j] /= column
    return weights


# Three queries, two partly aligned views each, and five queue keys in 4-d: keys 0, 1 and 4 lie
# within the 1.4 cutoff of some query, keys 2 and 3 beyond it for every query.
H = math.sqrt(0.75)
QUERIES = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0])
KEYS = unit([0.5, 0, 0, H], [0, 0.5, 0, H], [0, 0, 0.5, H])  # q.k+ = 0.5
QUEUE = unit(
    [0.8, 0.6, 0, 0],  # d = 0.632 from q1, 0.894 from q2, 1.414 from q3 (cut)
    [0, 0.95, 0, math.sqrt(1 - 0.95**2)],  # d = 0.316 (clamped to 0.5) from q2; q1, q3 cut
    [-0.6, 0, -0.8, 0],  # cut for every query
    [0, -0.6, 0, 0.8],  # cut for every query
    [0.5, 0, 0.5, math.sqrt(0.5)],  # d = 1 from q1 and q3; q2 cut
)
NEAR, FAR = [0, 1, 4], [2, 3]


def test_dance_batch_weights_and_loss_match_diva_released_code_by_hand():
    tau = 0.1
    dance = DaNCELoss(temperature=tau)
    loss = dance(QUERIES, KEYS, QUEUE)

    weights = batch_weights_by_hand(QUERIES, QUEUE)
    torch.testing.assert_close(
        dance.last_weights, torch.tensor(weights, dtype=torch.float64), rtol=1e-9, atol=1e-30
    )
    # A key cut for every query keeps 1/B on each (the 1e-45 floor, then the normalisation);
    # key 1 is within the cutoff of q2 only, which takes all of it.
    assert weights[0][2] == pytest.approx(1 / 3) and weights[1][1] == pytest.approx(1.0)
    similarities = (QUERIES @ QUEUE.T).tolist()
    expected = 0.0
    for i in range(3):
        logits = [0.5] + [s * w for s, w in zip(similarities[i], weights[i], strict=True)]
        expected += -logits[0] / tau + math.log(sum(math.exp(x / tau) for x in logits))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-9)


def query_gradient(queue: torch.Tensor, **options) -> torch.Tensor:
    queries = QUERIES.clone().requires_grad_()
    loss = DaNCELoss(temperature=0.1, **options)(queries, KEYS, queue)
    return torch.autograd.grad(loss, queries)[0]


def test_dance_gradient_comes_from_the_near_negatives():
    full = query_gradient(QUEUE)
    assert full.norm() > 1

    def change(gradient: torch.Tensor) -> float:
        return ((gradient - full).norm() / full.norm()).item()

    # Each key's batch-normalised weights do not depend on the other keys, so dropping some
    # leaves the rest as they were: the far keys barely move the gradient, the near ones do.
    assert change(query_gradient(QUEUE[NEAR])) < 0.02
    assert change(query_gradient(QUEUE[FAR])) > 0.5


def gradient_parts(queries, keys, queue, weights, tau):
    """d loss / d queries split into the positive's and the negatives' part, by hand.

    With logits z_0 = q.k+ / tau, z_j = w_j q.k_j / tau (w constant), softmax p and the mean
    over B queries: dL/dq = ((p_0 - 1) k+ + sum_j p_j w_j k_j) / (tau B).
    """
    logits = torch.cat([(queries * keys).sum(1, keepdim=True), queries @ queue.T * weights], 1)
    p = (logits / tau).softmax(dim=1)
    scale = tau * len(queries)
    return (p[:, :1] - 1) * keys / scale, (p[:, 1:] * weights) @ queue / scale


def test_per_query_weights_on_a_large_queue_leave_the_negatives_no_gradient():
    """Why `normalise="batch"` is the default: normalised over 4,096 keys, each query's weights
    are ~1e-3, every negative logit is ~0 and only the positive pulls.

    This needs the query's unit of weight to be shared by many keys, as in this 8-d queue; in
    high dimensions the inverse density is so peaked that its nearest few keys take most of it.
    """
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(8, 8, generator=generator, dtype=torch.float64), dim=1)
    other = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    other = F.normalize(other - (other * queries).sum(1, keepdim=True) * queries, dim=1)
    keys = 0.05 * queries + math.sqrt(1 - 0.05**2) * other  # q.k+ = 0.05: far from aligned
    queue = F.normalize(torch.randn(4096, 8, generator=generator, dtype=torch.float64), dim=1)

    negatives_share = {}
    for normalise in ("batch", "row"):
        dance = DaNCELoss(normalise=normalise)
        leaf = queries.clone().requires_grad_()
        gradient = torch.autograd.grad(dance(leaf, keys, queue), leaf)[0]
        positive, negatives = gradient_parts(queries, keys, queue, dance.last_weights, 0.01)
        torch.testing.assert_close(positive + negatives, gradient)
        assert gradient.norm() > 1  # the loss is far from saturated either way
        negatives_share[normalise] = (negatives.norm() / gradient.norm()).item()
    assert negatives_share["row"] < 1e-3
    assert negatives_share["batch"] > 0.5


def test_dance_normalise_is_validated_and_set_from_diva():
    with pytest.raises(ValueError, match="normalise"):
        DaNCELoss(normalise="column")
    with pytest.raises(ValueError, match="normalise"):
        DiVA(num_classes=4, embedding_dim=8, dance_normalise="column")
    assert DiVA(num_classes=4, embedding_dim=8).dance_loss.normalise == "batch"
    torch.manual_seed(0)
    for normalise, axis in (("batch", 0), ("row", 1)):
        trainer = tiny_context(batch_size=8)
        method = diva_with_setup(trainer, n_key_batches=2, dance_normalise=normalise)
        assert method.params["dance_normalise"] == normalise  # recorded in the model card
        with torch.no_grad():
            method.queue.copy_(F.normalize(torch.randn(16, 4), dim=1))
        images = torch.randn(8, 3, 2, 2)
        method.training_step(trainer.model, Batch([images, images], LABELS, torch.arange(8)))
        sums = method.dance_loss.last_weights.sum(dim=axis)
        torch.testing.assert_close(sums, torch.ones_like(sums))


# ---------------------------------------------------------------- miners
def test_diva_miners_are_registered_by_their_diva_names():
    assert MINERS["random_distance"] is RandomPermutedDistanceMiner
    assert MINERS["shared_neg_distance"] is SharedNegativeDistanceMiner
    assert isinstance(build_miner("intra_random"), IntraClassRandomMiner)


def test_intra_miner_draws_all_three_from_one_class_with_replacement():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    embeddings = torch.randn(8, 4)
    miner = IntraClassRandomMiner(generator=torch.Generator().manual_seed(0))
    draws = [miner(embeddings, labels) for _ in range(20)]
    anchors, positives, negatives = (torch.cat([draw[i] for draw in draws]) for i in range(3))
    assert len(anchors) == 20 * 8  # B triplets per call
    assert torch.equal(labels[anchors], labels[positives])
    assert torch.equal(labels[anchors], labels[negatives])
    assert (anchors == positives).any()  # drawn with replacement: degenerate triplets occur
    assert set(labels[anchors].tolist()) == {0, 1, 2, 3}
    # Class 3 has a single image, so its triplets are (7, 7, 7).
    in_class_3 = labels[anchors] == 3
    assert in_class_3.any() and (positives[in_class_3] == 7).all()


def test_permuted_miner_positives_share_the_permuted_label():
    embeddings = F.normalize(torch.randn(8, 16), dim=1)
    miner = RandomPermutedDistanceMiner(generator=torch.Generator().manual_seed(5))
    permuted = RandomPermutedDistanceMiner(generator=torch.Generator().manual_seed(5)).permute(
        LABELS
    )
    anchors, positives, negatives = miner(embeddings, LABELS)
    assert sorted(permuted.tolist()) == sorted(LABELS.tolist())
    assert len(anchors) == 8  # every permuted label still occurs twice
    assert (anchors != positives).all()
    assert torch.equal(permuted[anchors], permuted[positives])
    assert (permuted[anchors] != permuted[negatives]).all()
    assert (LABELS[anchors] != LABELS[positives]).any()  # "positives" from other true classes


def test_shared_negative_miner_takes_the_positive_from_a_third_class():
    embeddings = F.normalize(torch.randn(8, 16), dim=1)
    miner = SharedNegativeDistanceMiner(generator=torch.Generator().manual_seed(1))
    anchors, positives, negatives = miner(embeddings, LABELS)
    assert torch.equal(anchors, torch.arange(8))
    assert (LABELS[negatives] != LABELS[anchors]).all()
    assert (LABELS[positives] != LABELS[anchors]).all()
    assert (LABELS[positives] != LABELS[negatives]).all()
    two_classes = torch.tensor([0, 0, 1, 1])
    assert all(len(part) == 0 for part in miner(embeddings[:4], two_classes))


# ---------------------------------------------------------------- margin losses and beta
def margin_by_hand(embeddings, beta_labels, beta, triplets, margin=0.2):
    a, p, n = triplets
    total, active = 0.0, 0
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        b = beta[beta_labels[i]].item()
        d_ap = math.sqrt(((embeddings[i] - embeddings[j]) ** 2).sum().item() + 1e-8)
        d_an = math.sqrt(((embeddings[i] - embeddings[k]) ** 2).sum().item() + 1e-8)
        for hinge in (d_ap - b + margin, b - d_an + margin):
            total += max(hinge, 0.0)
            active += hinge > 0
    return total / max(active, 1)


@pytest.mark.parametrize("task", ["shared", "intra"])
def test_shared_and_intra_margin_losses_index_beta_by_the_original_label(task):
    method = DiVA(num_classes=4, embedding_dim=16)
    loss = getattr(method, f"{task}_loss")
    betas = torch.tensor([0.3, 0.8, 1.3, 1.8])
    with torch.no_grad():
        loss.beta.copy_(betas)
    embeddings = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    torch.manual_seed(0)
    value = loss(embeddings, LABELS).item()
    torch.manual_seed(0)
    triplets = loss.miner(embeddings, LABELS)
    assert value == pytest.approx(margin_by_hand(embeddings, LABELS, betas, triplets), rel=1e-5)
    if task == "shared":
        torch.manual_seed(0)
        permuted = loss.miner.permute(LABELS)  # the miner's first draw is this permutation
        wrong = margin_by_hand(embeddings, permuted, betas, triplets)
        assert value != pytest.approx(wrong, rel=1e-3)


def test_each_margin_task_has_its_own_betas_and_the_published_learning_rates():
    method = DiVA(num_classes=5, embedding_dim=8)
    groups = method.parameter_groups()
    betas, beta_lr = groups["betas"]
    assert beta_lr == 5e-4 and len(betas) == 3 and len({id(b) for b in betas}) == 3
    assert all(b.shape == (5,) and torch.all(b == 1.2) for b in betas)
    regressors, regressor_lr = groups["decorrelation"]
    assert regressor_lr == 1e-5
    assert len(regressors) == 3 * 4  # three 8-512-8 regressors, two Linear layers each
    assert regressors[0].shape == (512, 8)
    assert method.decorrelation.weights == [1500.0, 1500.0, 1500.0]


def test_unknown_sharing_mode_is_refused():
    with pytest.raises(ValueError, match="sharing"):
        DiVA(num_classes=4, embedding_dim=8, sharing="full")


# ---------------------------------------------------------------- head
def test_test_time_embedding_is_the_weighted_concatenation_renormalised():
    head = DiVAHead(6, 4, weights=(0.5, 1.0, 1.5, 2.0))
    features = torch.randn(3, 6)
    outputs = head(features)
    assert head.embedding_dim == 16 and outputs["embedding"].shape == (3, 16)
    for name in HEAD_NAMES:
        linear = head.projections[name]
        torch.testing.assert_close(outputs[name], F.normalize(linear(features), dim=1))
    # Each head is unit-norm, so the concatenation has norm sqrt(0.25 + 1 + 2.25 + 4).
    expected = torch.cat(
        [0.5 * outputs["discriminative"], outputs["selfsimilarity"],
         1.5 * outputs["shared"], 2.0 * outputs["intra"]], dim=1,
    ) / math.sqrt(7.5)  # fmt: skip
    torch.testing.assert_close(outputs["embedding"], expected)
    with pytest.raises(ValueError, match="one weight per head"):
        DiVAHead(6, 4, weights=(1.0, 1.0))


# ---------------------------------------------------------------- momentum encoder and queue
def test_key_model_is_a_frozen_eval_mode_copy_saved_in_the_state_dict():
    trainer = tiny_context()
    method = diva_with_setup(trainer, n_key_batches=3)
    assert method.queue.shape == (3 * 4, 4)
    method.train()
    assert not method.key_model.training
    assert not any(p.requires_grad for p in method.key_model.parameters())
    for key, online in zip(method.key_model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(key, online) and key.data_ptr() != online.data_ptr()

    with torch.no_grad():
        method.queue.normal_()
        next(method.key_model.parameters()).add_(1.0)
    restored = diva_with_setup(tiny_context(), n_key_batches=3)
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.queue, method.queue)
    torch.testing.assert_close(
        next(restored.key_model.parameters()), next(method.key_model.parameters())
    )


def test_momentum_update_follows_the_formula():
    trainer = tiny_context()
    method = diva_with_setup(trainer)
    online = trainer.model
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = [p.clone() for p in method.key_model.parameters()]
    method.momentum_update(online)
    for key, old, query in zip(method.key_model.parameters(), before, online.parameters(),
                               strict=True):  # fmt: skip
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query)


def test_queue_is_first_in_first_out():
    method = diva_with_setup(tiny_context(), n_key_batches=2)  # 8 keys of dimension 4
    with torch.no_grad():
        method.queue.copy_(torch.arange(32.0).reshape(8, 4))
    new_keys = -torch.arange(12.0).reshape(3, 4)
    method.enqueue(new_keys)
    torch.testing.assert_close(
        method.queue, torch.cat([torch.arange(12.0, 32.0).reshape(5, 4), new_keys])
    )


DECORRELATION_TERMS = [
    f"decorrelation_{source}-discriminative" for source in ("selfsimilarity", "shared", "intra")
]
GRADIENT_NORMS = [f"grad_norm_{term}" for term in (*HEAD_NAMES, *DECORRELATION_TERMS)]


def test_training_step_and_step_end_combine_losses_and_advance_key_model_and_queue():
    trainer = tiny_context(batch_size=8)
    method = diva_with_setup(trainer, n_key_batches=2)
    with torch.no_grad():
        method.queue.copy_(F.normalize(torch.randn(16, 4), dim=1))
    view_a, view_b = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    batch = Batch([view_a, view_b], LABELS, torch.arange(8))
    queue_before = method.queue.clone()
    total, logs = method.training_step(trainer.model, batch)

    assert set(logs) == {
        "loss_discriminative", "loss_selfsimilarity", "loss_shared", "loss_intra",
        *DECORRELATION_TERMS, "dance_negatives_weight_gt_0.01", *GRADIENT_NORMS,
    }  # fmt: skip
    expected = (
        logs["loss_discriminative"]
        + 0.3 * (logs["loss_selfsimilarity"] + logs["loss_shared"] + logs["loss_intra"])
        + sum(v for k, v in logs.items() if k.startswith("decorrelation_"))
    )
    torch.testing.assert_close(total.detach(), expected)

    keys = method.key_model(view_b)["selfsimilarity"]
    key_before = [p.clone() for p in method.key_model.parameters()]
    total.backward()
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.sub_(0.1 * parameter.grad)
    method.on_step_end(trainer)
    torch.testing.assert_close(method.queue, torch.cat([queue_before[8:], keys]))
    for key, old, query in zip(method.key_model.parameters(), key_before,
                               trainer.model.parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query)


def test_training_step_logs_negatives_and_gradient_norms_without_touching_grads_or_rng():
    torch.manual_seed(0)
    trainer = tiny_context(batch_size=8)
    model, method = trainer.model, diva_with_setup(trainer, n_key_batches=2)
    with torch.no_grad():
        method.queue.copy_(F.normalize(torch.randn(16, 4), dim=1))
    view_a, view_b = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    torch.manual_seed(1)
    _, logs = method.training_step(model, Batch([view_a, view_b], LABELS, torch.arange(8)))
    rng_after_step = torch.get_rng_state()
    assert all(p.grad is None for p in [*model.parameters(), *method.parameters()])
    assert all(math.isfinite(logs[name]) and logs[name] > 0 for name in GRADIENT_NORMS)

    # The same terms again, drawing the miners' random numbers in the same order.
    outputs = model(view_a)
    keys = method.key_model(view_b)["selfsimilarity"]
    torch.manual_seed(1)
    weighted = {
        "discriminative": method.discriminative_loss(outputs["discriminative"], LABELS),
        "selfsimilarity": 0.3 * method.dance_loss(outputs["selfsimilarity"], keys, method.queue),
        "shared": 0.3 * method.shared_loss(outputs["shared"], LABELS),
        "intra": 0.3 * method.intra_loss(outputs["intra"], LABELS),
    }
    assert torch.equal(torch.get_rng_state(), rng_after_step)  # the diagnostics draw nothing
    for name, term in weighted.items():
        gradient = torch.autograd.grad(term, outputs["features"], retain_graph=True)[0]
        assert logs[f"grad_norm_{name}"].item() == pytest.approx(gradient.norm().item(), rel=1e-5)
    weights = batch_weights_by_hand(outputs["selfsimilarity"].detach().double(), method.queue)
    heavy = sum(w > 0.01 for row in weights for w in row) / 8
    assert heavy > 0 and logs["dance_negatives_weight_gt_0.01"].item() == pytest.approx(heavy)


def test_queue_is_filled_from_training_batches_without_touching_the_global_rng(tiny_dataset):
    def filled_queue() -> torch.Tensor:
        torch.manual_seed(0)
        trainer = tiny_context(feature_dim=3 * 32 * 32, head_dim=8, batch_size=4, seed=3)
        trainer.train = load_dataset(str(tiny_dataset)).train
        method = diva_with_setup(trainer, head_dim=8, n_key_batches=2)
        rng = torch.get_rng_state()
        method.on_train_start(trainer)
        assert torch.equal(torch.get_rng_state(), rng)
        return method.queue

    queue = filled_queue()
    assert queue.shape == (2 * 4, 8)
    torch.testing.assert_close(queue.norm(dim=1), torch.ones(8))
    assert len({tuple(row.tolist()) for row in queue}) == 8  # eight different images or crops
    torch.testing.assert_close(filled_queue(), queue)  # reproducible


# ---------------------------------------------------------------- end to end
TINY = [
    "--image-size", "32", "--batch-size", "8", "--samples-per-class", "2",
    "--workers", "0", "--embedding-dim", "16", "--set", "eval_batch_size=32",
]  # fmt: skip


def test_diva_trains_from_the_cli_and_its_checkpoint_evaluates_and_loads(tiny_dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "diva"
    result = runner.invoke(app, [
        "train", "--data", str(tiny_dataset), "--method", "diva", "--iterations", "2",
        "--out", str(out), "--param", "n_key_batches=1", *TINY,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
    terms = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["terms"]
    tasks = {f"loss_{task}" for task in ("discriminative", "selfsimilarity", "shared", "intra")}
    assert tasks <= set(terms) and all(math.isfinite(value) for value in terms.values())
    assert {"dance_negatives_weight_gt_0.01", *GRADIENT_NORMS} <= set(terms)
    assert all(terms[name] > 0 for name in GRADIENT_NORMS)  # every term trains the backbone
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["method"]["name"] == "diva"
    assert card["architecture"]["head"] == "diva" and card["embedding_dim"] == 64

    evaluated = runner.invoke(app, ["evaluate", "--model", str(out / "best"), "--data",
                                    str(tiny_dataset), "--workers", "0"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert 0 < json.loads(evaluated.stdout.strip().splitlines()[-1])["recall@1"] <= 1

    embedder = load_embedder(out / "best")
    assert embedder.dimension == 64
    vectors = embedder.embed([Image.open(Path(tiny_dataset, "test", "test_0", "000.png"))])
    assert vectors.shape == (1, 64)
    assert float((vectors**2).sum()) == pytest.approx(1.0, abs=1e-5)
