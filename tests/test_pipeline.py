"""`Loader`: order, concurrency, errors, timeouts, shutdown, statistics and exact resume."""

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

import framefeed
import framefeed.synth
from framefeed.errors import ConfigError, FramefeedError
from framefeed.loader.pipeline import Loader, PipelineError
from framefeed.sampling.samplers import ShardedShuffleSampler

pytestmark = pytest.mark.timeout(60)


_STAGE_THREADS = ("framefeed-source", "framefeed-fetch-", "framefeed-collate", "framefeed-transfer")


def _framefeed_threads(prefixes: tuple[str, ...] = _STAGE_THREADS) -> list[str]:
    """Live threads of loaders (by default), or of anything framefeed starts (``("framefeed-",)``).

    A `MapDataset` owns decoder threads (``framefeed-decode_*``) until it is closed; the module's
    dataset fixture checks those after closing it.
    """
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while _framefeed_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _framefeed_threads() == []


def _jitter(x: int) -> int:
    time.sleep(random.Random(x).uniform(0, 0.01))
    return x * 10


def test_input_order_is_preserved_when_fetch_times_vary() -> None:
    with Loader(range(40), fetch=_jitter, threads=4, buffer_size=3) as loader:
        assert list(loader) == [x * 10 for x in range(40)]


def test_completion_order_yields_everything() -> None:
    with Loader(range(40), fetch=_jitter, threads=4, order="completion") as loader:
        assert sorted(loader) == [x * 10 for x in range(40)]


def test_results_equal_a_plain_loop_and_loader_iterates_again() -> None:
    items = [[i, i + 1] for i in range(0, 20, 2)]

    def fetch(item: list[int]) -> torch.Tensor:
        return torch.tensor(item) * 2

    expected = [fetch(i) for i in items]
    with Loader(items, fetch=fetch, threads=3) as loader:
        for _ in range(2):  # a second epoch starts from the beginning
            got = list(loader)
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_fetches_run_concurrently() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def fetch(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return x

    with Loader(range(16), fetch=fetch, threads=4) as loader:
        assert list(loader) == list(range(16))
    assert peak > 1


def test_async_fetch() -> None:
    async def fetch(x: int) -> int:
        return x + 1

    with Loader(range(10), fetch=fetch, threads=2) as loader:
        assert list(loader) == list(range(1, 11))


def test_batch_size_collates_samples() -> None:
    def fetch(i: int) -> dict[str, Any]:
        return {"x": torch.tensor([i, i], dtype=torch.uint8), "name": f"s{i}"}

    with Loader(range(7), fetch=fetch, batch_size=3, threads=2) as loader:
        batches = list(loader)
    assert [b["name"] for b in batches] == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"]]
    assert batches[0]["x"].dtype == torch.uint8
    assert batches[1]["x"].tolist() == [[3, 3], [4, 4], [5, 5]]
    with Loader(range(7), fetch=fetch, batch_size=3, drop_last=True) as loader:
        assert len(list(loader)) == 2


def _fail_on_5(x: int) -> int:
    if x == 5:
        raise ValueError("bad item five")
    return x


def test_error_names_stage_and_item_and_chains_cause() -> None:
    got: list[int] = []
    with (
        Loader(range(10), fetch=_fail_on_5, threads=3) as loader,
        pytest.raises(PipelineError) as info,
    ):
        for x in loader:
            got.append(x)
    assert got == [0, 1, 2, 3, 4]  # in input order, the items before the failing one arrive
    assert isinstance(info.value, FramefeedError)
    assert "'fetch'" in str(info.value) and "5" in str(info.value)
    assert info.value.stage == "fetch" and info.value.item == "5"
    assert isinstance(info.value.__cause__, ValueError)
    assert "bad item five" in str(info.value.__cause__)
    assert loader.stats()[1].errors == 1


def test_source_error_is_reported() -> None:
    def source() -> Iterator[int]:
        yield 0
        raise RuntimeError("source broke")

    with Loader(source(), threads=2) as loader, pytest.raises(PipelineError) as info:
        list(loader)
    assert info.value.stage == "source"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_long_item_repr_is_truncated() -> None:
    def fail(item: list[int]) -> None:
        raise KeyError("nope")

    with Loader([list(range(1000))], fetch=fail) as loader, pytest.raises(PipelineError) as info:
        list(loader)
    assert info.value.item is not None and len(info.value.item) <= 80
    assert info.value.item.endswith("...")


def test_skip_policy_counts_and_skips() -> None:
    def fetch(x: int) -> int:
        if x % 4 == 0:
            raise ValueError(x)
        return x

    with Loader(range(20), fetch=fetch, threads=3, on_error="skip") as loader:
        assert list(loader) == [x for x in range(20) if x % 4]
        stats = {s.name: s for s in loader.stats()}
    assert stats["fetch"].errors == 5 and stats["fetch"].skipped == 5
    assert stats["fetch"].items == 15
    assert "skipped" in loader.stats_table()


def test_timeout_names_the_waiting_stage() -> None:
    release = threading.Event()

    def fetch(x: int) -> int:
        if x == 2:
            release.wait(5.0)
        return x

    got: list[int] = []
    with Loader(range(5), fetch=fetch, threads=2, timeout_s=0.25) as loader:
        with pytest.raises(PipelineError, match="timeout") as info:
            for x in loader:
                got.append(x)
        assert _framefeed_threads()  # the stuck fetch thread is not waited for by the raise
        release.set()
    assert _framefeed_threads() == []  # close() waited for it
    assert got == [0, 1]
    assert info.value.stage == "fetch"
    assert "framefeed-fetch" in str(info.value)


def test_fetch_threads_pull_the_source_at_most_threads_plus_buffer_ahead() -> None:
    pulled: list[int] = []
    seen: list[int] = []

    def source() -> Iterator[int]:
        for i in range(50):
            pulled.append(i)
            yield i

    def fetch(x: int) -> int:
        if x == 0:  # the reordering waits for item 0: the source must stop after 2 + 3 items
            time.sleep(0.5)
            seen.append(len(pulled))
        return x

    with Loader(source(), fetch=fetch, threads=2, buffer_size=3) as loader:
        assert list(loader) == list(range(50))
    assert seen == [5]


def test_a_batch_does_not_wait_for_later_items_after_a_skipped_failure() -> None:
    second_batch = threading.Event()

    def fetch(x: int) -> int:
        if x == 1:
            raise ValueError(x)
        if x == 10:  # arrives only once the batch [5, 6, 7, 8] was handed out
            assert second_batch.wait(5.0)
        return x

    got: list[list[int]] = []
    with Loader(range(16), fetch=fetch, batch_size=4, on_error="skip", timeout_s=2.0) as loader:
        for batch in loader:
            got.append(batch.tolist())
            if len(got) == 2:
                second_batch.set()
    assert got == [[0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15]]


def test_early_break_leaves_no_threads() -> None:
    loader = Loader(range(1000), fetch=_jitter, threads=4)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    assert _framefeed_threads() == []  # the generator was closed when the loop ended
    loader.close()


def test_close_is_idempotent_and_stops_iteration() -> None:
    loader = Loader(range(1000), fetch=_jitter, threads=2)
    it = iter(loader)
    assert next(it) == 0
    assert _framefeed_threads()
    loader.close()
    assert _framefeed_threads() == []
    loader.close()
    with pytest.raises(PipelineError, match="closed"):
        next(it)
    with pytest.raises(PipelineError, match="closed"):
        iter(loader)


def test_stats_count_items_and_table_names_stages() -> None:
    with Loader(range(12), fetch=_jitter, batch_size=4, threads=2) as loader:
        assert len(list(loader)) == 3
        stats = {s.name: s for s in loader.stats()}
        table = loader.stats_table()
    assert list(stats) == ["source", "fetch", "collate", "transfer", "sink"]
    assert stats["source"].items == 12
    assert stats["fetch"].items == 12 and stats["fetch"].threads == 2
    assert stats["collate"].items == 3
    assert stats["transfer"].items == 3 and stats["sink"].items == 3
    assert stats["fetch"].busy_s > 0 and stats["fetch"].mean_s > 0
    assert stats["fetch"].queue_max >= 0 and stats["fetch"].errors == 0
    for name in stats:
        assert name in table


@pytest.mark.parametrize("stop_after", [0, 1, 6, 10])
def test_state_dict_resumes_exactly_over_a_list(stop_after: int) -> None:
    items = list(range(10))
    loader = Loader(items, fetch=_jitter, threads=3, buffer_size=2)
    first: list[int] = []
    state: dict[str, Any] = loader.state_dict()
    for x in loader:
        if len(first) == stop_after:
            break
        first.append(x)
        state = loader.state_dict()
    loader.close()
    assert state["delivered"] == stop_after
    state = json.loads(json.dumps(state))
    resumed = Loader(items, fetch=_jitter, threads=3, buffer_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + rest == [x * 10 for x in items]
    assert resumed.state_dict()["delivered"] == len(items)
    assert list(resumed) == [x * 10 for x in items]  # the next epoch is whole again
    resumed.close()


def test_state_dict_resumes_with_batches_and_skips() -> None:
    def fetch(x: int) -> int:
        if x == 3:
            raise ValueError(x)
        return x

    def make() -> Loader:
        return Loader(list(range(11)), fetch=fetch, batch_size=2, on_error="skip")

    with make() as loader:
        everything = [b.tolist() for b in loader]
    with make() as loader:
        it = iter(loader)
        first = [next(it).tolist() for _ in range(2)]
        state = loader.state_dict()
    with make() as resumed:
        resumed.load_state_dict(state)
        assert first + [b.tolist() for b in resumed] == everything


def test_state_dict_needs_input_order() -> None:
    with Loader(range(3), order="completion") as loader, pytest.raises(ConfigError):
        loader.state_dict()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        Loader(range(3), threads=0)
    with pytest.raises(ConfigError):
        Loader(range(3), order="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sampler needs a source with __getitem__ and __len__"):
        Loader(iter(range(3)), sampler=[[0]])


def test_collate_fn_replaces_the_default_collate() -> None:
    seen: list[list[int]] = []

    def summarise(samples: list[int]) -> tuple[int, int]:
        seen.append(list(samples))
        return len(samples), sum(samples)

    with Loader(range(7), fetch=_jitter, batch_size=3, collate_fn=summarise) as loader:
        assert list(loader) == [(3, 30), (3, 120), (1, 60)]
        stats = {s.name: s for s in loader.stats()}
    assert seen == [[0, 10, 20], [30, 40, 50], [60]]
    assert stats["collate"].items == 3


def test_collate_fn_errors_name_the_collate_stage() -> None:
    def broken(samples: list[int]) -> None:
        raise TypeError("cannot collate")

    with (
        Loader(range(4), batch_size=2, collate_fn=broken) as loader,
        pytest.raises(PipelineError) as info,
    ):
        list(loader)
    assert info.value.stage == "collate" and isinstance(info.value.__cause__, TypeError)
    with Loader(range(4), batch_size=2, collate_fn=broken, on_error="skip") as loader:
        assert list(loader) == []
        assert loader.stats()[2].skipped == 2


def test_collate_fn_needs_something_to_collate() -> None:
    with pytest.raises(ConfigError, match="collate_fn"):
        Loader(range(3), collate_fn=list)
    with pytest.raises(ConfigError, match="collate_fn"):
        Loader(range(3), batch_size=2, collate_fn=3)  # type: ignore[arg-type]


class _EpochSource:
    """A source whose items depend on the epoch, recording ``set_epoch`` calls."""

    def __init__(self) -> None:
        self.epoch = 0
        self.calls: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * 10, self.epoch * 10 + 3))


def test_set_epoch_reaches_the_source() -> None:
    source = _EpochSource()
    with Loader(source, threads=2) as loader:
        assert list(loader) == [0, 1, 2]
        loader.set_epoch(4)
        assert list(loader) == [40, 41, 42]
    assert source.calls == [4]
    with Loader(range(3)) as plain:
        plain.set_epoch(1)  # nothing to pass it to: the order is the same
        assert list(plain) == [0, 1, 2]


def test_transfer_is_a_noop_on_cpu() -> None:
    def fetch(i: int) -> dict[str, Any]:
        return {"img": torch.full((3, 4, 4), i, dtype=torch.uint8), "meta": [torch.tensor(i)]}

    with Loader(range(4), fetch=fetch, batch_size=2, device="cpu", pin_memory=True) as loader:
        batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert b["img"].dtype == torch.uint8 and b["img"].device.type == "cpu"
    assert batches[1]["img"][1].unique().tolist() == [3]


def _frames_and_more(i: int) -> dict[str, Any]:
    return {
        "img": torch.full((2, 3, 4, 4), 51 * (i % 6), dtype=torch.uint8),  # (T, C, H, W)
        "code": torch.full((3,), i, dtype=torch.uint8),  # uint8, but not frames once batched
        "state": torch.full((2,), float(i)),
    }


@pytest.mark.parametrize("device", ["cpu", None])
def test_frames_dtype_scales_uint8_frames_after_the_move(device: str | None) -> None:
    with Loader(
        range(6), fetch=_frames_and_more, batch_size=3, device=device, frames_dtype=torch.float16
    ) as loader:
        batches = list(loader)
    assert len(batches) == 2
    for k, b in enumerate(batches):
        assert b["img"].dtype == torch.float16 and b["img"].shape == (3, 2, 3, 4, 4)
        expected = torch.tensor([51 * i / 255 for i in range(3 * k, 3 * k + 3)])
        assert torch.allclose(b["img"].float().amax(dim=(1, 2, 3, 4)), expected, atol=1e-3)
        assert torch.allclose(b["img"].float().amin(dim=(1, 2, 3, 4)), expected, atol=1e-3)
        assert b["code"].dtype == torch.uint8  # (B, 3): not a batch of frames
        assert b["code"][:, 0].tolist() == [3 * k, 3 * k + 1, 3 * k + 2]
        assert b["state"].dtype == torch.float32


def test_frames_dtype_is_off_by_default_and_checked() -> None:
    with Loader(range(2), fetch=_frames_and_more, batch_size=2, device="cpu") as loader:
        assert next(iter(loader))["img"].dtype == torch.uint8
    with pytest.raises(ConfigError, match="frames_dtype must be a floating torch dtype"):
        Loader(range(2), fetch=_frames_and_more, frames_dtype=torch.int32)
    with pytest.raises(ConfigError, match="frames_dtype"):
        Loader(range(2), fetch=_frames_and_more, frames_dtype="float32")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cuda_device_without_cuda_warns_and_stays_on_cpu() -> None:
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        loader = Loader(range(2), fetch=lambda i: torch.zeros(2, dtype=torch.uint8), device="cuda")
    with loader:
        assert all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in loader)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_transfer() -> None:
    def fetch(i: int) -> dict[str, Any]:
        return {"img": torch.full((3, 8, 8), i, dtype=torch.uint8)}

    with Loader(range(8), fetch=fetch, batch_size=4, device="cuda", pin_memory=True) as loader:
        batches = list(loader)
    for k, b in enumerate(batches):
        assert b["img"].is_cuda and b["img"].dtype == torch.uint8
        expected = torch.arange(4 * k, 4 * k + 4, dtype=torch.uint8).view(4, 1, 1, 1)
        assert torch.equal(b["img"].cpu(), expected.expand(4, 3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_frames_dtype_converts_on_the_device() -> None:
    with Loader(
        range(6),
        fetch=_frames_and_more,
        batch_size=3,
        device="cuda",
        pin_memory=True,
        frames_dtype=torch.float32,
    ) as loader:
        batches = list(loader)
    for k, b in enumerate(batches):
        assert b["img"].is_cuda and b["img"].dtype == torch.float32
        assert b["code"].is_cuda and b["code"].dtype == torch.uint8
        expected = torch.tensor([51 * i / 255 for i in range(3 * k, 3 * k + 3)])
        assert torch.allclose(b["img"].amax(dim=(1, 2, 3, 4)).cpu(), expected)


# -- with a real MapDataset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[framefeed.MapDataset]:
    root = tmp_path_factory.mktemp("pipeline") / "ds"
    framefeed.synth.write_lerobot_dataset(
        root,
        framefeed.synth.SynthConfig(num_episodes=3, min_length=8, max_length=10),
        progress=False,
    )
    with framefeed.MapDataset(Path(root)) as ds:
        yield ds
    assert _framefeed_threads(("framefeed-",)) == []


def _assert_same_batch(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_map_dataset_batches_match_get_batch(dataset: framefeed.MapDataset) -> None:
    n = len(dataset)
    chunks = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    with Loader(dataset, batch_size=4, threads=2) as loader:
        batches = list(loader)
    assert len(batches) == len(chunks)
    for got, idx in zip(batches, chunks, strict=True):
        _assert_same_batch(got, dataset.get_batch(idx))
    images = [v for v in batches[0].values() if isinstance(v, torch.Tensor) and v.ndim == 4]
    assert images and all(v.dtype == torch.uint8 for v in images)


def test_map_dataset_with_a_sampler_resumes_exactly(dataset: framefeed.MapDataset) -> None:
    def make_sampler() -> ShardedShuffleSampler:
        return ShardedShuffleSampler(len(dataset), seed=7)

    order = list(make_sampler())
    index_lists = [order[i : i + 3] for i in range(0, len(order), 3)]
    with Loader(dataset, sampler=make_sampler(), batch_size=3, threads=2) as loader:
        batches = list(loader)
    assert len(batches) == len(index_lists)
    for got, idx in zip(batches, index_lists, strict=True):
        _assert_same_batch(got, dataset.get_batch(idx))

    with Loader(dataset, sampler=make_sampler(), batch_size=3, buffer_size=2) as loader:
        it = iter(loader)
        next(it)
        next(it)
        state = json.loads(json.dumps(loader.state_dict()))
    assert state["delivered"] == 2 and state["source"]["yielded"] == 6
    with Loader(dataset, sampler=make_sampler(), batch_size=3) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    assert len(rest) == len(index_lists) - 2
    for got, idx in zip(rest, index_lists[2:], strict=True):
        _assert_same_batch(got, dataset.get_batch(idx))


def test_map_dataset_with_a_sampler_of_index_lists(dataset: framefeed.MapDataset) -> None:
    index_lists = [[5, 1, 2], [0], [7, 7, 3, 4]]
    with Loader(dataset, sampler=index_lists, threads=3) as loader:
        for got, idx in zip(loader, index_lists, strict=True):
            _assert_same_batch(got, dataset.get_batch(idx))


def test_map_dataset_needs_batch_size_or_sampler(dataset: framefeed.MapDataset) -> None:
    with pytest.raises(ConfigError):
        Loader(dataset)


def test_set_epoch_reaches_the_sampler(dataset: framefeed.MapDataset) -> None:
    sampler = ShardedShuffleSampler(len(dataset), seed=3)
    reference = ShardedShuffleSampler(len(dataset), seed=3)
    with Loader(dataset, sampler=sampler, batch_size=4, threads=2) as loader:
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            reference.set_epoch(epoch)
            order = list(reference)
            batches = list(loader)
            for got, start in zip(batches, range(0, len(order), 4), strict=True):
                _assert_same_batch(got, dataset.get_batch(order[start : start + 4]))
            epochs.append(torch.cat([b["index"] for b in batches]).tolist())
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(dataset)))
    assert epochs[0] != epochs[1]


def test_collate_fn_with_a_dataset_gets_its_samples(dataset: framefeed.MapDataset) -> None:
    sampler = ShardedShuffleSampler(len(dataset), seed=5)
    order = list(ShardedShuffleSampler(len(dataset), seed=5))
    calls: list[int] = []

    def stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
        calls.append(len(samples))
        return torch.utils.data.default_collate(samples)  # type: ignore[no-any-return]

    with Loader(dataset, sampler=sampler, batch_size=5, collate_fn=stack) as loader:
        it = iter(loader)
        first = next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        rest = list(it)
    assert calls[0] == 5 and sum(calls) == len(dataset)
    for got, start in zip([first, *rest], range(0, len(order), 5), strict=True):
        _assert_same_batch(got, dataset.get_batch(order[start : start + 5]))
    sampler2 = ShardedShuffleSampler(len(dataset), seed=5)
    with Loader(dataset, sampler=sampler2, batch_size=5, collate_fn=stack) as resumed:
        resumed.load_state_dict(state)
        again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(again, rest, strict=True):
        _assert_same_batch(a, b)


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="device must be a torch device"):
        Loader(range(3), device="nope")


def test_collate_of_samples_with_different_keys() -> None:
    with pytest.raises(ConfigError, match="sample 1 has no key 'a'"):
        framefeed.collate([{"a": 1}, {"b": 2}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": "2"}, "threads must be an int, got str '2'"),
        ({"buffer_size": 2.5}, "buffer_size must be an int"),
        ({"batch_size": 3.0}, "batch_size must be an int or None"),
        ({"drop_last": True}, "drop_last=True needs batch_size"),
        ({"pin_memory": "yes"}, "pin_memory must be True, False or None, got 'yes'"),
    ],
)
def test_loader_argument_types_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Loader(range(4), **kwargs)


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
        range(100), fetch=_jitter, batch_size=4, collate_fn=collate_fn, threads=threads
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
        fetch=_jitter,
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


def _stop_after(loader: Loader, n: int) -> tuple[list[Any], dict[str, Any]]:
    """The first ``n`` outputs of a fresh iteration and the checkpoint taken after them."""
    first: list[Any] = []
    state = loader.state_dict()
    for out in loader:
        if len(first) == n:
            break
        first.append(out)
        state = loader.state_dict()
    return first, state


@pytest.mark.parametrize("stop_after", [0, 3, 9])
def test_state_dict_resumes_exactly_with_collate_threads(stop_after: int) -> None:
    def make() -> Loader:
        return Loader(
            list(range(37)),
            fetch=_jitter,
            batch_size=4,
            collate_fn=_slow_sum_collate,
            threads={"fetch": 3, "collate": 2},
        )

    with make() as loader:
        everything = list(loader)
    with make() as loader:
        first, state = _stop_after(loader, stop_after)
    with make() as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert first + list(resumed) == everything


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

    with make() as loader:
        everything = list(loader)
        assert sorted(v for b in everything for v in b) == sorted(_all_clips(range(25)))
    with make() as loader:
        first, state = _stop_after(loader, stop_after)
    # seed 4's order puts the ends of batches 1 and 4 inside an item
    assert (state["partial"] > 0) == (stop_after in ((1, 4) if sampled else (1, 4, 7)))
    with make() as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert first + list(resumed) == everything
        assert list(resumed) == everything  # the next epoch is whole again


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
            _assert_same_batch(a, b)
        it = iter(loader)
        first = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))
        it.close()
    assert state["delivered"] == 3 and state["source"]["epoch"] == 1
    for a, b in zip(first, direct[:3], strict=True):
        _assert_same_batch(a, b)
    with make() as ds, Loader(ds, threads=2) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    assert len(rest) == len(direct) - 3
    for a, b in zip(rest, direct[3:], strict=True):
        _assert_same_batch(a, b)


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

    with make() as loader:
        everything = list(loader)
    expected = _all_clips(range(25))
    assert everything == [expected[i : i + 4] for i in range(0, len(expected), 4)]
    with make() as loader:
        first, state = _stop_after(loader, stop_after)
    assert (state["partial"] > 0) == (stop_after in (1, 4))
    with make() as resumed:
        resumed.load_state_dict(state)
        assert first + list(resumed) == everything


def test_executor_early_break_leaves_no_threads_and_the_pool_usable(
    processes: concurrent.futures.ProcessPoolExecutor,
) -> None:
    with Loader(range(1000), fetch=_pid_and_square, batch_size=4, executor=processes) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
    assert _framefeed_threads() == []
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
        Loader(range(20), fetch=_jitter, batch_size=6, collate_fn=list, executor=pool) as loader,
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

    with make() as loader:
        everything = list(loader)
    with make() as loader:
        first, state = _stop_after(loader, stop_after)
    assert state["source"] is not None or stop_after == 0
    with make() as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert first + list(resumed) == everything
