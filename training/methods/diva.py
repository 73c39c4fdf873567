"""DiVA: Diverse Visual Feature Aggregation (Milbich, Roth et al., ECCV 2020, arXiv 2004.13458).

Four embeddings on one backbone, each trained on its own task, are concatenated at test time:
class-discriminative (margin loss, distance-weighted triplets), sample-specific (DaNCE against a
queue of momentum-encoder keys), class-shared (margin loss on randomly permuted labels) and
intra-class (margin loss on triplets drawn within one class). Adversarial decorrelation keeps
the auxiliary embeddings from repeating the discriminative one. Reference: the paper and its
released code, Confusezius/ECCV2020_DiVA_MultiFeature_DML.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from training.data.image_dataset import ImageDataset
from training.data.samplers import PKBatchSampler
from training.data.transforms import build_train_transform
from training.losses.dance import AdversarialDecorrelation, DaNCELoss
from training.losses.diva_miners import (
    IntraClassRandomMiner,
    RandomPermutedDistanceMiner,
    SharedNegativeDistanceMiner,
)
from training.losses.margin import MarginLoss
from training.losses.miners import DistanceWeightedMiner, MinerFn
from training.methods.base import Batch, Method, TrainingContext, register_method
from training.models.heads import DIVA_HEAD_NAMES as HEAD_NAMES

log = logging.getLogger(__name__)

# (source, target): each auxiliary embedding is decorrelated from the discriminative one.
DECORRELATIONS = (
    ("selfsimilarity", "discriminative"),
    ("shared", "discriminative"),
    ("intra", "discriminative"),
)
SHARING_MINERS = {"random": RandomPermutedDistanceMiner, "standard": SharedNegativeDistanceMiner}


def gradient_norms(terms: dict[str, Tensor], features: Tensor) -> dict[str, Tensor]:
    """L2 norm of each loss term's gradient with respect to `features`, as `grad_norm_<name>`.

    Every DiVA head reads the pooled backbone features, so the norms compare how hard each term
    pushes the shared backbone; a term near 0 has stopped training it, whatever its loss value.
    `torch.autograd.grad` writes no .grad and runs only the graph between the terms and the
    features (heads, losses, regressors), not the backbone's.
    """
    return {
        f"grad_norm_{name}": torch.linalg.vector_norm(
            torch.autograd.grad(term, features, retain_graph=True)[0]
        )
        for name, term in terms.items()
    }


@register_method
class DiVA(Method):
    """The four DiVA tasks plus decorrelation (DiVA diva_main.py):

    L = L_disc + a_ssl * L_DaNCE + a_shared * L_shared + a_intra * L_intra + sum_dir l_dec(dir).

    View A of each image goes through the online model, view B through the momentum (key) model,
    a copy of the online model made in `setup`, kept in eval mode and updated after every
    optimiser step as theta_k <- m theta_k + (1 - m) theta_q. The key queue is filled from
    `n_key_batches` training batches before the first step and then updated first in, first out
    with every batch's keys. Key model and queue live in this module's state dict, so a resumed
    run continues with them.
    """

    name = "diva"
    views = 2
    head = "diva"

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        # Task weights and decorrelation weight rho per direction: CUB200 R50 row of DiVA's
        # sample runs (SampleRuns/ECCV2020_DiVA_SampleRuns.sh). A single rho applies to all three
        # directions.
        alpha_ssl: float = 0.3,
        alpha_shared: float = 0.3,
        alpha_intra: float = 0.3,
        rho: float | Sequence[float] = 1500.0,
        sharing: Literal["random", "standard"] = "random",  # DiVA --diva_sharing
        temperature: float = 0.01,  # DaNCE tau in all DiVA sample runs (SampleRuns/)
        momentum: float = 0.9,  # DiVA --diva_moco_momentum (parameters.py)
        n_key_batches: int = 30,  # DiVA --diva_moco_n_key_batches, CUB/CARS sample runs
        dance_lower_cutoff: float = 0.5,  # DiVA --diva_moco_lower_cutoff (parameters.py)
        dance_upper_cutoff: float = 1.4,  # DiVA --diva_moco_upper_cutoff (parameters.py)
        dance_weighting: Literal["similarity", "logit"] = "similarity",  # see DaNCELoss
        dance_normalise: Literal["batch", "row"] = "batch",  # DiVA's released code, DaNCELoss
        margin: float = 0.2,  # DiVA --loss_margin_margin (parameters.py)
        beta_init: float = 1.2,  # DiVA --loss_margin_beta (parameters.py)
        beta_lr: float = 5e-4,  # DiVA --loss_margin_beta_lr (parameters.py)
        distance_lower_cutoff: float = 0.5,  # DiVA --miner_distance_lower_cutoff
        regressor_hidden_dim: int = 512,  # DiVA --diva_decorrnet_dim (parameters.py)
        regressor_lr: float = 1e-5,  # DiVA --diva_decorrnet_lr (parameters.py)
        embedding_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),  # see DiVAHead
    ) -> None:
        rhos = [float(rho)] * len(DECORRELATIONS) if isinstance(rho, int | float) else list(rho)
        super().__init__(
            num_classes=num_classes,
            embedding_dim=embedding_dim,
            alpha_ssl=alpha_ssl,
            alpha_shared=alpha_shared,
            alpha_intra=alpha_intra,
            rho=rhos,
            sharing=sharing,
            temperature=temperature,
            momentum=momentum,
            n_key_batches=n_key_batches,
            dance_lower_cutoff=dance_lower_cutoff,
            dance_upper_cutoff=dance_upper_cutoff,
            dance_weighting=dance_weighting,
            dance_normalise=dance_normalise,
            margin=margin,
            beta_init=beta_init,
            beta_lr=beta_lr,
            distance_lower_cutoff=distance_lower_cutoff,
            regressor_hidden_dim=regressor_hidden_dim,
            regressor_lr=regressor_lr,
            embedding_weights=list(embedding_weights),
        )
        if sharing not in SHARING_MINERS:
            raise ValueError(f"sharing must be one of {sorted(SHARING_MINERS)}, got {sharing!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if n_key_batches < 1:
            raise ValueError(f"n_key_batches must be at least 1, got {n_key_batches}")
        self.alpha_ssl = alpha_ssl
        self.alpha_shared = alpha_shared
        self.alpha_intra = alpha_intra
        self.momentum = momentum
        self.n_key_batches = n_key_batches
        self.regressor_lr = regressor_lr
        self.embedding_weights = tuple(float(weight) for weight in embedding_weights)

        def margin_loss(miner: MinerFn) -> MarginLoss:
            # Its own learnable beta per task; beta is indexed by the anchor's true class even
            # where the miner ignores the classes, as in DiVA's diva_main.py.
            return MarginLoss(
                num_classes, margin=margin, beta_init=beta_init, beta_lr=beta_lr, miner=miner
            )

        self.discriminative_loss = margin_loss(
            DistanceWeightedMiner(lower_cutoff=distance_lower_cutoff)
        )
        self.shared_loss = margin_loss(SHARING_MINERS[sharing](lower_cutoff=distance_lower_cutoff))
        self.intra_loss = margin_loss(IntraClassRandomMiner())
        self.dance_loss = DaNCELoss(
            temperature=temperature,
            lower_cutoff=dance_lower_cutoff,
            upper_cutoff=dance_upper_cutoff,
            weighting=dance_weighting,
            normalise=dance_normalise,
        )
        self.decorrelation = AdversarialDecorrelation(
            DECORRELATIONS, rhos, embedding_dim, hidden_dim=regressor_hidden_dim
        )
        self.key_model: nn.Module | None = None  # created in `setup`, once the model exists
        self.register_buffer("queue", torch.zeros(0, embedding_dim))
        self._pending_keys: Tensor | None = None

    def head_options(self) -> dict[str, object]:
        return {"weights": list(self.embedding_weights)}

    def parameter_groups(self) -> dict[str, tuple[list[nn.Parameter], float | None]]:
        margin_losses = (self.discriminative_loss, self.shared_loss, self.intra_loss)
        betas = [loss.beta for loss in margin_losses]
        return {
            "betas": (betas, self.discriminative_loss.param_lr),
            "decorrelation": (list(self.decorrelation.parameters()), self.regressor_lr),
        }

    def train(self, mode: bool = True) -> DiVA:
        super().train(mode)
        if self.key_model is not None:
            self.key_model.eval()  # the key model never leaves eval mode (DiVA diva_main.py)
        return self

    # ---------------------------------------------------------------- hooks
    def setup(self, run: TrainingContext) -> None:
        key_model = copy.deepcopy(run.model).requires_grad_(False)
        self.key_model = key_model.eval()
        size = self.n_key_batches * run.cfg.batch_size
        self.queue = torch.zeros(size, self.embedding_dim, device=run.device)

    def on_train_start(self, run: TrainingContext) -> None:
        self.fill_queue(run)

    def on_step_end(self, run: TrainingContext) -> None:
        if self._pending_keys is None:
            raise RuntimeError("on_step_end ran without a preceding training_step")
        self.momentum_update(run.model)
        self.enqueue(self._pending_keys)
        self._pending_keys = None

    # ---------------------------------------------------------------- training
    def training_step(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict]:
        if self.key_model is None:
            raise RuntimeError("DiVA.setup(run) must run before training")
        outputs = model(batch.images[0])
        with torch.no_grad():
            keys = self.key_model(batch.images[1])["selfsimilarity"].float()
        embeddings = {name: outputs[name].float() for name in HEAD_NAMES}
        labels = batch.labels
        losses = {
            "discriminative": self.discriminative_loss(embeddings["discriminative"], labels),
            "selfsimilarity": self.dance_loss(embeddings["selfsimilarity"], keys, self.queue),
            "shared": self.shared_loss(embeddings["shared"], labels),
            "intra": self.intra_loss(embeddings["intra"], labels),
        }
        decorrelation = self.decorrelation(embeddings)
        terms = {  # each term as it enters the total, for the gradient norms
            "discriminative": losses["discriminative"],
            "selfsimilarity": self.alpha_ssl * losses["selfsimilarity"],
            "shared": self.alpha_shared * losses["shared"],
            "intra": self.alpha_intra * losses["intra"],
            **{f"decorrelation_{k}": value for k, value in decorrelation.items()},
        }
        total = (
            terms["discriminative"]
            + terms["selfsimilarity"]
            + terms["shared"]
            + terms["intra"]
            + sum(decorrelation.values())
        )
        self._pending_keys = keys
        logs = {f"loss_{name}": value.detach() for name, value in losses.items()}
        logs.update({f"decorrelation_{k}": value.detach() for k, value in decorrelation.items()})
        # So that a dead term shows in metrics.jsonl whatever its loss value: how many queue
        # negatives still carry DaNCE weight, and how hard each term pushes the backbone.
        weights = self.dance_loss.last_weights
        assert weights is not None  # set by the forward pass above
        heavy = (weights > 0.01).sum(dim=1)
        logs["dance_negatives_weight_gt_0.01"] = heavy.float().mean()
        logs.update(gradient_norms(terms, outputs["features"]))
        return total, logs

    @torch.no_grad()
    def momentum_update(self, online: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (DiVA diva_main.py).

        Floating-point buffers (BatchNorm statistics) follow the same average; DiVA's code moves
        parameters only, which is the same thing with its frozen BatchNorm, but with trained
        BatchNorm the key model would otherwise keep its initial statistics forever.
        """
        if self.key_model is None:
            raise RuntimeError("DiVA.setup(run) must run before the momentum update")
        pairs = [
            *zip(self.key_model.parameters(), online.parameters(), strict=True),
            *zip(self.key_model.buffers(), online.buffers(), strict=True),
        ]
        for key, query in pairs:
            if key.is_floating_point():
                key.lerp_(query.detach(), 1.0 - self.momentum)
            else:
                key.copy_(query)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """First in, first out: drop the oldest len(keys) keys, append the new ones at the end."""
        self.queue.copy_(torch.cat([self.queue, keys.to(self.queue)])[-len(self.queue) :])

    @torch.no_grad()
    def fill_queue(self, run: TrainingContext) -> None:
        """Fill the queue with key-model embeddings of `n_key_batches` training batches.

        The batches are an independent P x K draw (seed + 1, as DiVA fills its queue with a
        separate pass of its random sampler); the augmentations run under a forked, seeded RNG,
        so the fill is reproducible and leaves the global RNG that the miners use untouched.
        It can take minutes on a CPU, so it reports its progress as the trainer's "queue" phase
        (which counts against the time budget).
        """
        if self.key_model is None:
            raise RuntimeError("DiVA.setup(run) must run before the queue is filled")
        cfg = run.cfg
        sampler = PKBatchSampler(
            run.train.labels,
            classes_per_batch=cfg.classes_per_batch,
            samples_per_class=cfg.samples_per_class,
            num_batches=self.n_key_batches * run.world_size,
            seed=cfg.seed + 1,
            rank=run.rank,
            world_size=run.world_size,
        )
        loader = DataLoader(
            ImageDataset(run.train, build_train_transform(run.transform)),
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=cfg.amp and run.device.type == "cuda"
        )
        log.info("filling the DaNCE queue with %d keys", len(self.queue))
        keys = []
        filled = 0
        run.report_phase("queue", filled, len(self.queue))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for images, _, _ in loader:
                images = images.to(run.device).contiguous(memory_format=memory_format)
                with autocast:
                    keys.append(self.key_model(images)["selfsimilarity"].float())
                filled += len(images)
                run.report_phase("queue", filled, len(self.queue))
        self.queue.copy_(torch.cat(keys))
