"""Tests for training.evaluation.metrics: hand-computed cases and agreement with PML."""

from __future__ import annotations

import io
import math
from itertools import combinations

import numpy as np
import pytest
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKMeans
from rich.console import Console

from training.evaluation import (
    clustering_metrics,
    evaluate_embeddings,
    format_metrics_table,
    pairwise_f1_score,
    recall_at_k_cross,
    retrieval_metrics,
)


def on_line(*xs: float) -> np.ndarray:
    """Points (x, 0) in 2-D, so neighbour orders can be read off the number line."""
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def clustered_embeddings(
    num_classes: int, dim: int, seed: int, noise: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs with uneven class sizes, overlapping enough that metrics are below 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 30, size=num_classes)
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.normal(size=(num_classes, dim))
    points = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return points.astype(np.float32), labels


# A = {0, 2.2, 9.5}, B = {1, 5, 6}. Neighbour labels (self excluded), nearest first:
#   q0=0   (A): B A B B A  -> R@1 0, R@2 1; R-prec 1/2; MAP@R (1/2)/2 = 1/4
#   q1=1   (B): A A B B A  -> R@1 0, R@2 0, R@4 1; R-prec 0; MAP@R 0
#   q2=2.2 (A): B A B B A  -> R@1 0, R@2 1; R-prec 1/2; MAP@R 1/4
#   q3=5   (B): B A B A A  -> R@1 1; R-prec 1/2; MAP@R (1/1)/2 = 1/2
#   q4=6   (B): B A A B A  -> R@1 1; R-prec 1/2; MAP@R 1/2
#   q5=9.5 (A): B B A B A  -> R@1 0, R@2 0, R@4 1; R-prec 0; MAP@R 0
LINE_POINTS = on_line(0.0, 1.0, 2.2, 5.0, 6.0, 9.5)
LINE_LABELS = np.array(["A", "B", "A", "B", "B", "A"])


def test_hand_computed_retrieval_where_map_at_r_differs_from_r_precision() -> None:
    metrics = retrieval_metrics(LINE_POINTS, LINE_LABELS, ks=(1, 2, 4))

    assert metrics == pytest.approx(
        {
            "recall@1": 2 / 6,
            "recall@2": 4 / 6,
            "recall@4": 1.0,
            "map@r": 1.5 / 6,
            "r_precision": 2 / 6,
        }
    )


def test_lone_label_query_is_excluded() -> None:
    # C (x=0.4) is the only one of its class. Both A queries see C first and each other second;
    # counting C as a query (it can never succeed) would make recall@2 2/3 instead of 1.
    metrics = retrieval_metrics(on_line(0.0, 1.0, 0.4), np.array([0, 0, 7]), ks=(1, 2))

    assert metrics == pytest.approx(
        {"recall@1": 0.0, "recall@2": 1.0, "map@r": 0.0, "r_precision": 0.0}
    )


def test_duplicate_embeddings_remove_self_by_index_not_distance() -> None:
    # q0 and q1 are identical A's: each one's nearest other sample is its twin (distance 0).
    # Dropping every distance-0 hit would leave B at 0.1 first and score them 0.
    # q2 (B, 0.1) sees A, A, B; q3 (B, 5) sees B first.
    metrics = retrieval_metrics(on_line(0.0, 0.0, 0.1, 5.0), np.array([0, 0, 1, 1]), ks=(1, 2, 3))

    assert metrics == pytest.approx(
        {
            "recall@1": 3 / 4,
            "recall@2": 3 / 4,
            "recall@3": 1.0,
            "map@r": 3 / 4,
            "r_precision": 3 / 4,
        }
    )


def test_query_pushed_out_of_its_own_neighbour_list_by_ties() -> None:
    # The A query at 0 (last row) ties with five lone-label copies. faiss breaks ties by lower
    # id, so its own row is missing from its k+1 = 3 results and the farthest one is dropped
    # instead. Its 2 neighbours are lone points (a miss); the A's at 10 and 10.5 find each other.
    points = on_line(10.0, 10.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    labels = np.array([0, 0, 10, 11, 12, 13, 14, 0])

    metrics = retrieval_metrics(points, labels, ks=(1,))

    assert metrics["recall@1"] == pytest.approx(2 / 3)


def test_hand_computed_clustering_nmi_and_f1() -> None:
    # Two far-apart groups, so 2-means must split them; each group holds 2 of one class and 1 of
    # the other. Contingency [[2, 1], [1, 2]] over 6 points:
    #   same-class pairs 3+3 = 6, same-cluster pairs 3+3 = 6, both 1+1 = 2 -> F1 = 2*2/(6+6) = 1/3
    #   MI = 2*(2/6)ln((2/6)/(1/4)) + 2*(1/6)ln((1/6)/(1/4)); H(class) = H(cluster) = ln 2.
    points = np.array([[0, 0], [0, 1], [1, 0], [50, 50], [50, 51], [51, 50]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1, 0])
    mutual_information = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)

    metrics = clustering_metrics(points, labels)

    assert metrics == pytest.approx({"nmi": mutual_information / math.log(2), "f1": 1 / 3})


def test_pairwise_f1_matches_brute_force_pair_count() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=60)
    clusters = rng.integers(0, 8, size=60)
    pairs = list(combinations(range(60), 2))
    true_positive = sum(labels[i] == labels[j] and clusters[i] == clusters[j] for i, j in pairs)
    same_cluster = sum(clusters[i] == clusters[j] for i, j in pairs)
    same_class = sum(labels[i] == labels[j] for i, j in pairs)
    precision, recall = true_positive / same_cluster, true_positive / same_class

    assert pairwise_f1_score(labels, clusters) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )


def test_pairwise_f1_of_all_singletons_is_perfect_agreement() -> None:
    # No pair shares a class or a cluster, so there is no pair to get wrong.
    assert pairwise_f1_score(np.array([0, 1, 2]), np.array([5, 6, 7])) == 1.0


def test_matches_pytorch_metric_learning_accuracy_calculator() -> None:
    points, labels = clustered_embeddings(num_classes=20, dim=16, seed=0, noise=1.0)
    points, labels = np.vstack([points, points[:1] + 5.0]), np.append(labels, 99)  # a lone label
    seed = 0
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=None,
        kmeans_func=FaissKMeans(niter=20, seed=seed),
    )
    expected = calculator.get_accuracy(points, labels)

    ours = evaluate_embeddings(points, labels, ks=(1,), seed=seed)

    assert 0.3 < ours["recall@1"] < 0.95  # the blobs overlap: a non-trivial comparison
    assert ours["recall@1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(expected["NMI"], abs=1e-6)


def test_cross_recall_matches_pytorch_metric_learning_precision_at_1() -> None:
    gallery, gallery_labels = clustered_embeddings(num_classes=15, dim=8, seed=1)
    queries, query_labels = clustered_embeddings(num_classes=15, dim=8, seed=1, noise=0.9)
    expected = AccuracyCalculator(include=("precision_at_1",), k=1).get_accuracy(
        queries, query_labels, gallery, gallery_labels, ref_includes_query=False
    )

    ours = recall_at_k_cross(queries, query_labels, gallery, gallery_labels, ks=(1,))

    assert ours["recall@1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)


def test_cross_recall_hand_computed_and_skips_labels_missing_from_gallery() -> None:
    gallery, gallery_labels = on_line(0.0, 1.0, 10.0), np.array([0, 1, 2])
    # q(0.9, label 0): gallery order 1, 0, 2 -> hit at rank 2; q(9, label 2): hit at rank 1;
    # q(0, label 5) has no match in the gallery and is ignored. The query at 0.0 equals a gallery
    # point: nothing is excluded as "self" here.
    queries, query_labels = on_line(0.9, 9.0, 0.0, 0.0), np.array([0, 2, 5, 0])

    metrics = recall_at_k_cross(queries, query_labels, gallery, gallery_labels, ks=(1, 2))

    assert metrics == pytest.approx({"recall@1": 2 / 3, "recall@2": 1.0})


def test_recall_is_monotone_in_k() -> None:
    points, labels = clustered_embeddings(num_classes=20, dim=8, seed=2, noise=1.5)

    metrics = retrieval_metrics(points, labels, ks=(1, 2, 4, 8, 16))

    recalls = [metrics[f"recall@{k}"] for k in (1, 2, 4, 8, 16)]
    assert recalls == sorted(recalls)
    assert recalls[0] < recalls[-1]


def test_perfectly_separated_embeddings_score_one_everywhere() -> None:
    points, labels = clustered_embeddings(num_classes=10, dim=8, seed=4, noise=0.01)
    points *= 100

    metrics = retrieval_metrics(points, labels)

    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0))


def test_perfectly_separated_two_classes_cluster_perfectly() -> None:
    # Two blobs only: faiss k-means starts from random samples (as in DiVA and PML), and with
    # many blobs it can put two centroids in one blob even when the embeddings are perfect.
    points, labels = clustered_embeddings(num_classes=2, dim=8, seed=4, noise=0.01)
    points *= 100

    metrics = evaluate_embeddings(points, labels)

    assert list(metrics) == [
        "recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r", "r_precision"
    ]  # fmt: skip
    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0))


def test_without_clustering_returns_only_retrieval_metrics() -> None:
    metrics = evaluate_embeddings(LINE_POINTS, LINE_LABELS, ks=(1,), with_clustering=False)

    assert list(metrics) == ["recall@1", "map@r", "r_precision"]


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (np.zeros((3, 2)), np.zeros(2), "3 embeddings but 2 labels"),
        (np.zeros((0, 2)), np.zeros(0), "empty"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), np.zeros(2), "NaN or inf"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), np.zeros(2), "NaN or inf"),
        pytest.param(
            np.array([[0.0, 1e39], [1.0, 0.0]]),
            np.zeros(2),
            "NaN or inf",
            id="overflows-float32",
            marks=pytest.mark.filterwarnings("ignore:overflow encountered in cast"),
        ),
        (np.zeros(4), np.zeros(4), "2-D"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), "every label occurs once"),
    ],
)
def test_invalid_inputs_raise_value_error(
    embeddings: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(embeddings, labels)


def test_invalid_ks_and_cluster_counts_raise_value_error() -> None:
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(LINE_POINTS, LINE_LABELS, ks=(0, 1))
    with pytest.raises(ValueError, match="num_clusters"):
        clustering_metrics(LINE_POINTS, LINE_LABELS, num_clusters=7)
    with pytest.raises(ValueError, match="dimension"):
        recall_at_k_cross(LINE_POINTS, LINE_LABELS, np.zeros((2, 3)), np.array([0, 1]))


def test_metrics_table_orders_columns_and_marks_missing_values() -> None:
    table = format_metrics_table(
        {
            "diva": {"map@r": 0.25, "recall@10": 0.9, "nmi": 0.5, "recall@2": 0.8},
            "magnet": {"recall@2": 0.7},
        },
        title="CUB",
    )
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    rendered = console.file.getvalue()

    assert [column.header for column in table.columns] == [
        "run", "recall@2", "recall@10", "nmi", "map@r"
    ]  # fmt: skip
    assert "CUB" in rendered
    magnet_row = next(line for line in rendered.splitlines() if "magnet" in line)
    cells = [cell.strip() for cell in magnet_row.split("│")[1:-1]]
    assert cells == ["magnet", "0.7000", "-", "-", "-"]
