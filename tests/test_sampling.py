"""Class-disjoint validation split, label noise and the P x K batch sampler."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.data.records import DatasetError, Split
from training.data.samplers import PKBatchSampler
from training.data.splits import class_disjoint_split, randomize_labels


def make_split(images_per_class: list[int]) -> Split:
    items = [
        (Path(f"c{c:02d}/{i}.jpg"), f"c{c:02d}")
        for c, count in enumerate(images_per_class)
        for i in range(count)
    ]
    return Split.from_named(items)


# class_disjoint_split -------------------------------------------------------------------------


def test_validation_split_takes_whole_classes_and_the_requested_fraction():
    split = make_split([3] * 12)

    train, val = class_disjoint_split(split, val_fraction=0.25, seed=0)

    assert val.num_classes == 3
    assert train.num_classes == 9
    assert set(train.class_names).isdisjoint(val.class_names)
    assert set(train.class_names) | set(val.class_names) == set(split.class_names)
    assert len(train) + len(val) == len(split)
    assert sorted(map(str, train.paths + val.paths)) == sorted(map(str, split.paths))
    for part in (train, val):  # every sample keeps its class
        assert all(
            p.parent.name == part.class_names[y]
            for p, y in zip(part.paths, part.labels, strict=True)
        )


def test_validation_split_is_seeded_and_independent_of_file_order():
    split = make_split([2] * 20)
    shuffled_items = [
        (p, split.class_names[y]) for p, y in zip(split.paths, split.labels, strict=True)
    ]
    random.Random(7).shuffle(shuffled_items)
    shuffled = Split.from_named(shuffled_items)

    _, val = class_disjoint_split(split, seed=3)
    _, val_again = class_disjoint_split(split, seed=3)
    _, val_shuffled = class_disjoint_split(shuffled, seed=3)
    _, val_other_seed = class_disjoint_split(split, seed=4)

    assert val.class_names == val_again.class_names == val_shuffled.class_names
    assert val.class_names != val_other_seed.class_names


@pytest.mark.parametrize(
    ("classes", "fraction", "message"),
    [
        (3, 0.25, "needs at least 4 training classes, got 3"),
        (8, 0.0, r"val_fraction must be between 0 and 1 \(exclusive\), got 0.0"),
        (8, 1.0, "got 1.0"),
    ],
)
def test_validation_split_errors(classes: int, fraction: float, message: str):
    with pytest.raises(DatasetError, match=message):
        class_disjoint_split(make_split([2] * classes), val_fraction=fraction)


def test_validation_split_keeps_two_classes_on_each_side():
    train, val = class_disjoint_split(make_split([2] * 4), val_fraction=0.1)
    assert (train.num_classes, val.num_classes) == (2, 2)


def test_validation_split_can_keep_name_prefix_groups_together():
    names = [
        f"{group}-{i}" for group in ("media", "go", "edit", "weather", "mail") for i in range(4)
    ]
    split = Split.from_named([(Path(f"{n}/0.png"), n) for n in names for _ in range(2)])

    for seed in range(5):
        train, val = class_disjoint_split(split, 0.25, seed=seed, group_separator="-")
        train_groups = {n.split("-")[0] for n in train.class_names}
        val_groups = {n.split("-")[0] for n in val.class_names}
        assert not train_groups & val_groups
        assert val.num_classes == 8  # 25% of 20 classes is 5: whole groups of 4 overshoot to 8
        assert train.num_classes + val.num_classes == 20


# randomize_labels -----------------------------------------------------------------------------


def test_randomize_labels_changes_exactly_the_fraction():
    split = make_split([40] * 5)

    noisy = randomize_labels(split, fraction=0.3, seed=1)

    changed = sum(a != b for a, b in zip(split.labels, noisy.labels, strict=True))
    assert changed == 60
    assert noisy.paths == split.paths
    assert noisy.class_names == split.class_names
    assert set(noisy.labels) <= set(range(5))


def test_randomize_labels_is_seed_deterministic():
    split = make_split([10] * 4)
    assert (
        randomize_labels(split, 0.5, seed=2).labels == randomize_labels(split, 0.5, seed=2).labels
    )
    assert (
        randomize_labels(split, 0.5, seed=2).labels != randomize_labels(split, 0.5, seed=3).labels
    )


def test_randomize_labels_extremes():
    split = make_split([5] * 3)
    assert randomize_labels(split, 0.0).labels == split.labels
    assert all(
        a != b for a, b in zip(split.labels, randomize_labels(split, 1.0).labels, strict=True)
    )
    with pytest.raises(DatasetError, match=r"fraction must be in \[0, 1\], got 1.5"):
        randomize_labels(split, 1.5)


# PKBatchSampler -------------------------------------------------------------------------------

# 8 classes; class 7 has a single image, fewer than K = 3.
SIZES = [6, 5, 4, 3, 8, 5, 4, 1]
LABELS = [c for c, n in enumerate(SIZES) for _ in range(n)]


def class_runs(batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


def test_batches_are_p_distinct_classes_times_k_samples():
    sampler = PKBatchSampler(LABELS, classes_per_batch=4, samples_per_class=3, num_batches=50)

    batches = list(sampler)

    assert len(batches) == len(sampler) == 50
    for batch in batches:
        runs = class_runs(batch, 3)
        run_classes = [LABELS[run[0]] for run in runs]
        assert len(batch) == 12
        assert len(set(run_classes)) == 4
        for run, c in zip(runs, run_classes, strict=True):
            assert all(LABELS[i] == c for i in run)
            if SIZES[c] >= 3:
                assert len(set(run)) == 3  # without replacement when the class is big enough
    small_class_runs = [run for b in batches for run in class_runs(b, 3) if LABELS[run[0]] == 7]
    assert small_class_runs and all(run == [len(LABELS) - 1] * 3 for run in small_class_runs)


def test_default_length_is_floor_of_dataset_over_batch():
    assert len(PKBatchSampler(LABELS, 2, 2)) == len(LABELS) // 4 == 9


def test_same_seed_and_epoch_give_the_same_batches():
    first = PKBatchSampler(LABELS, 4, 2, seed=5)
    second = PKBatchSampler(LABELS, 4, 2, seed=5)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating again repeats the epoch
    second.set_epoch(4)
    assert list(first) != list(second)
    assert list(first) != list(PKBatchSampler(LABELS, 4, 2, seed=6))


def test_resuming_at_batch_b_replays_the_rest_of_the_epoch():
    sampler = PKBatchSampler(LABELS, 4, 2, num_batches=10, seed=1)
    sampler.set_epoch(2)
    full_epoch = list(sampler)

    resumed = PKBatchSampler(LABELS, 4, 2, num_batches=10, seed=1)
    resumed.set_epoch(2, start_batch=6)

    assert len(resumed) == 4
    assert list(resumed) == full_epoch[6:]
    resumed.set_epoch(3)
    assert len(resumed) == 10


def test_ranks_get_disjoint_equal_shares_of_the_global_batches():
    single = PKBatchSampler(LABELS, 4, 2, num_batches=11, seed=9)
    single.set_epoch(1)
    global_batches = list(single)
    shards = []
    for rank in range(3):
        sampler = PKBatchSampler(LABELS, 4, 2, num_batches=11, seed=9, rank=rank, world_size=3)
        sampler.set_epoch(1)
        shards.append(list(sampler))

    assert [len(s) for s in shards] == [3, 3, 3]  # 11 // 3; the remainder is dropped
    for rank, shard in enumerate(shards):
        assert shard == global_batches[rank:9:3]
    all_positions = [tuple(b) for shard in shards for b in shard]
    assert len(set(all_positions)) == 9


def test_resume_and_sharding_combine():
    sampler = PKBatchSampler(LABELS, 4, 2, num_batches=12, rank=1, world_size=2)
    whole = list(sampler)
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == whole[4:]


def test_diva_style_sampling_with_replacement():
    sampler = PKBatchSampler(
        LABELS,
        classes_per_batch=10,  # more than the 8 classes: only possible with replacement
        samples_per_class=3,
        num_batches=30,
        classes_with_replacement=True,
        samples_with_replacement=True,
    )
    batches = list(sampler)
    assert all(len(b) == 30 for b in batches)
    runs = [run for b in batches for run in class_runs(b, 3)]
    assert any(len(set(run)) < 3 and SIZES[LABELS[run[0]]] >= 3 for run in runs)
    assert any(len({LABELS[r[0]] for r in class_runs(b, 3)}) < 10 for b in batches)


def test_sampler_feeds_a_dataloader():
    dataset = TensorDataset(torch.tensor(LABELS))
    loader = DataLoader(dataset, batch_sampler=PKBatchSampler(LABELS, 3, 2))
    (labels,) = next(iter(loader))
    assert labels.shape == (6,)
    assert len(loader) == len(LABELS) // 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_batch": 9}, "needs 9 distinct classes but the labels have only 8"),
        ({"num_batches": 1, "world_size": 2}, "1 batches per epoch cannot give each of 2 ranks"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\), got 2"),
        ({"samples_per_class": 0}, "must both be at least 1"),
    ],
)
def test_sampler_configuration_errors(kwargs: dict, message: str):
    arguments = {"classes_per_batch": 2, "samples_per_class": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(LABELS, **arguments)


def test_start_batch_beyond_the_epoch_is_rejected():
    sampler = PKBatchSampler(LABELS, 2, 2, num_batches=5)
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 5\], got 6"):
        sampler.set_epoch(0, start_batch=6)
