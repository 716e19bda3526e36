"""`Loader`: order, concurrency, errors, timeouts, shutdown, statistics and exact resume."""

from __future__ import annotations

import json
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
    framefeed_threads,
    jitter,
    no_leaked_threads,  # noqa: F401
)

import framefeed
import framefeed.synth
from framefeed.errors import ConfigError, FramefeedError
from framefeed.loader.pipeline import Loader, PipelineError
from framefeed.sampling.samplers import ShardedShuffleSampler

pytestmark = pytest.mark.timeout(60)


def test_input_order_is_preserved_when_fetch_times_vary() -> None:
    with Loader(range(40), fetch=jitter, threads=4, buffer_size=3) as loader:
        assert list(loader) == [x * 10 for x in range(40)]


def test_completion_order_yields_everything() -> None:
    with Loader(range(40), fetch=jitter, threads=4, order="completion") as loader:
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


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_source_error_is_raised_also_when_skipping(batch_size: int | None) -> None:
    """Skipping it would end the epoch early without a word: the source cannot go on."""

    def source() -> Iterator[int]:
        yield from range(5)
        raise RuntimeError("listing broke")

    got: list[Any] = []
    with (
        Loader(source(), batch_size=batch_size, on_error="skip", threads=2) as loader,
        pytest.raises(PipelineError) as info,
    ):
        for out in loader:
            got.append(out)
    assert info.value.stage == "source" and "listing broke" in str(info.value)
    if batch_size is None:
        assert got == [0, 1, 2, 3, 4]
    else:  # the whole batches before it; item 4's batch ends with the error
        assert [b.tolist() for b in got] == [[0, 1], [2, 3]]


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
        assert framefeed_threads()  # the stuck fetch thread is not waited for by the raise
        release.set()
    assert framefeed_threads() == []  # close() waited for it
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
    loader = Loader(range(1000), fetch=jitter, threads=4)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    assert framefeed_threads() == []  # the generator was closed when the loop ended
    loader.close()


def test_close_is_idempotent_and_stops_iteration() -> None:
    loader = Loader(range(1000), fetch=jitter, threads=2)
    it = iter(loader)
    assert next(it) == 0
    assert framefeed_threads()
    loader.close()
    assert framefeed_threads() == []
    loader.close()
    with pytest.raises(PipelineError, match="closed"):
        next(it)
    with pytest.raises(PipelineError, match="closed"):
        iter(loader)


def test_stats_count_items_and_table_names_stages() -> None:
    with Loader(range(12), fetch=jitter, batch_size=4, threads=2) as loader:
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
    loader = Loader(items, fetch=jitter, threads=3, buffer_size=2)
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
    resumed = Loader(items, fetch=jitter, threads=3, buffer_size=2)
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

    with Loader(range(7), fetch=jitter, batch_size=3, collate_fn=summarise) as loader:
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
    assert framefeed_threads(("framefeed-",)) == []


def test_map_dataset_batches_match_get_batch(dataset: framefeed.MapDataset) -> None:
    n = len(dataset)
    chunks = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    with Loader(dataset, batch_size=4, threads=2) as loader:
        batches = list(loader)
    assert len(batches) == len(chunks)
    for got, idx in zip(batches, chunks, strict=True):
        assert_batch_equal(got, dataset.get_batch(idx))
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
        assert_batch_equal(got, dataset.get_batch(idx))

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
        assert_batch_equal(got, dataset.get_batch(idx))


def test_map_dataset_with_a_sampler_of_index_lists(dataset: framefeed.MapDataset) -> None:
    index_lists = [[5, 1, 2], [0], [7, 7, 3, 4]]
    with Loader(dataset, sampler=index_lists, threads=3) as loader:
        for got, idx in zip(loader, index_lists, strict=True):
            assert_batch_equal(got, dataset.get_batch(idx))


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
                assert_batch_equal(got, dataset.get_batch(order[start : start + 4]))
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
        assert_batch_equal(got, dataset.get_batch(order[start : start + 5]))
    sampler2 = ShardedShuffleSampler(len(dataset), seed=5)
    with Loader(dataset, sampler=sampler2, batch_size=5, collate_fn=stack) as resumed:
        resumed.load_state_dict(state)
        again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(again, rest, strict=True):
        assert_batch_equal(a, b)


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
