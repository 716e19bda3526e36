"""`IterableDataset`: streaming samples with an episode-pool shuffle, partitioned and resumable.

Each consumer (DDP rank x DataLoader worker) computes its own order (`StreamOrder`): a pure
function of seed, epoch, rank, world size and worker. A background thread fetches the next
``fetch_size`` samples through the same batch planner as `MapDataset` (one read plan per chunk:
sorted, keyframe-anchored video decode), while the current chunk is yielded; at most
``prefetch`` chunks wait in a bounded queue (default 2; 1 inside DataLoader workers).

``set_epoch`` writes the epoch into shared memory, so persistent DataLoader workers see it
too. ``state_dict`` counts the samples actually yielded (prefetched ones are not), and
``load_state_dict`` resumes with exactly the samples not yet yielded, also inside workers
(torchdata's ``StatefulDataLoader`` calls them per worker) and with another number of workers
(merge the workers' states with `merge_worker_states` first).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.data

from ..catalog import Dataset
from ..errors import ConfigError
from ..fields import Field
from ..index import IndexSpec
from ..nodecache import ColumnCache
from ..sampling.partition import Uneven
from ..sampling.ranks import resolve_rank
from ..sampling.stream import Layer, StreamOrder
from .serving import Serving

__all__ = ["IterableDataset", "merge_worker_states"]

_STATE_VERSION = 1
SEGMENT_CACHE_BYTES = 512 << 20
FIRST_BATCH_WAIT_S = 3.0
"""Longest time workers other than worker 0 wait for its first batch of an epoch."""
"""Bytes of whole-episode video kept per consumer when streaming from a remote store."""


def _is_count(value: object) -> bool:
    """An int (not a bool) >= 0: seeds and epochs."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value >= 0)


def merge_worker_states(
    states: Sequence[Mapping[str, Any]] | Mapping[str, Any],
) -> dict[str, Any]:
    """One rank-level state from the states of all DataLoader workers of that rank.

    ``states`` is the list of the workers' ``state_dict()``s, or a torchdata
    ``StatefulDataLoader.state_dict()`` (the workers' states are taken from it). Load the
    result into the dataset before building a loader with any number of workers.
    """
    if isinstance(states, Mapping):
        snapshots = states.get("_snapshot", {}).get("_worker_snapshots")
        if not snapshots:
            raise ConfigError(
                "expected a StatefulDataLoader state with worker snapshots (num_workers > 0) "
                "or a list of worker states"
            )
        states = [snap["dataset_state"] for snap in snapshots.values()]
    if not states:
        raise ConfigError("no worker states to merge")
    keys = ("worker", "num_workers", "layers", "epoch", "yielded")
    for s in states:
        if not isinstance(s, Mapping) or any(k not in s for k in keys):
            raise ConfigError(
                "merge_worker_states takes the state_dict()s of an IterableDataset's workers "
                f"(with keys {list(keys)}), got {s!r}"
            )
    by_worker = sorted(states, key=lambda s: int(s["worker"]))
    num_workers = int(by_worker[0]["num_workers"])
    if [int(s["worker"]) for s in by_worker] != list(range(num_workers)):
        raise ConfigError(f"need the states of workers 0..{num_workers - 1}, got {len(states)}")
    head = dict(by_worker[0])
    for s in by_worker:
        if s["layers"] != head["layers"] or s["epoch"] != head["epoch"]:
            raise ConfigError("worker states come from different epochs or resumes")
    layers = [*head["layers"], [num_workers, [int(s["yielded"]) for s in by_worker]]]
    head.update(worker=0, num_workers=1, yielded=0, layers=layers)
    return head


class IterableDataset(Serving, torch.utils.data.IterableDataset[Any]):
    """Streams samples of a framefeed dataset, shuffled through an episode pool.

    ``episode_pool_size`` episodes are open per consumer (only their row numbers; nothing is
    decoded ahead of ``fetch_size``); ``uneven`` ("pad", "drop" or "uneven") says how unequal
    shares are evened out across ranks and workers. With ``batch_size`` the dataset yields
    collated batches (use ``DataLoader(batch_size=None)``) instead of single samples.
    ``column_cache`` shares the tabular columns once per node, as for `MapDataset`.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Dataset,
        *,
        episode_pool_size: int = 16,
        fetch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: Literal["pad", "drop", "uneven"] = "pad",
        batch_size: int | None = None,
        prefetch: int | None = None,
        delta_timestamps: Mapping[str, Sequence[float]] | None = None,
        episodes: Sequence[int] | None = None,
        tolerance_s: float = 1e-4,
        image_dtype: Literal["uint8", "float32"] = "uint8",
        fields: Sequence[Field] | None = None,
        decode_threads: int | None = None,
        index: IndexSpec | None = None,
        column_cache: ColumnCache | bool | None = None,
    ) -> None:
        if episode_pool_size < 1 or fetch_size < 1 or (prefetch is not None and prefetch < 0):
            raise ConfigError("episode_pool_size and fetch_size must be >= 1, prefetch >= 0")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if not _is_count(seed):
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        try:
            self.uneven = Uneven(uneven)
        except ValueError:
            raise ConfigError(f"uneven must be 'pad', 'drop' or 'uneven', not {uneven!r}") from None
        self._setup(
            source,
            delta_timestamps=delta_timestamps,
            episodes=episodes,
            tolerance_s=tolerance_s,
            image_dtype=image_dtype,
            fields=fields,
            decode_threads=decode_threads,
            index=index,
            column_cache=column_cache,
        )
        # Remote streaming fetches each pool episode's packets in one request and keeps them
        # while the episode is in the pool (bounded): one request per episode per camera.
        if not self.dataset.storage.is_local:
            self._segment_cache_bytes = SEGMENT_CACHE_BYTES
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.pool_size = episode_pool_size
        self.fetch_size = (
            fetch_size
            if batch_size is None
            else max(batch_size, fetch_size // batch_size * batch_size)
        )
        self.seed = int(seed)
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.prefetch = prefetch
        self._shared_epoch = multiprocessing.Value("q", 0, lock=False)
        # The epoch whose first chunk worker 0 has decoded (see `_wait_for_first`).
        self._first_done = multiprocessing.Value("q", -1, lock=False)
        self._layers: list[Layer] = []
        self._layers_epoch = 0
        self._yielded = 0

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled outside the start of a worker (a copy, a Ray task, a checkpoint): the
            # shared counters cannot travel, their values do.
            state["_shared_epoch"] = int(self._shared_epoch.value)
            state["_first_done"] = int(self._first_done.value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("_shared_epoch", "_first_done"):
            if isinstance(state.get(key), int):
                state[key] = multiprocessing.Value("q", state[key], lock=False)
        self.__dict__.update(state)

    def __enter__(self) -> IterableDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- epochs and checkpoints -------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iteration on (also in persistent workers)."""
        if not _is_count(epoch):
            raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
        self._shared_epoch.value = int(epoch)

    def _consumer(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _current_layers(self) -> list[Layer]:
        """Resume layers, when they belong to the epoch about to run (else a fresh epoch)."""
        return self._layers if self._layers_epoch == self.epoch else []

    def state_dict(self) -> dict[str, Any]:
        """Progress of this consumer: JSON-serialisable, small."""
        worker, num_workers = self._consumer()
        layers = self._current_layers()
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": worker,
            "num_workers": num_workers,
            "yielded": self._yielded,
            "layers": [[layer.num_workers, list(layer.yielded)] for layer in layers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where ``state`` stopped: the next iteration yields exactly what was left.

        ``state`` is this consumer's own state (same worker layout), or a rank-level state from
        `merge_worker_states` / a process without workers (any worker layout).
        """
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ConfigError(f"unknown state version {state.get('version')!r}")
        for key in ("seed", "rank", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"state was saved with {key}={state[key]}, this dataset has "
                    f"{key}={getattr(self, key)}"
                )
        layers = [Layer(int(n), tuple(int(c) for c in ys)) for n, ys in state["layers"]]
        worker, num_workers = self._consumer()
        if int(state["num_workers"]) == 1 and int(state["worker"]) == 0:
            if int(state["yielded"]):
                layers.append(Layer(1, (int(state["yielded"]),)))
            self._yielded = 0
        elif int(state["num_workers"]) == num_workers and int(state["worker"]) == worker:
            self._yielded = int(state["yielded"])
        else:
            raise ConfigError(
                "this is one worker's state from another worker layout; merge all workers' "
                "states with framefeed.merge_worker_states and load the result"
            )
        self.set_epoch(int(state["epoch"]))
        self._layers = layers
        self._layers_epoch = int(state["epoch"])

    # -- iteration ---------------------------------------------------------------------------

    def _stream_order(self) -> StreamOrder:
        return StreamOrder(
            offsets=self.index.offsets,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            pool_size=self.pool_size,
            shuffle=self.shuffle,
            uneven=self.uneven,
        )

    def _order(self) -> np.ndarray:
        worker, num_workers = self._consumer()
        layers = self._current_layers()
        return self._stream_order().worker_order(layers, worker, num_workers)

    def samples_per_epoch(self, num_workers: int = 1) -> int:
        """Samples this rank yields in the current epoch with ``num_workers`` workers."""
        order = self._stream_order()
        layers = self._current_layers()
        return sum(len(order.worker_order(layers, w, num_workers)) for w in range(num_workers))

    def _wait_for_first(self, info: Any) -> None:
        """Let worker 0 decode the epoch's first batch alone (bounded wait).

        A DataLoader hands out worker 0's batch first. When every worker starts decoding at
        once they share the cores and the first batch takes as long as all of them together;
        the other workers start when it is done (or after `FIRST_BATCH_WAIT_S`).
        """
        if info is None or info.id == 0 or info.num_workers < 2:
            return
        deadline = time.monotonic() + FIRST_BATCH_WAIT_S
        while self._first_done.value < self.epoch and time.monotonic() < deadline:
            time.sleep(0.005)

    def __iter__(self) -> Iterator[Any]:
        order = self._order()
        start = self._yielded
        info = torch.utils.data.get_worker_info()
        lead = info is not None and info.id == 0
        if start == 0:
            self._wait_for_first(info)
        if lead and len(order) == start:
            self._first_done.value = self.epoch
        # The first chunk is one batch (or a few samples), so the first batch does not wait
        # for a whole fetch; later chunks are fetch_size samples.
        first = min(self.fetch_size, self.batch_size or 8)
        bounds = [start, *range(start + first, len(order), self.fetch_size), len(order)]
        chunks = [order[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        depth = self.prefetch
        if depth is None:
            # Inside a DataLoader worker the loader already keeps batches in flight; one chunk
            # ahead keeps decoding busy without doubling the memory held per worker.
            depth = 1 if torch.utils.data.get_worker_info() is not None else 2
        fetched = _Prefetcher(self._fetch, chunks, depth)
        try:
            for values, size in fetched:
                if lead and self._first_done.value < self.epoch:
                    self._first_done.value = self.epoch
                if self.batch_size is not None:
                    for b in range(0, size, self.batch_size):
                        stop = min(b + self.batch_size, size)
                        self._yielded += stop - b  # counted once handed out
                        yield {k: v[b:stop] for k, v in values.items()}
                else:
                    for i in range(size):
                        self._yielded += 1
                        yield {k: v[i] for k, v in values.items()}
        finally:
            fetched.close()
        # A finished epoch resumes nothing: the next iteration starts the epoch afresh.
        self._yielded = 0
        self._layers = []


class _Prefetcher:
    """Runs ``fetch`` over ``chunks`` in a background thread, at most ``depth`` ahead."""

    def __init__(self, fetch: Any, chunks: list[np.ndarray], depth: int) -> None:
        self._fetch = fetch
        self._chunks = chunks
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[str, Any, int]] = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth > 0 and chunks:
            self._thread = threading.Thread(
                target=self._run, name="framefeed-prefetch", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        for chunk in self._chunks:
            if self._stop.is_set():
                return
            try:
                item: tuple[str, Any, int] = ("ok", self._fetch(chunk), len(chunk))
            except BaseException as exc:  # handed to the consumer, never lost in the thread
                self._put(("error", exc, 0))
                return
            if not self._put(item):
                return
        self._put(("done", None, 0))

    def _put(self, item: tuple[str, Any, int]) -> bool:
        """Queue ``item`` unless the consumer has closed; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int]]:
        if self._thread is None:
            for chunk in self._chunks:
                yield self._fetch(chunk), len(chunk)
            return
        while True:
            kind, payload, size = self._queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise payload
            yield payload, size

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread.join()
