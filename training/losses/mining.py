"""The triplet miners by name: what configs (`miner: distance`) and losses that take a miner
by name refer to, DiVA's included under the names its code uses."""

from __future__ import annotations

from typing import Any

from training.losses.diva_miners import (
    IntraClassRandomMiner,
    RandomPermutedDistanceMiner,
    SharedNegativeDistanceMiner,
)
from training.losses.miners import (
    BatchHardMiner,
    DistanceWeightedMiner,
    RandomMiner,
    SemiHardMiner,
    TripletMiner,
)
from training.registry import Registry

MINERS: Registry[TripletMiner] = Registry(
    "miner",
    {
        "distance": DistanceWeightedMiner,
        "random": RandomMiner,
        "semihard": SemiHardMiner,
        "batch_hard": BatchHardMiner,
        "random_distance": RandomPermutedDistanceMiner,
        "shared_neg_distance": SharedNegativeDistanceMiner,
        "intra_random": IntraClassRandomMiner,
    },
)


def build_miner(name: str, **params: Any) -> TripletMiner:
    """A miner by name, e.g. `build_miner("distance", lower_cutoff=0.5)`."""
    return MINERS.build(name, params)
