"""The `Method` interface the training loop drives, and the registry of methods by name."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from training.engine.trainer import Trainer
    from training.models.embedding import EmbeddingModel


@dataclass
class Batch:
    """One training batch: `images` holds one tensor per augmented view."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor


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
    def setup(self, trainer: Trainer) -> None:
        """Called once the model exists, before the optimiser is built and before a resumed
        run's state is loaded: create state that depends on the model (e.g. a momentum copy)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Called before the first iteration of a fresh run (not on resume)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def batch_sampler(self, trainer: Trainer) -> Any | None:
        """A method-specific batch sampler (Magnet's neighbourhood sampling); None = P x K."""
        return None

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the model artifact (e.g. Magnet's cluster centres)."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, *, num_classes: int, embedding_dim: int, **params: Any) -> Method:
    """A method by name; unknown names and hyperparameters are `ValueError`s naming the choices.

    Methods that take `**params` (the baselines) pass them on to a registry that checks them."""
    from training.losses.miners import build_from_registry

    context = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    method_class = METHODS.get(name)
    forwards_params = method_class is not None and any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(method_class).parameters.values()
    )
    if forwards_params:
        return method_class(**context, **params)
    return build_from_registry(METHODS, "method", name, params, context)
