"""Class-balanced P x K batches: P classes per batch, K images of each.

Pair- and triplet-based losses need several images of a class in every batch; drawing batches as
P classes x K images guarantees positives. DiVA's class_random_sampler.py draws classes and
images uniformly *with* replacement and runs floor(N_train / B) batches per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """A batch sampler whose epochs replay from any batch: batch b of epoch e is drawn from its
    own generator seeded by (seed, e, b), so `set_epoch(e, start_batch=b)` replays exactly the
    rest of the epoch (a resumed run), with or without DataLoader workers. Subclasses give
    `batches_per_rank` and draw each batch with `batch_rng`."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_rank(self) -> int:
        """Batches this sampler yields in a whole epoch."""
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch, and skip its first `start_batch` batches when resuming."""
        if not 0 <= start_batch <= self.batches_per_rank:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_rank}], got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_rank - self.start_batch

    def batch_rng(self, number: int) -> np.random.Generator:
        """The generator of batch `number` of the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, number])


# pytorch-metric-learning's MPerClassSampler is not used: it draws from NumPy's global random state
# (no reproducibility per epoch), yields a flat index stream rather than batches, and can neither
# resume mid-epoch nor shard batches across DistributedDataParallel ranks.
class PKBatchSampler(ResumableBatchSampler):
    """Batches of P classes x K samples for `DataLoader(batch_sampler=...)`.

    Each batch is drawn from its own generator seeded by (seed, epoch, batch index), so a batch is
    the same whichever rank draws it and whether or not earlier batches were drawn: resuming at
    `set_epoch(epoch, start_batch=b)` replays exactly the rest of the epoch, and rank r of W ranks
    takes the global batches r, r + W, r + 2W, ... (disjoint, equal-length shares).

    Defaults: distinct classes within a batch; K distinct images of a class when it has at least
    K, otherwise images repeat. DiVA's scheme is `classes_with_replacement=True,
    samples_with_replacement=True`.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        *,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        classes_with_replacement: bool = False,
        samples_with_replacement: bool = False,
    ) -> None:
        super().__init__(seed)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must both be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.class_indices = _indices_per_class(np.asarray(labels))
        if not classes_with_replacement and classes_per_batch > len(self.class_indices):
            raise ValueError(
                f"a batch needs {classes_per_batch} distinct classes but the labels have only "
                f"{len(self.class_indices)}; lower classes_per_batch or allow class replacement"
            )
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        # DiVA: iterations per epoch = floor(N_train / B) (datasampler/class_random_sampler.py).
        if num_batches is None:
            num_batches = len(labels) // self.batch_size
        self.num_batches = num_batches
        if self.num_batches < world_size:
            raise ValueError(
                f"{self.num_batches} batches per epoch cannot give each of {world_size} ranks one; "
                f"set num_batches or use a smaller batch than {self.batch_size}"
            )
        self.rank = rank
        self.world_size = world_size
        self.classes_with_replacement = classes_with_replacement
        self.samples_with_replacement = samples_with_replacement

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.samples_per_class

    @property
    def batches_per_rank(self) -> int:
        """Batches one rank sees per epoch; the remainder of num_batches / world_size is dropped."""
        return self.num_batches // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_batch, self.batches_per_rank):
            yield self._draw_batch(step * self.world_size + self.rank)

    def _draw_batch(self, global_index: int) -> list[int]:
        rng = self.batch_rng(global_index)
        num_classes = len(self.class_indices)
        classes = rng.choice(
            num_classes, size=self.classes_per_batch, replace=self.classes_with_replacement
        )
        batch = [
            rng.choice(
                self.class_indices[c],
                size=self.samples_per_class,
                replace=self.samples_with_replacement
                or len(self.class_indices[c]) < self.samples_per_class,
            )
            for c in classes
        ]
        return np.concatenate(batch).tolist()


def _indices_per_class(labels: np.ndarray) -> list[np.ndarray]:
    """Sample indices grouped by label, in label order; O(N log N) even with many classes."""
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:])
