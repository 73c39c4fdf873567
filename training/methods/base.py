"""The `Method` interface the training loop drives, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from training.registry import Registry

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.data.records import Split
    from training.data.transforms import TransformConfig
    from training.models.embedding import EmbeddingModel


@dataclass
class Batch:
    """One training batch: `images` holds one tensor per augmented view."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor


@dataclass
class TrainingContext:
    """What a method's hooks see of the run, rather than the whole Trainer: the config, the
    model being trained, the training split and its transform, where it runs, how long the run
    is, and a way to report a long phase (a queue fill embeds images for minutes)."""

    cfg: TrainConfig
    model: EmbeddingModel
    train: Split
    transform: TransformConfig
    device: torch.device
    rank: int
    world_size: int
    iterations_per_epoch: int
    total_iterations: int
    report_phase: Callable[[str, int, int], None]
    iteration: int = 0  # the iterations done so far, kept current by the trainer


class Method(nn.Module):
    """A training objective. Subclasses set `name`, build their loss modules in `__init__`
    and implement `training_step`; the hooks let methods keep state (queues, clusters)."""

    name: ClassVar[str]
    views: ClassVar[int] = 1  # augmented views of each image per batch
    head: ClassVar[str] = "linear"  # the model head this method trains

    def __init__(self, *, num_classes: int, embedding_dim: int, **params: Any) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.params = params

    def head_options(self) -> dict[str, object]:
        """Extra keyword arguments for the head constructor (stored in the model card)."""
        return {}

    def training_step(self, model: EmbeddingModel, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, tuple[list[nn.Parameter], float | None]]:
        """Trainable parameters of the method itself (e.g. margin betas) with their own lr
        (None = the head lr)."""
        return {}

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}

    # Hooks; the defaults do nothing.
    def setup(self, run: TrainingContext) -> None:
        """Called once the model exists, before the optimiser is built and before a resumed
        run's state is loaded: create state that depends on the model (e.g. a momentum copy)."""

    def on_train_start(self, run: TrainingContext) -> None:
        """Called before the first iteration of a fresh run (not on resume)."""

    def on_epoch_start(self, run: TrainingContext, epoch: int) -> None: ...

    def on_step_end(self, run: TrainingContext) -> None: ...

    def batch_sampler(self, run: TrainingContext) -> Any | None:
        """A method-specific batch sampler (Magnet's neighbourhood sampling); None = P x K."""
        return None

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the model artifact (e.g. Magnet's cluster centres)."""
        return {}


METHODS: Registry[Method] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its `name`."""
    return METHODS.register(cls.name)(cls)


def build_method(name: str, *, num_classes: int, embedding_dim: int, **params: Any) -> Method:
    """A method by name; unknown names and hyperparameters are `ValueError`s naming the choices.

    Methods that take `**params` (the baselines) pass them on to a registry that checks them."""
    context = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    return METHODS.build(name, params, context)
