"""Orders: which samples come next, as pure functions of (seed, epoch, rank, world, worker)."""

from __future__ import annotations

from .partition import Uneven, balanced_split, equalize
from .pool import pool_order
from .samplers import EpisodeAwareSampler, ShardedShuffleSampler, WeightedSampler
from .sequence import SequenceSampler

__all__ = [
    "EpisodeAwareSampler",
    "SequenceSampler",
    "ShardedShuffleSampler",
    "Uneven",
    "WeightedSampler",
    "balanced_split",
    "equalize",
    "pool_order",
]
