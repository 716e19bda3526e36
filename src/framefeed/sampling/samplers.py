"""Map-style training samplers: index orders for ``torch.utils.data.DataLoader``.

Every sampler here yields global sample numbers of a `SampleIndex`-like layout, and its order is
a pure function of ``(seed, epoch, rank, world_size)`` and its configuration: nothing touches
the global RNG, and every rank computes the same global order and takes its own share of it.

All samplers follow one protocol:

* ``rank`` and ``world_size``: give both, or neither to take them from ``torch.distributed``
  (the initialised default group), else ``RANK`` / ``WORLD_SIZE``, else one process (as torch's
  ``DistributedSampler`` does).

* ``set_epoch(n)`` selects epoch ``n``'s order (call it before each epoch, as with torch's
  ``DistributedSampler``). Calling it with the epoch already set keeps a resume point.
* ``__len__`` is exact: one iteration yields exactly ``len(sampler)`` items on every rank.
* ``state_dict()`` is a small JSON-serialisable dict: the epoch and how many items the current
  iteration has yielded. ``load_state_dict()`` makes the next iteration yield exactly the items
  that were left. The count is of items the sampler handed out, and a plain ``DataLoader``
  prefetches ahead of the training step; torchdata's ``StatefulDataLoader`` saves and restores
  a sampler's state at the batch actually consumed (also with workers), so checkpoint the
  loader, not the sampler, when one is in between.
* One iteration at a time: a new ``iter()`` restarts progress tracking.

`SequenceSampler` lives in `framefeed.sampling.sequence`; the shared protocol, the plain
shuffles and the mixtures live here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError
from .ranks import resolve_rank

__all__ = ["EpisodeAwareSampler", "ShardedShuffleSampler", "WeightedSampler"]

_STATE_VERSION = 1
IntArray = npt.NDArray[np.int64]
T = TypeVar("T", int, list[int])


class HasOffsets(Protocol):
    """Anything with cumulative per-episode sample offsets, like `SampleIndex`."""

    @property
    def offsets(self) -> npt.NDArray[Any]: ...


Layout = Sequence[int] | npt.NDArray[Any] | HasOffsets
"""Episode lengths, or an object with ``offsets`` (``offsets[p]`` = samples before episode p)."""


def as_offsets(layout: Layout) -> IntArray:
    """Cumulative sample offsets (``len = episodes + 1``, starting at 0) of ``layout``."""
    if hasattr(layout, "offsets"):
        offsets = np.asarray(layout.offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0:
            raise ConfigError("offsets must be one-dimensional and start at 0")
        if np.any(np.diff(offsets) < 0):
            raise ConfigError("offsets must not decrease (episode lengths must be >= 0)")
        return offsets
    given: Any = layout
    if isinstance(given, Dataset):
        # np.asarray would iterate it: a MapDataset would decode every sample first.
        raise ConfigError(
            "episode lengths must be a list or array of ints, or an object with offsets such as "
            f"a MapDataset's index (EpisodeAwareSampler(ds.index)), not a {type(given).__name__}"
        )
    lengths = _int_array(given, "episode lengths")
    if lengths.ndim != 1:
        raise ConfigError(f"episode lengths must be one-dimensional, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ConfigError(f"episode lengths must be >= 0, got {int(lengths.min())}")
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _int_array(values: Any, what: str) -> IntArray:
    """``values`` as int64, or a `ConfigError` for non-integers (never a silent truncation)."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} must be integers, got {values!r}") from exc
    if arr.size and arr.dtype.kind not in "iu":
        raise ConfigError(f"{what} must be integers, got {arr.dtype} values such as {values!r}")
    return arr.astype(np.int64)


def check_shard(seed: int, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Validate the arguments every sampler shares; the rank and world size to use."""
    if not _is_int(seed):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return resolve_rank(rank, world_size)


def shard(order: IntArray, rank: int, world_size: int, total: int) -> IntArray:
    """Rank ``rank``'s share of ``order`` cut or wrapped (repeated from the start) to ``total``.

    Ranks take interleaved positions, so the ``j``-th global batch of ``batch_size *
    world_size`` is one contiguous stretch of ``order``.
    """
    if total > len(order):
        order = np.tile(order, -(-total // len(order)))
    out: IntArray = order[rank:total:world_size]
    return out


def run_positions(runs: IntArray) -> IntArray:
    """``concatenate([arange(n) for n in runs])``, vectorised."""
    out: IntArray = np.arange(int(runs.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(runs) - runs, runs
    )
    return out


class EpochSampler(Sampler[T], Generic[T]):
    """The shared epoch and checkpoint logic; subclasses provide ``_order(epoch)``.

    A private base class because the call order matters: the resume point must be consumed by
    exactly one iteration and survive a ``set_epoch`` with the same epoch.
    """

    def __init__(self, *, seed: int, rank: int | None, world_size: int | None) -> None:
        self.rank, self.world_size = check_shard(seed, rank, world_size)
        self.seed = seed
        self._epoch = 0
        self._resume = 0  # where the next iteration starts
        self._yielded = 0  # progress of the latest iteration (or the loaded resume point)
        self._cache: tuple[int, IntArray] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iteration on."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._resume = self._yielded = 0

    def _order(self, epoch: int) -> IntArray:
        """This rank's items of ``epoch``: 1-D (samples) or 2-D (one row per batch)."""
        raise NotImplementedError

    def order(self) -> IntArray:
        """This rank's whole order for the current epoch (cached for one epoch)."""
        if self._cache is None or self._cache[0] != self._epoch:
            self._cache = (self._epoch, self._order(self._epoch))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.order())

    def __iter__(self) -> Iterator[T]:
        order = self.order()
        start, self._resume = self._resume, 0
        self._yielded = start
        for i in range(start, len(order)):
            self._yielded = i + 1  # counted before the hand-out, so a state taken now is exact
            yield order[i].tolist()

    def state_dict(self) -> dict[str, Any]:
        """Progress of this sampler: JSON-serialisable, a handful of integers."""
        return {
            "version": _STATE_VERSION,
            "kind": type(self).__name__,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "length": len(self),
            "yielded": self._yielded,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next iteration yields exactly what was left when ``state`` was taken."""
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ConfigError(f"unknown sampler state version {state.get('version')!r}")
        if state.get("kind") != type(self).__name__:
            raise ConfigError(f"state of a {state.get('kind')}, not of a {type(self).__name__}")
        for key in ("seed", "rank", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has "
                    f"{key}={getattr(self, key)}; build it with the same arguments"
                )
        previous, self._epoch = self._epoch, int(state["epoch"])
        length, yielded = len(self), int(state["yielded"])
        if int(state["length"]) != length or not 0 <= yielded <= length:
            self._epoch = previous  # leave the sampler as it was
            raise ConfigError(
                f"sampler state was saved for an epoch of {state['length']} items "
                f"({yielded} yielded), this sampler has {length}: the dataset or the "
                "configuration changed"
            )
        self._resume = self._yielded = yielded


class ShardedShuffleSampler(EpochSampler[int]):
    """A fresh permutation of ``range(num_samples)`` each epoch, split over the ranks.

    Ranks take interleaved positions of the permutation, so global batch ``j`` (``batch_size``
    per rank) is one contiguous stretch of it. With ``drop_last`` the incomplete last *global*
    batch is dropped (``batch_size`` defaults to 1), so every rank gets the same number of full
    batches and no sample repeats. Without it the permutation is padded by wrapping around to
    a multiple of ``world_size`` (as torch's ``DistributedSampler``), so every rank yields
    ``ceil(num_samples / world_size)`` samples; ``batch_size`` then plays no part.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if not _is_int(num_samples) or num_samples < 0:
            raise ConfigError(
                "num_samples must be an int >= 0 (len(dataset)), got "
                + (repr(num_samples) if _is_int(num_samples) else f"a {type(num_samples).__name__}")
            )
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def _total(self) -> int:
        if self.drop_last:
            step = (self.batch_size or 1) * self.world_size
            return self.num_samples // step * step
        return -(-self.num_samples // self.world_size) * self.world_size

    def __len__(self) -> int:
        return self._total() // self.world_size

    def _order(self, epoch: int) -> IntArray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return shard(perm.astype(np.int64), self.rank, self.world_size, self._total())


class EpisodeAwareSampler(EpochSampler[int]):
    """Samples ``[start + drop_first, end - drop_last)`` of every episode (LeRobot semantics).

    Episodes shorter than ``drop_first + drop_last + 1`` contribute nothing. The candidates are
    shuffled together each epoch (``shuffle=True``) or kept in order, then split over the ranks
    by interleaved positions, padded by wrapping around so every rank yields
    ``ceil(candidates / world_size)`` samples.
    """

    def __init__(
        self,
        lengths: Layout,
        *,
        drop_first: int = 0,
        drop_last: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if drop_first < 0 or drop_last < 0:
            raise ConfigError(
                f"drop_first and drop_last must be >= 0, got {drop_first} and {drop_last}"
            )
        offsets = as_offsets(lengths)
        begin, end = offsets[:-1] + drop_first, offsets[1:] - drop_last
        keep = np.maximum(end - begin, 0)
        self.candidates: IntArray = np.repeat(begin, keep) + run_positions(keep)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return -(-len(self.candidates) // self.world_size)

    def _order(self, epoch: int) -> IntArray:
        order = self.candidates
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return shard(order, self.rank, self.world_size, len(self) * self.world_size)


class WeightedSampler(EpochSampler[int]):
    """A mixture: each draw picks group ``g`` with probability ``weights[g] / sum(weights)``.

    Then it takes a sample of that group: uniformly at random (``replacement=True``), or the
    next sample of a per-group permutation, with a fresh permutation once the group is used up
    (``replacement=False``: no sample of a group repeats before all of it has been drawn).
    ``num_samples`` is the number of draws per epoch over all ranks; one global sequence of
    ``ceil(num_samples / world_size) * world_size`` draws is split over the ranks by
    interleaved positions, so each rank yields ``ceil(num_samples / world_size)``. Groups hold
    global sample numbers (for instance one dataset's range in a concatenation, or one task's
    samples); a sample may appear in several groups.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int] | npt.NDArray[Any]],
        weights: Sequence[float],
        *,
        num_samples: int,
        replacement: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self.groups = [_int_array(g, f"group {i}").reshape(-1) for i, g in enumerate(groups)]
        negative = [i for i, g in enumerate(self.groups) if g.size and g.min() < 0]
        if negative:
            raise ConfigError(f"group {negative[0]} holds negative sample numbers")
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"weights must be numbers, got {weights!r}") from exc
        if w.shape != (len(self.groups),):
            raise ConfigError(f"{len(self.groups)} groups but {w.size} weights")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        empty = [g for g, grp in enumerate(self.groups) if grp.size == 0 and w[g] > 0]
        if empty:
            raise ConfigError(f"groups {empty} are empty but have a weight > 0")
        if not _is_int(num_samples) or num_samples < 0:
            raise ConfigError(f"num_samples must be an int >= 0, got {num_samples!r}")
        self.probabilities = w / w.sum()
        self.num_samples = int(num_samples)
        self.replacement = replacement

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def _order(self, epoch: int) -> IntArray:
        total = len(self) * self.world_size
        rng = np.random.default_rng([self.seed, epoch, 0])
        choice = rng.choice(len(self.groups), size=total, p=self.probabilities)
        draws = np.empty(total, dtype=np.int64)
        for g, group in enumerate(self.groups):
            where = np.flatnonzero(choice == g)
            if where.size == 0:
                continue
            g_rng = np.random.default_rng([self.seed, epoch, 1, g])
            if self.replacement:
                picks = g_rng.integers(0, group.size, size=where.size)
            else:
                cycles = -(-where.size // group.size)
                table = np.tile(np.arange(group.size), (cycles, 1))
                picks = g_rng.permuted(table, axis=1).reshape(-1)  # one permutation per cycle
            draws[where] = group[picks[: where.size]]
        out: IntArray = draws[self.rank :: self.world_size]
        return out
