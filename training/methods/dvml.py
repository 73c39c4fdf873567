"""DVML: Deep Variational Metric Learning (Lin et al., ECCV 2018).

The head splits the backbone feature h into a class-invariant code z_I and a Gaussian model of
intra-class variance N(mu, sigma^2); the method trains z_I, the synthesised z = z_I + z_V
(z_V ~ N(mu, sigma^2)) and a decoder that reconstructs h from z, with any base metric loss.
There is no official code: where the two public re-implementations (GeDML, ujjwaltiwari) and
the paper disagree, the paper is followed and the spot says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from training.losses import build_loss
from training.methods.base import Batch, Method, TrainingContext, register_method
from training.models.heads import DVMLHead

if TYPE_CHECKING:
    from training.models.embedding import EmbeddingModel

LOSS_TERMS = ("kl", "rec", "syn", "inv")


class StandardNormalKL(nn.Module):
    """KL(N(mu, diag sigma^2) || N(0, I)) summed over dimensions, mean over the batch (GeDML).

    Closed form 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2): it pulls the variance code towards
    one isotropic Gaussian shared by all classes, DVML's class-independent variance premise.
    """

    def forward(self, mean: Tensor, log_variance: Tensor) -> Tensor:
        per_dimension = mean.square() + log_variance.exp() - 1.0 - log_variance
        return 0.5 * per_dimension.sum(dim=1).mean()


class FeatureReconstructionLoss(nn.Module):
    """Mean squared error between T reconstructions (T, B, F) and the features h (B, F).

    The mean runs over all T reconstructions, as `F.mse_loss` with broadcasting does in both
    public codes (GeDML's dvml_collector.py, ujjwaltiwari/Deep_Variational_Metric_Learning).
    Both leave h attached, so L_rec also trains the backbone; `detach_target` is the ablation
    that stops that.
    """

    def __init__(self, *, detach_target: bool = False) -> None:
        super().__init__()
        self.detach_target = detach_target

    def forward(self, reconstructions: Tensor, features: Tensor) -> Tensor:
        target = features.detach() if self.detach_target else features
        return (reconstructions - target).square().mean()


def sample_variation(mean: Tensor, log_variance: Tensor, samples: int) -> Tensor:
    """`samples` reparameterised draws z_V = mu + sigma * eps, shape (samples, B, D).

    The paper learns the variance distribution from the metric and reconstruction losses, which
    needs gradients through the sample; both public codes call the non-differentiable
    `Normal.sample()`, so there only the KL term trains mu and sigma.
    """
    noise = torch.randn((samples, *mean.shape), dtype=mean.dtype, device=mean.device)
    return mean + (0.5 * log_variance).exp() * noise


@dataclass(frozen=True)
class PhaseSettings:
    """Loss weights, samples per image and decoder-input cut of one training phase."""

    weights: dict[str, float]
    samples: int
    detach_decoder_input: bool


@register_method
class DVMLMethod(Method):
    """L = l1 L_KL + l2 L_rec + l3 L_syn + l4 L_inv in two phases (GeDML's dvml_collector.py).

    Phase 1 (the first `phase1_fraction` of the iterations) feeds the decoder z.detach() and
    draws one z_V per image; phase 2 lets L_rec reach the encoders and draws T z_V per image,
    reconstructing all T and putting the first into L_syn. L_syn and L_inv are two instances of
    the base loss (two sets of margin betas), each applied with the images' own labels.
    The current phase lives in a buffer, so a resumed run continues in the phase it left.
    Per-phase hyperparameters are (phase 1, phase 2) pairs.
    """

    phase: Tensor  # a buffer (1 or 2), so that a resumed run continues in its phase

    name = "dvml"
    head = "dvml"

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        # The paper's plug-in losses: triplet, N-pair, triplet + DWS = margin (Lin et al. 2018).
        base_loss: str = "triplet",
        base_loss_params: Mapping[str, Any] | None = None,
        # lambda_1..4 per phase: GeDML's dvml_collector.py docstring, "recommended in the paper";
        # GeDML's code falls back to the phase-1 values in phase 2, a bug not copied here.
        kl_weight: Sequence[float] = (1.0, 0.8),
        rec_weight: Sequence[float] = (1.0, 1.0),
        syn_weight: Sequence[float] = (0.1, 0.2),
        inv_weight: Sequence[float] = (1.0, 0.8),
        num_samples: Sequence[int] = (1, 20),  # T per phase (GeDML, ujjwaltiwari)
        # UNVERIFIED: ujjwaltiwari's 25 of 100 "epochs"; the paper's value is unknown.
        phase1_fraction: float = 0.25,
        decoder_hidden_dim: int = 512,  # ujjwaltiwari's decoder (models/dvml.py)
        detach_target: bool = False,  # both public codes (GeDML, ujjwaltiwari)
        detach_variance_input: bool = False,  # not in the paper; see DVMLHead
    ) -> None:
        base_loss_params = dict(base_loss_params or {})
        pairs = {
            "kl_weight": _phase_pair("kl_weight", kl_weight, float),
            "rec_weight": _phase_pair("rec_weight", rec_weight, float),
            "syn_weight": _phase_pair("syn_weight", syn_weight, float),
            "inv_weight": _phase_pair("inv_weight", inv_weight, float),
            "num_samples": _phase_pair("num_samples", num_samples, int),
        }
        if min(pairs["num_samples"]) < 1:
            raise ValueError(f"num_samples must be at least 1 per phase, got {num_samples}")
        if not 0.0 <= phase1_fraction <= 1.0:
            raise ValueError(f"phase1_fraction must lie in [0, 1], got {phase1_fraction}")
        super().__init__(
            num_classes=num_classes,
            embedding_dim=embedding_dim,
            base_loss=base_loss,
            base_loss_params=base_loss_params,
            **pairs,
            phase1_fraction=phase1_fraction,
            decoder_hidden_dim=decoder_hidden_dim,
            detach_target=detach_target,
            detach_variance_input=detach_variance_input,
        )
        self.detach_variance_input = detach_variance_input
        self.phase1_fraction = phase1_fraction
        self.decoder_hidden_dim = decoder_hidden_dim
        self.phase_settings = {
            phase: PhaseSettings(
                weights={term: pairs[f"{term}_weight"][phase - 1] for term in LOSS_TERMS},
                samples=pairs["num_samples"][phase - 1],
                detach_decoder_input=phase == 1,
            )
            for phase in (1, 2)
        }
        self.kl_divergence = StandardNormalKL()
        self.reconstruction_loss = FeatureReconstructionLoss(detach_target=detach_target)
        self.synthesised_loss = build_loss(
            base_loss, num_classes=num_classes, embedding_dim=embedding_dim, **base_loss_params
        )
        self.invariant_loss = build_loss(
            base_loss, num_classes=num_classes, embedding_dim=embedding_dim, **base_loss_params
        )
        self.register_buffer("phase", torch.tensor(1))

    def head_options(self) -> dict[str, object]:
        return {
            "decoder_hidden_dim": self.decoder_hidden_dim,
            "detach_variance_input": self.detach_variance_input,
        }

    def phase_at(self, iteration: int, total_iterations: int) -> int:
        """The phase of the 0-based `iteration`: 1 for the first floor(fraction x total)."""
        return 1 if iteration < int(self.phase1_fraction * total_iterations) else 2

    def setup(self, run: TrainingContext) -> None:
        # A fresh run starts at iteration 0; a resumed run then loads its saved phase.
        self.phase.fill_(self.phase_at(0, run.total_iterations))

    def on_step_end(self, run: TrainingContext) -> None:
        self.phase.fill_(self.phase_at(run.iteration, run.total_iterations))

    def training_step(self, model: EmbeddingModel, batch: Batch) -> tuple[Tensor, dict]:
        phase = int(self.phase)
        settings = self.phase_settings[phase]
        outputs = model(batch.images[0])
        invariant = outputs["embedding"].float()
        mean, log_variance = outputs["mean"].float(), outputs["log_variance"].float()
        synthesised = invariant + sample_variation(mean, log_variance, settings.samples)
        decoder_input = synthesised.detach() if settings.detach_decoder_input else synthesised
        head = cast(DVMLHead, model.head)
        reconstructions = head.decode(decoder_input.flatten(0, 1)).float()
        terms = {
            "kl": self.kl_divergence(mean, log_variance),
            "rec": self.reconstruction_loss(
                reconstructions.unflatten(0, synthesised.shape[:2]), outputs["features"]
            ),
            "syn": self.synthesised_loss(synthesised[0], batch.labels),
            "inv": self.invariant_loss(invariant, batch.labels),
        }
        loss = sum(settings.weights[term] * value for term, value in terms.items())
        logs: dict[str, Tensor | float] = {term: value.detach() for term, value in terms.items()}
        logs["phase"] = float(phase)
        return loss, logs

    def parameter_groups(self) -> dict[str, tuple[list[nn.Parameter], float | None]]:
        groups: dict[str, tuple[list[nn.Parameter], float | None]] = {}
        for name, criterion in (
            ("syn_loss", self.synthesised_loss),
            ("inv_loss", self.invariant_loss),
        ):
            parameters = [p for p in criterion.parameters() if p.requires_grad]
            if parameters:
                groups[name] = (parameters, getattr(criterion, "param_lr", None))
        return groups


def _phase_pair(name: str, value: Any, cast: type) -> tuple[Any, Any]:
    """A (phase 1, phase 2) pair from a keyword (`--param` gives JSON lists)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} takes one value per phase, e.g. [1.0, 0.8]; got {value!r}")
    return cast(value[0]), cast(value[1])
