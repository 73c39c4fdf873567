"""The heads that turn pooled backbone features into embeddings, by the name a model card
records (`ModelSpec.head`), so that any artifact loads without importing the methods that
train it: the linear and identity heads, DiVA's four task heads and DVML's encoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.registry import Registry

# The order of the test-time concatenation (DiVA diva_main.py).
DIVA_HEAD_NAMES = ("discriminative", "selfsimilarity", "shared", "intra")


class EmbeddingHead(nn.Module):
    """A head: pooled features (N, feature_dim) in, a dict with the test-time `embedding`
    (N, embedding_dim) and any training-only outputs out."""

    embedding_dim: int


class LinearHead(EmbeddingHead):
    """One linear projection to the embedding (Wu et al. 2017, Sec. 5: a single FC layer)."""

    def __init__(self, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"embedding": self.fc(features)}


class IdentityHead(EmbeddingHead):
    """No head: the pooled backbone features are the embedding (the untrained baseline)."""

    def __init__(self, feature_dim: int, embedding_dim: int = 0) -> None:
        super().__init__()
        self.embedding_dim = feature_dim

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"embedding": features}


class DiVAHead(EmbeddingHead):
    """One linear embedding per DiVA task, each L2-normalised (DiVA architectures/).

    `embedding`, the test-time output, is the weighted concatenation of the four in the order
    of `DIVA_HEAD_NAMES`, re-normalised, so its dimension is 4 x `embedding_dim`.
    """

    def __init__(
        self,
        feature_dim: int,
        embedding_dim: int,
        *,
        # DiVA tried (0.75, 1.25, 1.25, 1.25), (0.5, 1, 1, 1), (0.5, 1.5, 1.5, 1.5) on CUB/CARS and
        # (1, 1, 1, 1), (0.5, 1, 1, 1), (1, 0.5, 0.5, 0.5), (1.5, 1, 1, 1) on SOP (diva_main.py).
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if len(weights) != len(DIVA_HEAD_NAMES):
            raise ValueError(f"DiVA needs one weight per head {DIVA_HEAD_NAMES}, got {weights}")
        self.weights = tuple(float(weight) for weight in weights)
        self.projections = nn.ModuleDict(
            {name: nn.Linear(feature_dim, embedding_dim) for name in DIVA_HEAD_NAMES}
        )
        self.embedding_dim = len(DIVA_HEAD_NAMES) * embedding_dim

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        outputs = {
            name: F.normalize(projection(features), dim=-1)
            for name, projection in self.projections.items()
        }
        weighted = [
            weight * outputs[name]
            for name, weight in zip(DIVA_HEAD_NAMES, self.weights, strict=True)
        ]
        outputs["embedding"] = F.normalize(torch.cat(weighted, dim=-1), dim=-1)
        return outputs


class DVMLHead(EmbeddingHead):
    """Invariant encoder, variance encoder and decoder (Lin et al. 2018).

    `forward` is deterministic: it returns `embedding` = z_I (the test-time embedding) and
    the variance code's `mean` and `log_variance`; sampling z_V is the training step's job, so
    retrieval never sees noise (ujjwaltiwari's evaluate.py adds a z_V sample; not copied).
    The encoders are single linear layers as in ujjwaltiwari's models/dvml.py (GeDML's
    [1024, 512] MLP is the same map). The decoder is ujjwaltiwari's Linear -> Tanh -> Linear
    (models/dvml.py), chosen over GeDML's BN-MLP so that reconstructing the T x B synthesised
    rows of phase 2 does not depend on batch statistics.

    `detach_variance_input` (not in the paper, off by default) feeds the variance encoder
    h.detach(): the KL and the z_V sample then train only that encoder and cannot shrink the
    backbone features, the cause of DVML's first-epoch collapse on IconThemes
    (docs/results.md). Test-time outputs are the same either way.
    """

    def __init__(
        self,
        feature_dim: int,
        embedding_dim: int,
        *,
        decoder_hidden_dim: int = 512,  # ujjwaltiwari: Linear(512, 512) -> Tanh (models/dvml.py)
        detach_variance_input: bool = False,
    ) -> None:
        super().__init__()
        self.invariant = nn.Linear(feature_dim, embedding_dim)
        self.mean = nn.Linear(feature_dim, embedding_dim)
        self.log_variance = nn.Linear(feature_dim, embedding_dim)
        self.decoder = nn.Sequential(
            nn.Linear(embedding_dim, decoder_hidden_dim),
            nn.Tanh(),
            nn.Linear(decoder_hidden_dim, feature_dim),
        )
        self.embedding_dim = embedding_dim
        self.detach_variance_input = detach_variance_input

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        variance_input = features.detach() if self.detach_variance_input else features
        return {
            "embedding": self.invariant(features),
            "mean": self.mean(variance_input),
            "log_variance": self.log_variance(variance_input),
        }

    def decode(self, latent: Tensor) -> Tensor:
        """Reconstruct backbone features from (synthesised) latent codes."""
        return self.decoder(latent)


HEADS: Registry[EmbeddingHead] = Registry(
    "head",
    {"linear": LinearHead, "identity": IdentityHead, "diva": DiVAHead, "dvml": DVMLHead},
)
