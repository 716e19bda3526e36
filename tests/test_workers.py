"""DataLoader workers (fork and spawn) and DistributedSampler serve exactly the same samples."""

from __future__ import annotations

import gc
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CAMERAS, FPS, TOP, assert_same_batches, copy_dataset, rewrite_episodes
from torch.utils.data import DataLoader, DistributedSampler

import framefeed
from framefeed import FrameTimestampError, MapDataset
from framefeed.storage import Storage
from framefeed.synth import read_marker
from framefeed.video.engine import FrameRequest, VideoEngine

pytestmark = pytest.mark.timeout(120)

# Seconds a DataLoader waits for one batch. Forked workers start at once; spawned workers import
# torch first, which is slow on a loaded machine. A hang fails with an error, never stalls CI.
FORK_BATCH_TIMEOUT = 20
SPAWN_BATCH_TIMEOUT = 100
CHILD_TIMEOUT = 10  # seconds for a forked child that does a few milliseconds of work

DELTAS = {TOP: [-1 / FPS, 0.0], "action": [0.0, 1 / FPS, 2 / FPS]}


def _loader(ds: MapDataset, workers: int, context: str | None = None, **kw: Any) -> DataLoader[Any]:
    extra: dict[str, Any] = {}
    if workers:
        extra = {
            "multiprocessing_context": context,
            "persistent_workers": False,
            "timeout": FORK_BATCH_TIMEOUT if context == "fork" else SPAWN_BATCH_TIMEOUT,
        }
    return DataLoader(
        ds,
        batch_size=kw.pop("batch_size", 8),
        shuffle=False,
        num_workers=workers,
        collate_fn=framefeed.collate,
        **extra,
        **kw,
    )


def _batches(loader: DataLoader[Any]) -> list[dict[str, Any]]:
    return list(loader)


@pytest.fixture(scope="module")
def reference(rollover_root: Path) -> list[dict[str, Any]]:
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as ds:
        return _batches(_loader(ds, 0))


def test_reference_is_complete(reference: list[dict[str, Any]], rollover_root: Path) -> None:
    total = framefeed.open_dataset(rollover_root).num_frames
    assert torch.cat([b["index"] for b in reference]).tolist() == list(range(total))


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.timeout(240))])
def test_workers_match_single_process(
    context: str, rollover_root: Path, reference: list[dict[str, Any]]
) -> None:
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as ds:
        got = _batches(_loader(ds, 2, context))
    assert_same_batches(got, reference)


def test_fork_after_use_in_parent(rollover_root: Path, reference: list[dict[str, Any]]) -> None:
    """Decoders, threads and cached columns created in the parent do not break forked workers."""
    with MapDataset(rollover_root, delta_timestamps=DELTAS, decode_threads=2) as ds:
        warm = ds.__getitems__(list(range(0, len(ds), 7)))  # every file, thread pool started
        assert len(warm) > 0
        got = _batches(_loader(ds, 2, "fork"))
        again = ds.__getitems__(list(range(0, len(ds), 7)))  # the parent still works after
    assert_same_batches(got, reference)
    for a, b in zip(warm, again, strict=True):
        for cam in CAMERAS:
            assert torch.equal(a[cam], b[cam])


_HELD: list[Any] = []


def _drop_inherited(conn: Any) -> None:
    _HELD.clear()  # the last references to objects created by the parent
    gc.collect()
    conn.send("released")


def _reuse_inherited(conn: Any, path: str, times: np.ndarray) -> None:
    engine = _HELD[0]
    out = np.zeros((len(times), 3, 48, 64), dtype=np.uint8)
    engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
    conn.send([read_marker(x) for x in out])


def _run_child(target: Any, *args: Any) -> tuple[Any, int | None]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    proc.join(CHILD_TIMEOUT)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    message = parent.recv() if not hung and parent.poll() else None
    return ("hung" if hung else message), proc.exitcode


def test_engine_used_before_fork_works_in_the_child(plain_root: Path) -> None:
    meta = framefeed.open_dataset(plain_root)
    path = str(meta.video_paths[TOP][1])
    times = float(meta.video_from[TOP][1]) + np.arange(4) / FPS
    # Only _HELD refers to the engine, so that a child clearing it really releases it.
    _HELD.append(VideoEngine(Storage(plain_root), threads=2))
    out = np.zeros((4, 3, 48, 64), dtype=np.uint8)
    _HELD[0].decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
    try:
        reused, code_reuse = _run_child(_reuse_inherited, path, times)
        released, code_release = _run_child(_drop_inherited)
    finally:
        _HELD.pop().close()
    episode = int(meta.segment_ids[1])
    assert reused == [(episode, f) for f in range(4)]
    assert code_reuse == 0
    assert released == "released", "a forked child hangs releasing the parent's video engine"
    assert code_release == 0


def test_distributed_sampler_covers_everything_disjointly(rollover_root: Path) -> None:
    meta = framefeed.open_dataset(rollover_root)
    lengths = meta.lengths.tolist()
    # An even number of samples, so that DistributedSampler needs no padding duplicates.
    episodes = list(meta.segment_ids.tolist())
    if sum(lengths) % 2:
        odd = next(i for i, n in enumerate(lengths) if n % 2)
        episodes.pop(odd)
    with MapDataset(rollover_root, episodes=episodes, fields=[framefeed.Field("index")]) as ds:
        n = len(ds)
        assert n % 2 == 0
        seen: list[list[int]] = []
        for rank in range(2):
            sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
            sampler.set_epoch(1)
            loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=framefeed.collate)
            seen.append(torch.cat([b["index"] for b in loader]).tolist())
        full = framefeed.collate(ds.__getitems__(list(range(n))))["index"].tolist()
    assert len(seen[0]) == len(seen[1]) == n // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(full)


def test_worker_errors_reach_the_parent(tmp_path: Path, rollover_root: Path) -> None:
    root = copy_dataset(rollover_root, tmp_path / "ds")
    meta = framefeed.open_dataset(root)
    episode = int(meta.segment_ids[-1])

    def shift(cols: dict[str, list[Any]]) -> None:
        row = cols["episode_index"].index(episode)
        cols[f"videos/{TOP}/from_timestamp"][row] += 0.5 / FPS

    rewrite_episodes(root, shift)
    with MapDataset(root) as ds, pytest.raises(FrameTimestampError) as err:
        for _ in _loader(ds, 2, "fork"):
            pass
    assert f"episode {episode}" in str(err.value)


def test_worker_threads_default_to_one(rollover_root: Path) -> None:
    with MapDataset(rollover_root, fields=[framefeed.Field(TOP)]) as ds:
        loader = DataLoader(
            ds,
            batch_size=4,
            num_workers=2,
            multiprocessing_context="fork",
            persistent_workers=False,
            timeout=FORK_BATCH_TIMEOUT,
            collate_fn=_engine_threads,
        )
        threads = {t for batch in loader for t in batch}
    assert threads == {1}


def _engine_threads(samples: list[dict[str, Any]]) -> list[int]:
    info = torch.utils.data.get_worker_info()
    assert info is not None
    ds = info.dataset
    assert isinstance(ds, MapDataset)
    return [ds.engine.threads] * len(samples)


def test_samples_are_independent_of_batching(rollover_root: Path) -> None:
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as ds:
        a = _batches(_loader(ds, 0, batch_size=5))
        b = _batches(_loader(ds, 0, batch_size=13))
    for key in a[0]:
        if isinstance(a[0][key], torch.Tensor):
            x = torch.cat([batch[key] for batch in a])
            y = torch.cat([batch[key] for batch in b])
            assert torch.equal(x, y), key
    assert np.array_equal(torch.cat([batch["index"] for batch in a]).numpy(), np.arange(len(ds)))
