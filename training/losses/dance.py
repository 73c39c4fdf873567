"""DiVA's sample-specific DaNCE loss and the adversarial decorrelation between its embeddings.

Milbich, Roth et al., "DiVA: Diverse Visual Feature Aggregation for Deep Metric Learning",
ECCV 2020; formulas and defaults from its released code (criteria/fast_moco.py,
criteria/adversarial_separation.py, parameters.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015).

    Written with static methods and ctx: DiVA's legacy non-static `GradRev` fails on current
    PyTorch (its criteria/adversarial_separation.py).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        return -grad_output


def reverse_gradient(x: Tensor) -> Tensor:
    """`x` unchanged, but gradients flowing back through it change sign."""
    return GradientReversal.apply(x)


class DaNCELoss(nn.Module):
    """Distance-adapted noise-contrastive estimation against a queue of momentum keys.

    Logits are the positive q.k+ and, for every queue key k_j, (q.k_j) * w_ij, divided by the
    temperature; the loss is cross-entropy with the positive at index 0. The weights (no
    gradient) follow the inverse density of distances on the unit sphere in D dimensions
    (D = the query dimension), as in distance-weighted sampling: d_ij = |q_i - k_j| clamped below
    at `lower_cutoff`, log w = (2 - D) log d - ((D - 3) / 2) log(1 - d^2 / 4), w = 0 beyond
    `upper_cutoff`, w >= 1e-45, then normalised.

    `normalise="batch"` (the default) is what DiVA's released code computes and what its
    published numbers come from (`criteria/fast_moco.py`: `w / w.sum(dim=0)`): each queue key's
    weights sum to 1 over the B queries of the batch, so a key near a few queries keeps weights
    of order 1 on them (the inverse density is sharply peaked) and every key keeps about 1/B.
    `normalise="row"` (DiVA's `--diva_fixed`) makes each query's weights sum to 1 over the N
    queue keys instead: one unit spread over thousands of keys, which flattens most negative
    logits to ~0.

    Either way w <= 1 scales the similarity, so no negative logit exceeds q.k_j / tau, and
    with tau = 0.01 the loss is ~0 as soon as the positive view is the most similar key. On
    IconThemes the sample-specific head also collapses (most pairs closer than the 0.5 cutoff,
    so the weights flatten to ~1/B): the loss is 0.0000 from the second epoch with either
    normalisation at tau = 0.01, and 2.8 at tau = 0.2 (docs/results.md, issue 15).

    Because w scales the similarity, not the exponential, a zero-weighted key still adds
    exp(0) = 1 to the softmax denominator. `weighting="logit"` (not in DiVA's code) puts the
    weights on the exponential instead, logit_j = q.k_j / tau + log(w_ij / mean(w)): an
    importance-weighted InfoNCE whose zero-weighted keys drop out and whose uniform weights
    give plain InfoNCE.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.01,  # all DiVA sample runs (SampleRuns/); code default 0.1
        lower_cutoff: float = 0.5,  # DiVA --diva_moco_lower_cutoff (parameters.py)
        upper_cutoff: float = 1.4,  # DiVA --diva_moco_upper_cutoff (parameters.py)
        weighting: Literal["similarity", "logit"] = "similarity",  # DiVA's criteria/fast_moco.py
        normalise: Literal["batch", "row"] = "batch",  # DiVA's released fast_moco.py
    ) -> None:
        super().__init__()
        if weighting not in ("similarity", "logit"):
            raise ValueError(f"weighting must be 'similarity' or 'logit', got {weighting!r}")
        if normalise not in ("batch", "row"):
            raise ValueError(f"normalise must be 'batch' or 'row', got {normalise!r}")
        self.weighting = weighting
        self.normalise = normalise
        self.temperature = temperature
        self.lower_cutoff = lower_cutoff
        self.upper_cutoff = upper_cutoff
        # The B x N weights of the latest forward (no gradient), kept for diagnostics: a caller
        # can log how many negatives carry weight without computing them again.
        self.last_weights: Tensor | None = None

    def forward(self, queries: Tensor, keys: Tensor, queue: Tensor) -> Tensor:
        """Loss of unit-norm `queries` (B x D), their positive `keys` (B x D), `queue` (N x D)."""
        keys, queue = keys.detach().to(queries.dtype), queue.detach().to(queries.dtype)
        # Full precision even under autocast: a bf16 similarity is off by up to ~0.004, which a
        # temperature of 0.01 turns into logit errors of ~0.4.
        with torch.autocast(queries.device.type, enabled=False):
            positive = (queries * keys).sum(dim=1, keepdim=True)
            similarities = queries @ queue.T
            weights = self.negative_weights(similarities.detach(), queries.shape[1])
            self.last_weights = weights
            if self.weighting == "similarity":
                negatives = similarities * weights / self.temperature
            else:
                negatives = similarities / self.temperature + (weights / weights.mean()).log()
            logits = torch.cat([positive / self.temperature, negatives], dim=1)
            targets = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
            return F.cross_entropy(logits, targets)

    def negative_weights(self, similarities: Tensor, dim: int) -> Tensor:
        """Normalised weights (B x N) of the queue keys from their cosine similarities."""
        distances = (2.0 - 2.0 * similarities).clamp(min=0.0).sqrt().clamp(min=self.lower_cutoff)
        one_minus = (1.0 - distances.square() / 4.0).clamp(min=torch.finfo(distances.dtype).tiny)
        log_weights = (2.0 - dim) * distances.log() - ((dim - 3.0) / 2.0) * one_minus.log()
        log_weights = log_weights.masked_fill(distances > self.upper_cutoff, -math.inf)
        # DiVA subtracts one global max over all pairs. The max here is taken per normalised
        # group (column or row) and over the kept keys only: after the normalisation the result
        # is the same, but a far key (whose log-weight grows again towards d = 2), or a distant
        # group, can no longer underflow every kept weight to the 1e-45 floor.
        axis = 0 if self.normalise == "batch" else 1
        group_max = log_weights.amax(dim=axis, keepdim=True)
        group_max = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))
        weights = (log_weights - group_max).exp().clamp(min=1e-45)
        return weights / weights.sum(dim=axis, keepdim=True)


class AdversarialDecorrelation(nn.Module):
    """Makes one embedding unpredictable from another (DiVA's adversarial separation).

    Per direction (source, target) with weight rho, a regressor xi (Linear-ReLU-Linear) maps the
    source to the target's space and l = -rho * mean_batch(mean_dims((z_t * n(xi(z_s)))^2)), n =
    L2 normalisation: the mean of element-wise squared products, not a squared dot product.
    Every embedding passes a gradient-reversal layer first, so minimising l trains xi to predict
    the target while the encoder and heads are pushed to make that prediction fail.
    """

    def __init__(
        self,
        directions: Sequence[tuple[str, str]],
        weights: Sequence[float],
        embedding_dim: int,
        *,
        hidden_dim: int = 512,  # DiVA --diva_decorrnet_dim (parameters.py)
    ) -> None:
        super().__init__()
        if len(weights) != len(directions):
            raise ValueError(f"{len(directions)} directions need as many weights, got {weights}")
        self.directions = [(source, target) for source, target in directions]
        self.weights = [float(weight) for weight in weights]
        self.regressors = nn.ModuleDict(
            {
                self.key(direction): nn.Sequential(
                    nn.Linear(embedding_dim, hidden_dim),
                    nn.ReLU(),
                    nn.Linear(hidden_dim, embedding_dim),
                )
                for direction in self.directions
            }
        )

    @staticmethod
    def key(direction: tuple[str, str]) -> str:
        """The name of a direction, as DiVA writes it: "source-target"."""
        source, target = direction
        return f"{source}-{target}"

    def forward(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One loss term per direction, keyed "source-target"."""
        normalised = {
            name: F.normalize(reverse_gradient(embedding), dim=-1)
            for name, embedding in embeddings.items()
        }
        terms = {}
        for (source, target), weight in zip(self.directions, self.weights, strict=True):
            key = self.key((source, target))
            predicted = F.normalize(self.regressors[key](normalised[source]), dim=-1)
            correlation = (normalised[target] * predicted).square().mean(dim=-1).mean()
            terms[key] = -weight * correlation
        return terms
