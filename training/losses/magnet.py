"""Magnet loss (Rippel et al., ICLR 2016, eq. 5): the mini-batch form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MagnetLoss(nn.Module):
    """l_n = [alpha + |r_n - mu(r_n)|^2 / (2 s^2) + logsumexp_m(-|r_n - mu_m|^2 / (2 s^2))]_+.

    mu(r_n) is the mean of r_n's cluster over the batch's own examples of that cluster, the
    logsumexp runs over the in-batch means of clusters of *other* classes, and
    s^2 = sum_n |r_n - mu(r_n)|^2 / (N - 1) is the batch's variance (paper eq. 5). It divides
    as the variance itself: tf-magnet-loss and MagnetLoss-PyTorch divide by 2 variance^2, which
    squares it; mbanani/pytorch-magnet-loss and the paper do not. The log-sum-exp form of
    -log(exp(-d_own / 2s^2 - alpha) / sum exp(-d_other / 2s^2)) is what keeps identical
    embeddings, far-apart clusters and batches without impostors finite (mbanani#1).

    The loss is invariant to a global scale of the embeddings (distances and s^2 scale alike),
    so whether the caller L2-normalises changes only the per-example norms.
    """

    def __init__(
        self,
        *,
        # Cluster separation gap: 1.0 in tf-magnet-loss and MagnetLoss-PyTorch (vithursant); the
        # paper's own value is UNVERIFIED (mbanani uses 4 or 7.18).
        alpha: float = 1.0,
        # Our choice: the paper leaves open whether gradients flow through s^2; stopping them is
        # the stable option (NaN losses are reported in mbanani/pytorch-magnet-loss#1).
        detach_variance: bool = True,
        eps: float = 1e-8,  # floor on s^2, so a batch of identical embeddings divides by eps
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.detach_variance = detach_variance
        self.eps = eps

    def forward(self, embeddings: Tensor, clusters: Tensor, labels: Tensor) -> Tensor:
        """The mean of `per_example`."""
        losses, _ = self.per_example(embeddings, clusters, labels)
        return losses.mean()

    def per_example(
        self, embeddings: Tensor, clusters: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(loss of each example (N,), the batch variance s^2 before the eps floor).

        `clusters` holds each example's cluster id (any integers; equal ids = one cluster) and
        `labels` its class; every cluster must hold examples of one class only.
        """
        batch_clusters, membership = torch.unique(clusters, return_inverse=True)
        num_clusters = len(batch_clusters)
        sizes = torch.bincount(membership, minlength=num_clusters).to(embeddings.dtype)
        means = torch.zeros(
            num_clusters, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device
        ).index_add(0, membership, embeddings)
        means = means / sizes[:, None]
        cluster_labels = torch.zeros_like(batch_clusters).scatter(0, membership, labels)
        if not torch.equal(cluster_labels[membership], labels):
            raise ValueError("a cluster holds examples of more than one class")

        distances = (embeddings[:, None, :] - means[None, :, :]).square().sum(dim=2)
        own_distance = distances.gather(1, membership[:, None]).squeeze(1)
        variance = own_distance.sum() / max(len(embeddings) - 1, 1)
        scale = variance.detach() if self.detach_variance else variance
        two_variance = 2 * scale.clamp_min(self.eps)

        impostor = cluster_labels[None, :] != labels[:, None]
        has_impostor = impostor.any(dim=1)
        # Rows without an impostor get a dummy finite row: their loss is 0 (an empty sum in the
        # denominator), and a row of -inf would make logsumexp's gradient NaN.
        impostor_logits = (-distances / two_variance).masked_fill(~impostor, -torch.inf)
        impostor_logits = impostor_logits.masked_fill(~has_impostor[:, None], 0.0)
        hinge = F.relu(
            self.alpha + own_distance / two_variance + torch.logsumexp(impostor_logits, dim=1)
        )
        return torch.where(has_impostor, hinge, torch.zeros_like(hinge)), variance
