"""Derived splits: a class-disjoint validation split and labels corrupted on purpose.

Validation classes are carved from the training classes so that model selection never looks at
the test set (the protocol of Musgrave et al., "A Metric Learning Reality Check", ECCV 2020);
label corruption drives the memorisation check.
"""

from __future__ import annotations

import numpy as np

from training.data.records import DatasetError, Split

# Musgrave, Belongie & Lim 2020, "A Metric Learning Reality Check", Sec. 3.2 (hyperparameter search
# via cross validation): the training classes form 4 class-disjoint folds; one fold is validation.
MLRC_VALIDATION_FRACTION = 0.25


def class_disjoint_split(
    split: Split,
    val_fraction: float = MLRC_VALIDATION_FRACTION,
    seed: int = 0,
    group_separator: str | None = None,
) -> tuple[Split, Split]:
    """Split whole classes into (train, validation), about `val_fraction` of the classes held out.

    Classes are drawn from their sorted names with a seeded generator, so the result depends only
    on the class names and the seed, not on the order of files or labels. With a
    `group_separator`, classes sharing the name part before it (`media-` in
    `media-playback-start`) move together, so validation mirrors a test split that shares no
    name prefix with training (IconThemes, docs/benchmarks.md); otherwise validation would be
    easier than test and select models that do not transfer.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    # Retrieval needs at least 2 classes on each side, or every neighbour is a correct match.
    if split.num_classes < 4:
        raise DatasetError(
            f"a class-disjoint validation split needs at least 4 training classes, got "
            f"{split.num_classes}; add classes or train without validation"
        )
    names = sorted(split.class_names)
    num_val = min(max(round(val_fraction * len(names)), 2), len(names) - 2)
    groups: dict[str, list[str]] = {}
    for name in names:
        key = name.split(group_separator, 1)[0] if group_separator else name
        groups.setdefault(key, []).append(name)
    group_keys = sorted(groups)
    val_names: list[str] = []
    for index in np.random.default_rng(seed).permutation(len(group_keys)):
        if len(val_names) >= num_val:
            break
        candidate = groups[group_keys[index]]
        if len(names) - len(val_names) - len(candidate) >= 2:
            val_names.extend(candidate)
    if len(val_names) < 2:
        raise DatasetError(
            f"grouping classes by {group_separator!r} leaves too few groups for validation"
        )
    train_names = sorted(set(names) - set(val_names))
    return split.select_classes(train_names), split.select_classes(sorted(val_names))


def randomize_labels(split: Split, fraction: float, seed: int = 0) -> Split:
    """Give exactly round(fraction * N) random samples a different, uniformly random class.

    Zhang et al. 2017, "Understanding deep learning requires rethinking generalization", Sec. 2
    ("partially corrupted labels"). Unlike their independent coin flip, which may redraw the
    true class, the count is exact and the new class always differs, so `fraction` is the share
    of labels that are actually wrong.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DatasetError(f"label noise fraction must be in [0, 1], got {fraction}")
    if split.num_classes < 2:
        raise DatasetError("randomizing labels needs at least 2 classes")
    rng = np.random.default_rng(seed)
    corrupted = rng.choice(len(split), size=round(fraction * len(split)), replace=False)
    labels = np.asarray(split.labels)
    # A draw from the other C-1 classes: shift past the true label by 1..C-1 (mod C).
    offsets = rng.integers(1, split.num_classes, size=len(corrupted))
    labels[corrupted] = (labels[corrupted] + offsets) % split.num_classes
    return Split(list(split.paths), labels.tolist(), list(split.class_names))
