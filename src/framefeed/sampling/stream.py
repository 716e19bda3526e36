"""The streaming order: which samples each consumer yields, and how to resume it exactly.

A *consumer* is one (rank, DataLoader worker) pair. For epoch ``e`` the selected episodes are
shuffled with ``seed`` and ``e``, split over the ranks and then over the workers of each rank
(whole episodes, balanced by frame count), and each consumer draws its frames through an
episode pool (`pool_order`). Counts are then evened out across every consumer of every rank
(`Uneven`), so DDP ranks take the same number of steps.

Resuming is described by *layers*: each layer is the worker layout of one stretch of the epoch
(``num_workers`` and how many samples each worker had yielded when the checkpoint was taken).
The samples not yet yielded after the last layer are split into equal contiguous slices for the
current workers, so a run may resume with another number of workers and still yield exactly the
remaining samples, once each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .partition import Uneven, balanced_split, equalize
from .pool import pool_order

__all__ = ["Layer", "StreamOrder"]


@dataclass(frozen=True)
class Layer:
    """One stretch of an epoch: ``num_workers`` workers had yielded ``yielded[w]`` samples."""

    num_workers: int
    yielded: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_workers < 1 or len(self.yielded) != self.num_workers:
            raise ConfigError(f"bad resume layer: {self.num_workers} workers, {self.yielded}")
        if any(c < 0 for c in self.yielded):
            raise ConfigError(f"bad resume layer: negative counts {self.yielded}")


@dataclass(frozen=True, kw_only=True)
class StreamOrder:
    """The order of one epoch over one dataset selection (pure function of its fields)."""

    offsets: np.ndarray
    """Cumulative sample offsets of the selected episodes (``SampleIndex.offsets``)."""
    seed: int
    epoch: int
    rank: int
    world_size: int
    pool_size: int
    shuffle: bool = True
    uneven: Uneven = Uneven.PAD

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *extra])

    def consumer_orders(self, num_workers: int) -> list[np.ndarray]:
        """Fresh-epoch order of every worker of this rank (global sample numbers)."""
        mine, targets = self._split(num_workers)
        return [self._draw(mine, targets, w, num_workers) for w in range(num_workers)]

    def _split(self, num_workers: int) -> tuple[list[np.ndarray], list[int]]:
        """Episodes of each worker of this rank, and every consumer's evened-out count."""
        lengths = np.diff(self.offsets)
        episodes = np.arange(len(lengths))
        if self.shuffle:
            episodes = self._rng().permutation(episodes)
        # Ranks first, then workers, each balanced by frames; remember every consumer's count.
        by_rank = balanced_split(lengths[episodes], self.world_size)
        counts: list[int] = []
        mine: list[np.ndarray] = []
        for r, rank_part in enumerate(by_rank):
            rank_eps = episodes[rank_part]
            for worker_part in balanced_split(lengths[rank_eps], num_workers):
                eps = rank_eps[worker_part]
                counts.append(int(lengths[eps].sum()))
                if r == self.rank:
                    mine.append(eps)
        return mine, equalize(counts, self.uneven)

    def _draw(
        self, mine: list[np.ndarray], targets: list[int], w: int, num_workers: int
    ) -> np.ndarray:
        """Worker ``w``'s frames, drawn through its episode pool and fitted to its target."""
        groups = [np.arange(self.offsets[e], self.offsets[e + 1]) for e in mine[w].tolist()]
        rng = self._rng(self.rank, self.world_size, w, num_workers)
        order = pool_order(groups, self.pool_size, rng, shuffle=self.shuffle)
        return _fit(order, targets[self.rank * num_workers + w])

    def remaining(self, layers: Sequence[Layer]) -> np.ndarray:
        """Samples of this rank not yet yielded after ``layers`` (in order)."""
        if not layers:
            return np.concatenate(self.consumer_orders(1))
        first, *rest = layers
        orders = self.consumer_orders(first.num_workers)
        left = np.concatenate(
            [o[min(c, len(o)) :] for o, c in zip(orders, first.yielded, strict=True)]
        )
        for layer in rest:
            slices = even_slices(left, layer.num_workers)
            left = np.concatenate(
                [s[min(c, len(s)) :] for s, c in zip(slices, layer.yielded, strict=True)]
            )
        return left

    def worker_order(self, layers: Sequence[Layer], worker: int, num_workers: int) -> np.ndarray:
        """What worker ``worker`` of ``num_workers`` yields, given the resume layers."""
        if not 0 <= worker < num_workers:
            raise ConfigError(f"worker {worker} is not in [0, {num_workers})")
        if not layers:  # only this worker's draw: each worker holds its own share, not all
            mine, targets = self._split(num_workers)
            return self._draw(mine, targets, worker, num_workers)
        return even_slices(self.remaining(layers), num_workers)[worker]


def even_slices(order: np.ndarray, parts: int) -> list[np.ndarray]:
    """``order`` cut into ``parts`` contiguous slices whose lengths differ by at most one."""
    base, extra = divmod(len(order), parts)
    bounds = np.cumsum([0] + [base + (1 if p < extra else 0) for p in range(parts)])
    return [order[bounds[p] : bounds[p + 1]] for p in range(parts)]


def _fit(order: np.ndarray, target: int) -> np.ndarray:
    """``order`` cut or padded (by repeating it from the start) to ``target`` samples."""
    if target <= len(order):
        return order[:target]
    if len(order) == 0:
        raise ConfigError(
            "a consumer received no episodes and cannot pad: use fewer ranks or workers than "
            "episodes, or uneven='uneven'"
        )
    reps = -(-target // len(order))
    return np.tile(order, reps)[:target]
