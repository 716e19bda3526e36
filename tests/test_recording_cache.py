"""Recordings through the node-shared column cache: same samples, one build per node, new keys
for rewritten files, and in-memory recordings left alone."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_rerun_config

import framefeed
from framefeed import Field, FixedRateSampling, IndexSpec, MapDataset, Window
from framefeed.align import RecordingStore
from framefeed.catalog import TimelineKind
from framefeed.nodecache import ColumnCache
from framefeed.streams import Stream, from_streams, recording_fingerprint
from framefeed.synth.rerun import (
    ACTION,
    H264,
    H264_KEYFRAME,
    JPEG,
    STATE,
    TASK,
    write_rerun_recordings,
)

pytestmark = pytest.mark.timeout(180)

CONFIG = tiny_rerun_config(num_recordings=2, min_duration_s=1.0, max_duration_s=1.4, seed=5)
SPEC = IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0))
FIELDS = [
    Field(STATE),
    Field(STATE, select="[0]", key="state0", window=Window(seconds=(-0.1, 0.0))),
    Field(ACTION, window=Window(seconds=(0.0, 0.1))),
    Field(JPEG),
    Field(H264),
    Field(TASK),
]
CACHED = [STATE, f"{STATE}#[0]", ACTION, JPEG, H264, H264_KEYFRAME, TASK]
"""Columns the fields read (packet video needs the keyframe flags too)."""


@pytest.fixture(scope="module")
def rrd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("rerun")
    return write_rerun_recordings(tmp_path_factory.mktemp("rrd-cache"), CONFIG)


def _store(m: MapDataset) -> RecordingStore:
    store = m._plan().store
    assert isinstance(store, RecordingStore)
    return store


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            other = got[key]
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype, key
            assert torch.equal(other, value), key
        else:
            assert got[key] == value, key


@pytest.mark.rerun
def test_cached_samples_equal_uncached_and_second_dataset_maps(
    rrd_dir: Path, tmp_path: Path
) -> None:
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    indices = np.arange(0, 40, 3)
    with MapDataset(rrd_dir, index=SPEC, fields=FIELDS) as plain:
        want = plain.get_batch(indices)
        assert _store(plain).cache is None
    with MapDataset(rrd_dir, index=SPEC, fields=FIELDS, column_cache=cache) as first:
        got = first.get_batch(indices)
        store = _store(first)
        assert store.cache_stats == {"built": len(CACHED), "mapped": 0}
        assert all(store.cached(p) is not None for p in CACHED)
        assert store.column(f"{STATE}#[0]").shape == (1,)
    _assert_same(got, want)
    assert len(cache.entries()) == len(CACHED)
    assert {e.key["column"] for e in cache.entries()} == set(CACHED)
    with MapDataset(rrd_dir, index=SPEC, fields=FIELDS, column_cache=cache) as second:
        again = second.get_batch(indices)
        store = _store(second)
        assert store.cache_stats == {"built": 0, "mapped": len(CACHED)}
        mapped = store.cached(STATE)
        assert mapped is not None and mapped.path is not None
        assert not store.get(STATE).flags.writeable  # the file's pages, not a copy
        assert store.column(f"{STATE}#[0]").shape == (1,)  # the derived shape, from the entry
    _assert_same(again, want)


@pytest.mark.rerun
def test_selected_segments_and_timelines_get_their_own_entries(
    rrd_dir: Path, tmp_path: Path
) -> None:
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    fields = [Field(STATE)]
    with MapDataset(rrd_dir, index=SPEC, fields=fields, column_cache=cache) as m:
        m.get_batch([0])
    with MapDataset(rrd_dir, index=SPEC, fields=fields, episodes=[1], column_cache=cache) as m:
        want = m.get_batch([0, 5])
        assert _store(m).cache_stats["built"] == 1
    with MapDataset(
        rrd_dir, index=IndexSpec(timeline="step"), fields=fields, column_cache=cache
    ) as m:
        m.get_batch([0])
        assert _store(m).cache_stats["built"] == 1
    with MapDataset(rrd_dir, index=SPEC, fields=fields, episodes=[1]) as m:
        _assert_same(want, m.get_batch([0, 5]))
    assert len(cache.entries()) == 3


@pytest.mark.rerun
def test_rewritten_recording_gets_a_new_key(rrd_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "rrd"
    root.mkdir()
    for name in os.listdir(rrd_dir):
        (root / name).write_bytes((rrd_dir / name).read_bytes())
    before = recording_fingerprint(framefeed.open_dataset(root))
    assert before is not None and before == recording_fingerprint(framefeed.open_dataset(root))
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    fields = [Field(STATE)]
    with MapDataset(root, index=SPEC, fields=fields, column_cache=cache) as m:
        m.get_batch([0])
    first = sorted(os.listdir(root))[0]
    st = os.stat(root / first)
    os.utime(root / first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert recording_fingerprint(framefeed.open_dataset(root)) != before
    with MapDataset(root, index=SPEC, fields=fields, column_cache=cache) as m:
        m.get_batch([0])
        assert _store(m).cache_stats == {"built": 1, "mapped": 0}
    assert len({e.key["dataset"] for e in cache.entries()}) == 2


def test_memory_recording_is_not_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(20, dtype=np.int64) * 10_000_000
    segments = [
        {"/x": Stream(values=rng.standard_normal((20, 3)).astype(np.float32), index={"t": t})}
        for _ in range(2)
    ]
    ds = from_streams(segments, timelines={"t": TimelineKind.TIME})
    assert recording_fingerprint(ds) is None
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    spec = IndexSpec(timeline="t", sampling=FixedRateSampling(50.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: not cacheable is not a problem
        with MapDataset(ds, index=spec, fields=[Field("/x")], column_cache=cache) as cached:
            got = cached.get_batch(np.arange(10))
            store = _store(cached)
            assert store.cache is None and store.cached("/x") is None
            assert store.cache_stats == {"built": 0, "mapped": 0}
    with MapDataset(ds, index=spec, fields=[Field("/x")]) as plain:
        _assert_same(got, plain.get_batch(np.arange(10)))
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
