"""Streaming dataset: partitioning over ranks and workers, epochs, exact resume, prefetch."""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import framefeed
from framefeed.datasets.iterable import IterableDataset, merge_worker_states
from framefeed.sampling.partition import Uneven, balanced_split
from framefeed.sampling.stream import Layer, StreamOrder

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from framefeed.synth import CameraSpec, SynthConfig, write_lerobot_dataset

    root = tmp_path_factory.mktemp("stream") / "ds"
    config = SynthConfig(
        num_episodes=8,
        min_length=6,
        max_length=14,
        cameras=(CameraSpec(key="observation.images.top", height=32, width=48),),
        seed=7,
    )
    return Path(write_lerobot_dataset(root, config, progress=False))


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _order(offsets: np.ndarray, **kw: object) -> StreamOrder:
    args: dict[str, object] = {
        "offsets": offsets,
        "seed": 0,
        "epoch": 0,
        "rank": 0,
        "world_size": 1,
        "pool_size": 4,
    }
    args.update(kw)
    return StreamOrder(**args)  # type: ignore[arg-type]


LENGTHS = [7, 12, 3, 9, 15, 4, 8, 10, 6, 11, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1), (2, 3)])
def test_uneven_split_is_disjoint_and_complete(seed: int, world: int, workers: int) -> None:
    offsets = _offsets(LENGTHS)
    seen: list[int] = []
    for rank in range(world):
        order = _order(offsets, seed=seed, rank=rank, world_size=world, uneven=Uneven.UNEVEN)
        for part in order.consumer_orders(workers):
            seen.extend(part.tolist())
    assert sorted(seen) == list(range(int(offsets[-1])))


@pytest.mark.parametrize("policy", [Uneven.PAD, Uneven.DROP])
def test_pad_and_drop_equalise_every_consumer(policy: Uneven) -> None:
    offsets = _offsets(LENGTHS)
    counts = []
    everything: Counter[int] = Counter()
    for rank in range(2):
        order = _order(offsets, rank=rank, world_size=2, uneven=policy)
        for part in order.consumer_orders(2):
            counts.append(len(part))
            everything.update(part.tolist())
    assert len(set(counts)) == 1
    if policy is Uneven.PAD:
        assert set(everything) == set(range(int(offsets[-1])))
    else:
        assert max(everything.values()) == 1  # dropped samples are never duplicated


def test_balanced_split_by_frames() -> None:
    lengths = np.asarray(LENGTHS)
    parts = balanced_split(lengths, 3)
    loads = [int(lengths[p].sum()) for p in parts]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))
    assert max(loads) - min(loads) <= lengths.max()


def test_order_is_a_pure_function_and_epochs_differ() -> None:
    offsets = _offsets(LENGTHS)
    a = _order(offsets, seed=5, epoch=1).consumer_orders(2)
    b = _order(offsets, seed=5, epoch=1).consumer_orders(2)
    c = _order(offsets, seed=5, epoch=2).consumer_orders(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_pool_of_one_goes_episode_by_episode() -> None:
    offsets = _offsets(LENGTHS)
    (order,) = _order(offsets, pool_size=1).consumer_orders(1)
    episode = np.searchsorted(offsets, order, side="right") - 1
    changes = int(np.count_nonzero(np.diff(episode)))
    assert changes == len(LENGTHS) - 1


def test_large_pool_mixes_episodes() -> None:
    offsets = _offsets([50] * 40)
    (order,) = _order(offsets, pool_size=32).consumer_orders(1)
    episode = np.searchsorted(offsets, order, side="right") - 1
    per_batch = [len(set(episode[i : i + 32].tolist())) / 32 for i in range(0, 1000, 32)]
    assert np.mean(per_batch) > 0.5


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 1000),
    first_workers=st.integers(1, 4),
    second_workers=st.integers(1, 4),
    cuts=st.lists(st.integers(0, 40), min_size=8, max_size=8),
    policy=st.sampled_from(list(Uneven)),
)
def test_resume_yields_exactly_the_rest(
    seed: int, first_workers: int, second_workers: int, cuts: list[int], policy: Uneven
) -> None:
    offsets = _offsets(LENGTHS)
    order = _order(offsets, seed=seed, uneven=policy)
    full: Counter[int] = Counter()
    for part in order.consumer_orders(first_workers):
        full.update(part.tolist())
    parts = order.consumer_orders(first_workers)
    first = Layer(first_workers, tuple(min(c, len(p)) for c, p in zip(cuts, parts, strict=False)))
    done: Counter[int] = Counter()
    for part, c in zip(parts, first.yielded, strict=True):
        done.update(part[:c].tolist())
    # Second stretch with another worker count, then resume again.
    slices = [order.worker_order([first], w, second_workers) for w in range(second_workers)]
    second = Layer(
        second_workers, tuple(min(c, len(s)) for c, s in zip(cuts[4:], slices, strict=False))
    )
    for s, c in zip(slices, second.yielded, strict=True):
        done.update(s[:c].tolist())
    rest = order.remaining([first, second])
    assert done + Counter(rest.tolist()) == full


def _indices(ds: IterableDataset, limit: int | None = None) -> list[int]:
    out = []
    for sample in ds:
        out.append(int(sample["index"]))
        if limit is not None and len(out) == limit:
            break
    return out


def test_dataset_epoch_covers_everything_once(stream_root: Path) -> None:
    ds = IterableDataset(stream_root, episode_pool_size=3, fetch_size=8, seed=1, uneven="uneven")
    got = _indices(ds)
    assert sorted(got) == list(range(ds.dataset.num_frames))
    ds.set_epoch(1)
    assert _indices(ds) != got
    sample = next(iter(ds))
    assert sample["observation.images.top"].dtype == torch.uint8
    from framefeed.synth import read_marker

    assert read_marker(sample["observation.images.top"].numpy()) == (
        int(sample["episode_index"]),
        int(sample["frame_index"]),
    )


@pytest.mark.parametrize("cut", [1, 9, 17, 40])
def test_dataset_state_dict_resumes_exactly(stream_root: Path, cut: int) -> None:
    make = lambda: IterableDataset(stream_root, episode_pool_size=3, fetch_size=8, seed=4)  # noqa: E731
    full = _indices(make())
    ds = make()
    head = _indices(ds, limit=cut)  # the prefetcher has fetched more than it yielded
    state = ds.state_dict()
    assert state["yielded"] == cut
    resumed = make()
    resumed.load_state_dict(state)
    assert head + _indices(resumed) == full


def test_merged_worker_states_resume_with_other_worker_count(stream_root: Path) -> None:
    ds = IterableDataset(stream_root, episode_pool_size=3, fetch_size=8, seed=2)
    order = StreamOrder(
        offsets=ds.index.offsets, seed=2, epoch=0, rank=0, world_size=1, pool_size=3
    )
    parts = order.consumer_orders(2)
    base = ds.state_dict()
    states = [{**base, "worker": w, "num_workers": 2, "yielded": y} for w, y in enumerate((5, 11))]
    merged = merge_worker_states(states)
    ds.load_state_dict(merged)
    rest = _indices(ds)
    done = parts[0][:5].tolist() + parts[1][:11].tolist()
    assert Counter(done) + Counter(rest) == Counter(np.concatenate(parts).tolist())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_split_the_epoch(stream_root: Path, context: str) -> None:
    ds = IterableDataset(stream_root, episode_pool_size=2, fetch_size=8, seed=3, uneven="uneven")
    loader = DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context=context, timeout=60
    )
    got = [int(i) for batch in loader for i in batch["index"]]
    assert sorted(got) == list(range(ds.dataset.num_frames))


def test_set_epoch_reaches_persistent_workers(stream_root: Path) -> None:
    ds = IterableDataset(stream_root, episode_pool_size=2, fetch_size=8, seed=3)
    loader = DataLoader(
        ds,
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
        timeout=60,
    )
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append([int(i) for batch in loader for i in batch["index"]])
    assert epochs[0] != epochs[1]
    fresh = IterableDataset(stream_root, episode_pool_size=2, fetch_size=8, seed=3)
    fresh.set_epoch(1)
    again = DataLoader(
        fresh, batch_size=4, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    assert [int(i) for batch in again for i in batch["index"]] == epochs[1]


def test_batches_mode_and_ranks(stream_root: Path) -> None:
    seen: list[int] = []
    steps = []
    for rank in range(2):
        ds = IterableDataset(
            stream_root, episode_pool_size=2, batch_size=5, seed=0, rank=rank, world_size=2
        )
        batches = list(DataLoader(ds, batch_size=None))
        steps.append(len(batches))
        assert batches[0]["observation.images.top"].shape[1:] == (3, 32, 48)
        seen.extend(int(i) for b in batches for i in b["index"])
    assert steps[0] == steps[1]  # padded: DDP ranks take the same number of steps
    assert set(seen) == set(range(IterableDataset(stream_root).dataset.num_frames))


def test_early_break_leaves_no_thread(stream_root: Path) -> None:
    before = set(threading.enumerate())
    ds = IterableDataset(stream_root, fetch_size=4, prefetch=2, decode_threads=2)
    it = iter(ds)
    next(it)
    assert any(t.name.startswith("framefeed") for t in set(threading.enumerate()) - before)
    it.close()  # what a `break` in a for loop does when the generator is collected
    ds.close()
    assert not set(threading.enumerate()) - before


def test_with_block_closes_the_dataset(stream_root: Path) -> None:
    before = set(threading.enumerate())
    with IterableDataset(stream_root, fetch_size=4, prefetch=0, decode_threads=2) as ds:
        for _ in ds:
            break
        started = set(threading.enumerate()) - before
        assert any(t.name.startswith("framefeed-decode") for t in started)
    assert not set(threading.enumerate()) - before
    assert len(next(iter(ds))) > 0  # closed, still usable (a new planner, as after close())
    ds.close()


def test_bad_arguments() -> None:
    with pytest.raises(framefeed.ConfigError):
        _order(_offsets([3, 4]), rank=2, world_size=2)
    with pytest.raises(framefeed.ConfigError):
        Layer(2, (1,))
    with pytest.raises(framefeed.ConfigError):
        merge_worker_states([])


def test_stateful_dataloader_resumes_exactly_with_workers(stream_root: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> IterableDataset:
        return IterableDataset(stream_root, episode_pool_size=2, fetch_size=8, seed=3)

    def loader(ds: IterableDataset) -> Any:
        return stateful.StatefulDataLoader(
            ds, batch_size=4, num_workers=2, multiprocessing_context="fork", timeout=60
        )

    full = [int(i) for batch in loader(make()) for i in batch["index"]]
    first = loader(make())
    it = iter(first)
    head = [int(i) for _ in range(5) for i in next(it)["index"]]
    state = first.state_dict()
    del it
    resumed = loader(make())
    resumed.load_state_dict(state)
    rest = [int(i) for batch in resumed for i in batch["index"]]
    assert head + rest == full


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # on purpose
def test_stateful_loader_state_resumes_with_another_worker_count(stream_root: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> IterableDataset:
        return IterableDataset(stream_root, episode_pool_size=2, fetch_size=8, seed=6)

    ds = make()
    order = StreamOrder(
        offsets=ds.index.offsets, seed=6, epoch=0, rank=0, world_size=1, pool_size=2
    )
    # What the first run's two workers would yield in the whole epoch (padding included).
    full = Counter(np.concatenate(order.consumer_orders(2)).tolist())
    first = stateful.StatefulDataLoader(
        make(), batch_size=4, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    it = iter(first)
    head = [int(i) for _ in range(3) for i in next(it)["index"]]
    merged = merge_worker_states(first.state_dict())
    del it
    for workers in (0, 3):
        resumed = make()
        resumed.load_state_dict(merged)
        loader = DataLoader(
            resumed,
            batch_size=4,
            num_workers=workers,
            timeout=60 if workers else 0,
            multiprocessing_context="fork" if workers else None,
        )
        rest = [int(i) for batch in loader for i in batch["index"]]
        assert Counter(head) + Counter(rest) == full


def test_two_ranks_times_two_workers_cover_the_epoch_once(stream_root: Path) -> None:
    seen: list[int] = []
    for rank in range(2):
        ds = IterableDataset(
            stream_root,
            episode_pool_size=2,
            fetch_size=8,
            seed=9,
            rank=rank,
            world_size=2,
            uneven="uneven",
        )
        loader = DataLoader(
            ds, batch_size=4, num_workers=2, multiprocessing_context="fork", timeout=60
        )
        seen.extend(int(i) for batch in loader for i in batch["index"])
    assert sorted(seen) == list(range(IterableDataset(stream_root).dataset.num_frames))


class _Info:
    def __init__(self, worker: int, workers: int) -> None:
        self.id = worker
        self.num_workers = workers


def test_other_workers_wait_for_the_first_batch(
    stream_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers > 0 start an epoch after worker 0's first chunk, or after a bounded wait."""
    import time

    from framefeed.datasets import iterable

    monkeypatch.setattr(iterable, "FIRST_BATCH_WAIT_S", 0.3)
    ds = IterableDataset(stream_root, seed=0)
    ds.set_epoch(2)
    t0 = time.monotonic()
    ds._wait_for_first(_Info(1, 2))  # worker 0 has not delivered: the wait runs out
    waited = time.monotonic() - t0
    assert waited >= 0.29
    monkeypatch.setattr(iterable, "FIRST_BATCH_WAIT_S", 20.0)
    t0 = time.monotonic()
    ds._wait_for_first(_Info(0, 2))  # worker 0 itself never waits
    ds._wait_for_first(None)  # nor does a process without workers
    assert time.monotonic() - t0 < 10
    done = threading.Timer(0.05, lambda: setattr(ds._first_done, "value", 2))
    done.start()
    t0 = time.monotonic()
    ds._wait_for_first(_Info(1, 2))
    assert time.monotonic() - t0 < 10  # released when worker 0's first chunk is out
    done.join()
    # Worker 0 marks the epoch once its first chunk is decoded, inside a real iteration.
    ds.set_epoch(3)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: _Info(0, 2))
    it = iter(ds)
    next(it)
    assert ds._first_done.value == 3


def test_a_dataset_pickles_outside_worker_start(stream_root: Path) -> None:
    """A copy made by pickle (not a worker start) keeps the epoch but shares nothing."""
    import pickle

    ds = IterableDataset(stream_root, seed=5)
    ds.set_epoch(3)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.epoch == 3
    assert _indices(copy) == _indices(ds)
    copy.set_epoch(4)
    assert ds.epoch == 3  # the copy has counters of its own


@pytest.mark.parametrize("seed", [-1, 1.5, "a", None])
def test_bad_seed_is_a_config_error(plain_root: Path, seed: Any) -> None:
    """Refused when the dataset is built, not a numpy ValueError at the first epoch."""
    with pytest.raises(framefeed.ConfigError, match="seed must be an int >= 0"):
        framefeed.IterableDataset(plain_root, seed=seed)


@pytest.mark.parametrize(
    ("rank", "world_size", "message"),
    [
        (1.5, 2, "rank must be an int, got 1.5"),  # was truncated to rank 1
        (0, None, "world_size must be an int, got None"),
        (2, 2, "rank 2 is not in [0, world_size=2)"),
        (0, 0, "world_size must be >= 1, got 0"),
    ],
)
def test_bad_rank_is_a_config_error(
    plain_root: Path, rank: Any, world_size: Any, message: str
) -> None:
    with pytest.raises(framefeed.ConfigError, match=re.escape(message)):
        framefeed.IterableDataset(plain_root, rank=rank, world_size=world_size)


def test_negative_epoch_is_a_config_error(plain_root: Path) -> None:
    ds = framefeed.IterableDataset(plain_root)
    with pytest.raises(framefeed.ConfigError, match="epoch must be an int >= 0"):
        ds.set_epoch(-1)
    assert ds.epoch == 0
    ds.close()


def test_merge_worker_states_names_what_it_takes() -> None:
    with pytest.raises(framefeed.ConfigError, match="state_dict"):
        merge_worker_states([{}])
    with pytest.raises(framefeed.ConfigError, match="state_dict"):
        merge_worker_states([{"worker": 0}])
