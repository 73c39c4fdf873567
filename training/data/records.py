"""The in-memory description of a labelled image collection that every reader returns.

Readers only list files and labels; decoding happens later in `ImageDataset`. Labels are
contiguous integers 0..C-1 within a split, `class_names[label]` gives the original name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset on disk is missing, malformed or unusable; the message says what to fix."""


@dataclass(frozen=True)
class Split:
    """One split (train, val or test): parallel lists of image paths and integer labels."""

    paths: list[Path]
    labels: list[int]
    class_names: list[str]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> Counter[int]:
        return Counter(self.labels)

    def subset(self, indices: list[int]) -> Split:
        """The given samples, with labels re-numbered to stay contiguous."""
        kept_labels = sorted({self.labels[i] for i in indices})
        remap = {old: new for new, old in enumerate(kept_labels)}
        return Split(
            paths=[self.paths[i] for i in indices],
            labels=[remap[self.labels[i]] for i in indices],
            class_names=[self.class_names[old] for old in kept_labels],
        )

    def select_classes(self, class_names: list[str]) -> Split:
        """Only the samples of the named classes (in the given order)."""
        wanted = set(class_names)
        indices = [i for i, y in enumerate(self.labels) if self.class_names[y] in wanted]
        return self.subset(indices)

    @classmethod
    def from_named(cls, items: list[tuple[Path, str]]) -> Split:
        """Build from (path, class name) pairs; labels follow the sorted class names."""
        names = sorted({name for _, name in items})
        index = {name: i for i, name in enumerate(names)}
        return cls(
            paths=[Path(p) for p, _ in items],
            labels=[index[name] for _, name in items],
            class_names=names,
        )


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset as training sees it: a train and a test split with disjoint classes."""

    name: str
    train: Split
    test: Split
    root: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "root": str(self.root) if self.root else None,
            "train": {"classes": self.train.num_classes, "images": len(self.train)},
            "test": {"classes": self.test.num_classes, "images": len(self.test)},
        }
