"""Splitting episodes over consumers (ranks, then DataLoader workers).

Episodes are never cut: each goes whole to one consumer. The split is greedy on frame count,
longest episodes first (each goes to the consumer with the fewest frames so far; ties go to the
lowest consumer), so consumers get disjoint sets whose frame counts differ by at most one
episode. `equalize` then evens out the number of samples per consumer as the user chose.
"""

from __future__ import annotations

import enum
import heapq

import numpy as np

from ..errors import ConfigError

__all__ = ["Uneven", "balanced_split", "equalize"]


class Uneven(enum.Enum):
    """What to do when consumers would get different numbers of samples."""

    PAD = "pad"
    """Repeat a consumer's own first samples until every consumer has the largest count
    (the default: DDP ranks take the same number of steps and never hang)."""
    DROP = "drop"
    """Cut every consumer to the smallest count (some samples are not seen this epoch)."""
    UNEVEN = "uneven"
    """Leave counts as they are (every sample exactly once; steps may differ across ranks)."""


def balanced_split(lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """Positions ``0..len(lengths)-1`` split into ``parts`` lists, balanced by total length.

    Positions keep their relative order inside each part.
    """
    if parts < 1:
        raise ConfigError(f"cannot split over {parts} consumers")
    sizes = np.asarray(lengths, dtype=np.int64)
    heap = [(0, p) for p in range(parts)]
    owner = np.empty(len(sizes), dtype=np.int64)
    for i in np.argsort(-sizes, kind="stable").tolist():
        load, p = heapq.heappop(heap)
        owner[i] = p
        heapq.heappush(heap, (load + int(sizes[i]), p))
    return [np.flatnonzero(owner == p) for p in range(parts)]


def equalize(counts: list[int], policy: Uneven) -> list[int]:
    """Target sample count for each consumer under ``policy``."""
    if not counts:
        return []
    if policy is Uneven.PAD:
        return [max(counts)] * len(counts)
    if policy is Uneven.DROP:
        return [min(counts)] * len(counts)
    return list(counts)
