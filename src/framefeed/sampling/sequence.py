"""`SequenceSampler`: batches whose slots play whole episodes frame by frame (temporal models).

Semantics (DALI's ``SequenceSampler``, made epoch-based and sharded). For epoch ``e``:

1. The non-empty episodes are shuffled with ``(seed, e)`` (kept in order with
   ``shuffle=False``) and split over the ranks, whole and disjoint, balanced by frame count
   (`balanced_split`). Rank ``r``'s share, in shuffled order, is its *cycle* ``Q``.
2. Batches have ``batch_size`` slots. At step 0 every slot, in slot order, takes the next
   episode of ``Q``; at every later step each slot whose episode has just ended takes the next
   one of ``Q`` (lower slots first). A slot yields frame ``f`` of its episode at one step and
   frame ``f + 1`` at the next, so row ``t`` of the epoch is one batch and column ``i`` is one
   slot's stream of episodes.
3. A rank's own epoch ends when every episode of ``Q`` has been started and finished (step
   ``T_r``). To give every rank the same number of batches the epoch has
   ``T = max_r T_r`` steps; a slot that runs out of ``Q`` before ``T`` keeps going with
   *padding*: ``Q`` again from its start, wrapping around, cut at ``T``. So every episode is
   played in full exactly once per epoch, plus padding.
4. With ``drop_last=True`` there is no padding: a rank's epoch ends at the first step ``D_r``
   at which a slot would need an episode and ``Q`` is used up, and the epoch has
   ``T = min_r D_r`` steps. The episodes still playing at ``T`` are cut short, and ``T`` is 0
   when a rank has fewer episodes than slots.

``len(sampler) == T``; each item is a list of ``batch_size`` global sample numbers. Use it as
``DataLoader(dataset, batch_sampler=sampler)``. A model that keeps state per slot resets it
where its slot's frame index is 0.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import ConfigError
from .partition import balanced_split
from .samplers import EpochSampler, IntArray, Layout, as_offsets, run_positions

__all__ = ["SequenceSampler"]


class SequenceSampler(EpochSampler[list[int]]):
    """Batch sampler: slot ``i`` of consecutive batches holds consecutive frames of an episode.

    ``batch_size`` is this rank's batch size (its number of slots). See the module docstring
    for the exact definition of an epoch.
    """

    def __init__(
        self,
        lengths: Layout,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.offsets = as_offsets(lengths)
        self.lengths: IntArray = np.diff(self.offsets)
        self.episodes: IntArray = np.flatnonzero(self.lengths > 0).astype(np.int64)
        if len(self.episodes) < self.world_size:
            raise ConfigError(
                f"{len(self.episodes)} non-empty episodes cannot be split over {self.world_size} "
                "ranks; every rank needs at least one episode (use fewer ranks)"
            )
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self._steps_cache: tuple[int, int] | None = None

    def cycles(self, epoch: int) -> list[IntArray]:
        """Every rank's cycle of episode positions for ``epoch`` (disjoint, in play order)."""
        episodes = self.episodes
        if self.shuffle:
            episodes = np.random.default_rng([self.seed, epoch]).permutation(episodes)
        return [episodes[part] for part in balanced_split(self.lengths[episodes], self.world_size)]

    def _pack(self, cycle: IntArray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Play ``cycle`` greedily: ``(start, slot)`` per episode and the final slot heap."""
        heap = [(0, s) for s in range(self.batch_size)]
        placed = []
        for length in self.lengths[cycle].tolist():
            t, s = heapq.heappop(heap)
            placed.append((t, s))
            heapq.heappush(heap, (t + length, s))
        return placed, heap

    def _steps(self, epoch: int) -> int:
        if self._steps_cache is None or self._steps_cache[0] != epoch:
            ends = [[t for t, _ in self._pack(c)[1]] for c in self.cycles(epoch)]
            steps = min(min(e) for e in ends) if self.drop_last else max(max(e) for e in ends)
            self._steps_cache = (epoch, steps)
        return self._steps_cache[1]

    def __len__(self) -> int:
        return self._steps(self._epoch)

    def _order(self, epoch: int) -> IntArray:
        steps = self._steps(epoch)
        cycle = self.cycles(epoch)[self.rank]
        placed, heap = self._pack(cycle)
        episodes = cycle.tolist()
        j = 0
        while heap[0][0] < steps:  # padding: the cycle again, from its start (never with drop)
            t, s = heapq.heappop(heap)
            episode = cycle[j % len(cycle)]
            j += 1
            placed.append((t, s))
            episodes.append(int(episode))
            heapq.heappush(heap, (t + int(self.lengths[episode]), s))
        starts, slots = (np.array(v, dtype=np.int64).reshape(-1) for v in zip(*placed, strict=True))
        eps = np.array(episodes, dtype=np.int64)
        keep = starts < steps
        starts, slots, eps = starts[keep], slots[keep], eps[keep]
        runs = np.minimum(self.lengths[eps], steps - starts)
        frame = run_positions(runs)
        out = np.full((steps, self.batch_size), -1, dtype=np.int64)
        out[np.repeat(starts, runs) + frame, np.repeat(slots, runs)] = (
            np.repeat(self.offsets[eps], runs) + frame
        )
        return out
