"""`Loader` sources and stages: threads per stage, async and generator fetches, executors,
sequences with samplers, a streaming dataset as source."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing as mp
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_support import (  # no_leaked_threads: an autouse fixture, active once imported
    assert_batch_equal,
    assert_resumes_exactly,
    framefeed_threads,
    jitter,
    no_leaked_threads,  # noqa: F401
)

import framefeed
import framefeed.synth
from framefeed.errors import ConfigError
from framefeed.loader.pipeline import Loader, PipelineError
from framefeed.sampling.samplers import ShardedShuffleSampler

pytestmark = pytest.mark.timeout(60)


# -- threads per stage, async sources and collate ----------------------------------------------


def _slow_sum_collate(samples: list[int]) -> list[int]:
    time.sleep(random.Random(sum(samples)).uniform(0, 0.01))  # batches finish out of order
    return list(samples)


class _Peak:
    """The largest number of threads seen inside ``enter``/``leave`` at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def enter(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        with self._lock:
            self.running -= 1


def test_collate_threads_run_concurrently_and_keep_input_order() -> None:
    peak = _Peak()

    def collate_fn(samples: list[int]) -> list[int]:
        peak.enter()
        try:
            return _slow_sum_collate(samples)
        finally:
            peak.leave()

    threads = {"fetch": 3, "collate": 3}
    with Loader(
        range(100), fetch=jitter, batch_size=4, collate_fn=collate_fn, threads=threads
    ) as loader:
        got = list(loader)
        stats = {s.name: s for s in loader.stats()}
    assert got == [[x * 10 for x in range(i, min(i + 4, 100))] for i in range(0, 100, 4)]
    assert peak.peak > 1
    assert stats["collate"].threads == 3 and stats["collate"].items == 25
    assert stats["fetch"].threads == 3


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("order", ["input", "completion"])
def test_collate_threads_batch_every_item_once(drop_last: bool, order: str) -> None:
    with Loader(
        range(50),
        fetch=jitter,
        batch_size=7,
        drop_last=drop_last,
        collate_fn=_slow_sum_collate,
        threads={"fetch": 4, "collate": 2},
        order=order,  # type: ignore[arg-type]
    ) as loader:
        got = list(loader)
    expected = [[x * 10 for x in range(i, min(i + 7, 50))] for i in range(0, 50, 7)]
    if drop_last:
        expected = expected[:-1]
    if order == "input":
        assert got == expected
    else:  # completion order: batches of whatever finished first, each item at most once
        assert sorted(len(b) for b in got) == sorted(len(b) for b in expected)
        flat = [x for b in got for x in b]
        assert len(set(flat)) == len(flat) and set(flat) <= {x * 10 for x in range(50)}
        if not drop_last:
            assert sorted(flat) == [x * 10 for x in range(50)]


def test_batches_are_whole_when_many_items_leave_the_reordering_at_once() -> None:
    # item 0 is slow: the items after it pile up and are released together, more than a batch
    def fetch(x: int) -> int:
        if x == 0:
            time.sleep(0.2)
        return x

    with Loader(
        range(40),
        fetch=fetch,
        batch_size=3,
        collate_fn=list,
        threads={"fetch": 4, "collate": 2},
        buffer_size=30,
    ) as loader:
        got = list(loader)
    assert got == [list(range(i, min(i + 3, 40))) for i in range(0, 40, 3)]


@pytest.mark.parametrize("seed", range(4))
def test_collate_threads_with_skipped_failures_match_one_thread(seed: int) -> None:
    rng = random.Random(seed)
    bad = set(rng.sample(range(60), 9))
    batch_size = rng.randint(1, 6)

    def fetch(x: int) -> int:
        time.sleep(rng.uniform(0, 0.002))
        if x in bad:
            raise ValueError(x)
        return x

    def run(threads: dict[str, int]) -> list[list[int]]:
        with Loader(
            range(60),
            fetch=fetch,
            batch_size=batch_size,
            collate_fn=_slow_sum_collate,
            threads=threads,
            on_error="skip",
        ) as loader:
            return list(loader)

    one = run({"fetch": 1, "collate": 1})
    kept = [x for x in range(60) if x not in bad]
    assert one == [kept[i : i + batch_size] for i in range(0, len(kept), batch_size)]
    assert run({"fetch": 3, "collate": 3}) == one


def test_collate_error_with_collate_threads_names_the_batch() -> None:
    def collate_fn(samples: list[int]) -> list[int]:
        if 20 in samples:
            raise ValueError("no twenties")
        return _slow_sum_collate(samples)

    got: list[list[int]] = []
    with (
        Loader(
            range(40),
            batch_size=4,
            collate_fn=collate_fn,
            threads={"fetch": 2, "collate": 3},
        ) as loader,
        pytest.raises(PipelineError) as info,
    ):
        for batch in loader:
            got.append(batch)
    assert got == [list(range(i, i + 4)) for i in range(0, 20, 4)]  # every batch before it
    assert info.value.stage == "collate" and info.value.item == "[20, 21, 22, 23]"
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("stop_after", [0, 3, 9])
def test_state_dict_resumes_exactly_with_collate_threads(stop_after: int) -> None:
    def make() -> Loader:
        return Loader(
            list(range(37)),
            fetch=jitter,
            batch_size=4,
            collate_fn=_slow_sum_collate,
            threads={"fetch": 3, "collate": 2},
        )

    assert_resumes_exactly(make, stop_after)


@pytest.mark.parametrize(
    ("threads", "message"),
    [
        ({"decode": 2}, "unknown stage(s) 'decode'"),
        ({"transfer": 2}, "threads['transfer'] must be 1"),
        ({"collate": 0}, "threads for stage 'collate' must be >= 1, got 0"),
        ({"fetch": 1.5}, "threads['fetch'] must be an int, got float 1.5"),
        (0, "threads for stage 'fetch' must be >= 1, got 0"),
    ],
)
def test_threads_per_stage_are_checked(threads: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Loader(range(4), threads=threads)


def test_async_collate_fn() -> None:
    async def collate_fn(samples: list[int]) -> int:
        return sum(samples)

    with Loader(range(10), batch_size=3, collate_fn=collate_fn, threads={"collate": 2}) as loader:
        assert list(loader) == [3, 12, 21, 9]


def test_async_iterable_source() -> None:
    closed: list[bool] = []

    async def source() -> Any:
        try:
            for i in range(30):
                yield i
        finally:
            closed.append(True)

    async def fetch(x: int) -> int:
        return x * 2

    loader = Loader(source(), fetch=fetch, batch_size=4, threads=3)
    with loader:
        got = [b.tolist() for b in loader]
    expected = [[2 * x for x in range(i, min(i + 4, 30))] for i in range(0, 30, 4)]
    assert got == expected
    assert closed == [True]


def test_async_iterable_source_is_closed_on_early_break_and_resumes() -> None:
    closed: list[bool] = []

    class Source:
        """An async iterable that can be iterated again (a fresh generator each time)."""

        def __aiter__(self) -> Any:
            return self._gen()

        async def _gen(self) -> Any:
            try:
                for i in range(12):
                    yield i
            finally:
                closed.append(True)

    with Loader(Source(), threads=2) as loader:
        first: list[int] = []
        for x in loader:
            first.append(x)
            state = loader.state_dict()
            if len(first) == 5:
                break
        assert closed == [True]  # the generator was closed with the run
    with Loader(Source(), threads=2) as resumed:
        resumed.load_state_dict(state)
        assert first + list(resumed) == list(range(12))


def _clips(x: int) -> Iterator[int]:
    """A generator fetch: item ``x`` gives ``x % 4`` samples (none for multiples of 4)."""
    time.sleep(random.Random(x).uniform(0, 0.003))
    for k in range(x % 4):
        yield 100 * x + k


def _all_clips(items: range) -> list[int]:
    return [c for x in items for c in _clips(x)]


@pytest.mark.parametrize("batch_size", [None, 1, 3, 5])
def test_generator_fetch_gives_several_samples_per_item(batch_size: int | None) -> None:
    expected = _all_clips(range(30))
    with Loader(
        range(30),
        fetch=_clips,
        batch_size=batch_size,
        collate_fn=list if batch_size else None,
        threads={"fetch": 3, "collate": 2},
    ) as loader:
        got = list(loader)
    if batch_size is None:
        assert got == expected
    else:
        assert got == [expected[i : i + batch_size] for i in range(0, len(expected), batch_size)]


def test_async_generator_fetch() -> None:
    async def fetch(x: int) -> Any:
        for k in range(x % 3):
            yield (x, k)

    with Loader(range(10), fetch=fetch, threads=2) as loader:
        assert list(loader) == [(x, k) for x in range(10) for k in range(x % 3)]


def test_generator_fetch_failure_drops_the_whole_item() -> None:
    def fetch(x: int) -> Iterator[int]:
        yield 10 * x
        if x == 3:
            raise ValueError("clip 2 of item 3 is damaged")
        yield 10 * x + 1

    with Loader(range(6), fetch=fetch, threads=2, on_error="skip") as loader:
        assert list(loader) == [v for x in range(6) if x != 3 for v in (10 * x, 10 * x + 1)]
    with Loader(range(6), fetch=fetch, threads=2) as loader, pytest.raises(PipelineError) as info:
        list(loader)
    assert info.value.stage == "fetch" and "damaged" in str(info.value)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 7, 12])
def test_state_dict_resumes_inside_a_generator_item(stop_after: int, sampled: bool) -> None:
    # batches of 4 over items giving 0-3 samples each (6 per 4 items): batches 1, 4 and 7 end
    # inside an item
    def make() -> Loader:
        if sampled:  # a stateful source: resumed by its own state (the one before the item)
            source: Any = ShardedShuffleSampler(25, seed=4)
        else:
            source = list(range(25))
        return Loader(
            source, fetch=_clips, batch_size=4, collate_fn=list, threads={"fetch": 3, "collate": 2}
        )

    everything, state = assert_resumes_exactly(make, stop_after)
    assert sorted(v for b in everything for v in b) == sorted(_all_clips(range(25)))
    # seed 4's order puts the ends of batches 1 and 4 inside an item
    assert (state["partial"] > 0) == (stop_after in ((1, 4) if sampled else (1, 4, 7)))


# -- over a streaming IterableDataset ------------------------------------------------------------


def test_loader_over_an_iterable_dataset_resumes_exactly(plain_root: Path) -> None:
    """The dataset's own state (a `Stateful` source) is what the Loader checkpoints."""

    def make() -> framefeed.IterableDataset:
        return framefeed.IterableDataset(
            plain_root, batch_size=5, episode_pool_size=2, fetch_size=8, seed=4, prefetch=2
        )

    with make() as ds:
        ds.set_epoch(1)
        direct = list(ds)
    assert len(direct) > 4
    with make() as ds, Loader(ds, threads=2, buffer_size=2) as loader:
        loader.set_epoch(1)  # passed on to the dataset
        through = list(loader)
        assert len(through) == len(direct)
        for a, b in zip(through, direct, strict=True):
            assert_batch_equal(a, b)
        it = iter(loader)
        first = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))
        it.close()
    assert state["delivered"] == 3 and state["source"]["epoch"] == 1
    for a, b in zip(first, direct[:3], strict=True):
        assert_batch_equal(a, b)
    with make() as ds, Loader(ds, threads=2) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    assert len(rest) == len(direct) - 3
    for a, b in zip(rest, direct[3:], strict=True):
        assert_batch_equal(a, b)


# -- fetch in an executor's worker processes -------------------------------------------------------


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _fail_on_3_remote(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x} in a worker")
    return x


def _die_on_5(x: int) -> int:
    if x == 5:
        os._exit(3)  # a worker process that dies: the pool breaks
    return x


def _clips_remote(x: int) -> Iterator[int]:
    yield from _clips(x)


@pytest.fixture(scope="module")
def processes() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        yield pool


def test_executor_runs_fetch_in_worker_processes(
    processes: concurrent.futures.ProcessPoolExecutor,
) -> None:
    with Loader(range(40), fetch=_pid_and_square, batch_size=8, executor=processes) as loader:
        batches = list(loader)
        stats = {s.name: s for s in loader.stats()}
    assert [b[1].tolist() for b in batches] == [
        [x * x for x in range(i, i + 8)] for i in range(0, 40, 8)
    ]
    pids = {int(p) for b in batches for p in b[0]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert stats["fetch"].items == 40 and stats["collate"].items == 5
    assert stats["fetch"].busy_s > 0


def test_executor_errors_carry_the_worker_traceback(
    processes: concurrent.futures.ProcessPoolExecutor,
) -> None:
    got: list[int] = []
    with (
        Loader(range(10), fetch=_fail_on_3_remote, executor=processes) as loader,
        pytest.raises(PipelineError) as info,
    ):
        for x in loader:
            got.append(x)
    assert got == [0, 1, 2]
    assert info.value.stage == "fetch" and info.value.item == "3"
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and "bad item 3 in a worker" in str(cause)
    assert "_fail_on_3_remote" in str(cause.__cause__)  # the worker's traceback text
    with Loader(range(10), fetch=_fail_on_3_remote, executor=processes, on_error="skip") as loader:
        assert list(loader) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert {s.name: s for s in loader.stats()}["fetch"].skipped == 1


@pytest.mark.parametrize("stop_after", [0, 1, 4])
def test_executor_generator_fetch_resumes_inside_an_item(
    processes: concurrent.futures.ProcessPoolExecutor, stop_after: int
) -> None:
    def make() -> Loader:
        return Loader(
            list(range(25)),
            fetch=_clips_remote,
            batch_size=4,
            collate_fn=list,
            threads=3,
            executor=processes,
        )

    everything, state = assert_resumes_exactly(make, stop_after)
    expected = _all_clips(range(25))
    assert everything == [expected[i : i + 4] for i in range(0, len(expected), 4)]
    assert (state["partial"] > 0) == (stop_after in (1, 4))


def test_executor_early_break_leaves_no_threads_and_the_pool_usable(
    processes: concurrent.futures.ProcessPoolExecutor,
) -> None:
    with Loader(range(1000), fetch=_pid_and_square, batch_size=4, executor=processes) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
    assert framefeed_threads() == []
    assert processes.submit(_pid_and_square, 3).result(timeout=10)[1] == 9


def test_a_worker_that_dies_is_a_fetch_error_not_a_hang() -> None:
    with (
        concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool,
        Loader(range(10), fetch=_die_on_5, executor=pool, timeout_s=30) as loader,
        pytest.raises(PipelineError) as info,
    ):
        list(loader)
    assert info.value.stage == "fetch"
    assert isinstance(info.value.__cause__, concurrent.futures.process.BrokenProcessPool)


def test_executor_needs_a_picklable_fetch_and_an_executor() -> None:
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        pytest.raises(ConfigError, match="fetch must be picklable"),
    ):
        Loader(range(3), fetch=lambda x: x, executor=pool)
    with pytest.raises(
        ConfigError, match=re.escape("executor must be a concurrent.futures.Executor")
    ):
        Loader(range(3), fetch=_pid_and_square, executor="processes")  # type: ignore[arg-type]


def test_a_thread_executor_works_too() -> None:
    with (
        concurrent.futures.ThreadPoolExecutor(2) as pool,
        Loader(range(20), fetch=jitter, batch_size=6, collate_fn=list, executor=pool) as loader,
    ):
        assert list(loader) == [[x * 10 for x in range(i, min(i + 6, 20))] for i in range(0, 20, 6)]


# -- a sequence read in a sampler's order ----------------------------------------------------------


class _Squares(torch.utils.data.Dataset[dict[str, Any]]):
    """A torch map-style dataset: ``__getitem__`` runs in the fetch threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        return {"i": torch.tensor(i), "sq": torch.tensor(i * i)}


def test_a_sequence_with_a_sampler_is_read_in_the_samplers_order() -> None:
    words = [f"w{i}" for i in range(23)]
    order = list(ShardedShuffleSampler(23, seed=5))
    with Loader(
        words,
        sampler=ShardedShuffleSampler(23, seed=5),
        fetch=str.upper,
        batch_size=4,
        collate_fn=list,
        threads=3,
    ) as loader:
        got = list(loader)
    expected = [words[i].upper() for i in order]
    assert got == [expected[i : i + 4] for i in range(0, 23, 4)]


def test_a_torch_dataset_with_a_sampler_and_batch_size_collates_in_fetch_threads() -> None:
    ds = _Squares(10)
    with Loader(ds, sampler=ShardedShuffleSampler(10, seed=1), batch_size=3) as loader:
        batches = list(loader)
    order = list(ShardedShuffleSampler(10, seed=1))
    assert [b["i"].tolist() for b in batches] == [order[i : i + 3] for i in range(0, 10, 3)]
    assert all(torch.equal(b["sq"], b["i"] ** 2) for b in batches)
    assert ds.threads and all(name.startswith("framefeed-fetch-") for name in ds.threads)


def test_a_sequence_with_a_batch_sampler_gives_one_output_per_index_list() -> None:
    lengths = [5, 3, 7]
    sampler = framefeed.SequenceSampler(lengths, batch_size=2, seed=0)
    with Loader(_Squares(sum(lengths)), sampler=sampler, threads=2) as loader:
        got = [b["i"].tolist() for b in loader]
    assert got == [list(map(int, idx)) for idx in framefeed.SequenceSampler(lengths, batch_size=2)]


@pytest.mark.parametrize("stop_after", [0, 2, 5])
def test_a_sequence_with_a_sampler_resumes_exactly(stop_after: int) -> None:
    def make() -> Loader:
        return Loader(
            list(range(100, 130)),
            sampler=ShardedShuffleSampler(30, seed=8),
            batch_size=4,
            collate_fn=list,
            threads={"fetch": 3, "collate": 2},
        )

    _, state = assert_resumes_exactly(make, stop_after)
    assert state["source"] is not None or stop_after == 0
