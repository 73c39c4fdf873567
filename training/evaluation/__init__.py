"""Evaluation of embeddings: leave-one-out retrieval and clustering metrics (as in DiVA and PML)."""

from training.evaluation.metrics import (
    DEFAULT_KS,
    clustering_metrics,
    evaluate_embeddings,
    format_metrics_table,
    kmeans_assignments,
    pairwise_f1_score,
    recall_at_k_cross,
    retrieval_metrics,
)

__all__ = [
    "DEFAULT_KS",
    "clustering_metrics",
    "evaluate_embeddings",
    "format_metrics_table",
    "kmeans_assignments",
    "pairwise_f1_score",
    "recall_at_k_cross",
    "retrieval_metrics",
]
