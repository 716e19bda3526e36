"""The node-shared column cache: one writer under races, reuse, eviction, corruption, values."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pickle
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import IMAGE, copy_dataset, data_files

import framefeed
from framefeed import ConfigError, MapDataset
from framefeed.nodecache import ColumnCache, _locked, default_directory, entry_name, load_many

pytestmark = pytest.mark.timeout(120)

KEY = {"dataset": "d0", "column": "x"}


def _arrays(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "values": rng.standard_normal((257, 5)).astype(np.float32),
        "flags": rng.random(257) > 0.5,
        "text": pa.array(["a", None, "ccc"] * 3),
    }


class _Counter:
    """A ``build`` that counts its calls."""

    def __init__(self, seed: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.seed = seed

    def __call__(self, names: list[str]) -> dict[str, dict[str, Any]]:
        self.calls.append(list(names))
        return {n: _arrays(self.seed) for n in names}


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        else:
            assert got[name].equals(value), name


def _only_file(directory: Path) -> Path:
    files = list(directory.glob("*.ffc"))
    assert len(files) == 1, files
    return files[0]


def test_built_once_then_mapped_read_only(tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    build = _Counter()
    first = load_many(cache, {"c": KEY}, build)["c"]
    second = load_many(cache, {"c": KEY}, build)["c"]
    assert build.calls == [["c"]]
    _assert_same(first.arrays, _arrays())
    _assert_same(second.arrays, _arrays())
    values = second.arrays["values"]
    assert not values.flags.writeable and not values.flags.owndata  # a view of the mapping
    assert first.inode == second.inode == _only_file(tmp_path).stat().st_ino


def test_different_keys_are_different_entries(tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    build = _Counter()
    load_many(cache, {"a": KEY, "b": {**KEY, "column": "y"}}, build)
    assert build.calls == [["a", "b"]]  # one pass builds both
    assert len(list(tmp_path.glob("*.ffc"))) == 2


def _race(directory: str, barrier: Any, log: str, out: str) -> None:
    def build(names: list[str]) -> dict[str, dict[str, Any]]:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # hold the lock long enough for the others to queue on it
        return {n: _arrays() for n in names}

    barrier.wait(timeout=30)
    got = load_many(ColumnCache(directory=directory), {"c": KEY}, build)["c"]
    ok = all(
        np.array_equal(got.arrays[n], v) if isinstance(v, np.ndarray) else got.arrays[n].equals(v)
        for n, v in _arrays().items()
    )
    with open(out, "wb") as fh:
        pickle.dump({"ok": ok, "inode": got.inode, "creator": got.header["creator"]["pid"]}, fh)


def test_racing_processes_make_one_valid_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier = ctx.Barrier(n)
    log = tmp_path / "builds.log"
    cache_dir = tmp_path / "cache"
    procs = [
        ctx.Process(target=_race, args=(str(cache_dir), barrier, str(log), str(tmp_path / f"{i}")))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    builders = log.read_text().split()
    results = [pickle.loads((tmp_path / f"{i}").read_bytes()) for i in range(n)]
    assert len(builders) == 1  # one writer; the others waited and mapped its file
    assert all(r["ok"] for r in results)
    assert {r["inode"] for r in results} == {_only_file(cache_dir).stat().st_ino}
    assert {r["creator"] for r in results} == {int(builders[0])}
    assert sorted(os.listdir(cache_dir)) == sorted([_only_file(cache_dir).name, entry_lock(KEY)])


def entry_lock(key: dict[str, Any]) -> str:
    return entry_name({**key, "format": 1}).replace(".ffc", ".lock")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "foreign"])
def test_damaged_file_is_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    load_many(cache, {"c": KEY}, _Counter())
    path = _only_file(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        path.write_bytes(raw[:20] + b"\xff" * 8 + raw[28:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file of another key under this name
        other = tmp_path / "other"
        load_many(ColumnCache(directory=str(other)), {"c": {**KEY, "column": "z"}}, _Counter())
        path.write_bytes(_only_file(other).read_bytes())
    build = _Counter()
    with pytest.warns(UserWarning, match="rebuilding"):
        got = load_many(cache, {"c": KEY}, build)["c"]
    assert build.calls == [["c"]]
    _assert_same(got.arrays, _arrays())
    again = _Counter()
    load_many(cache, {"c": KEY}, again)
    assert again.calls == []


def test_checksums_catch_flipped_data_bytes(tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path), verify=True)
    load_many(cache, {"c": KEY}, _Counter())
    path = _only_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 200] ^= 0xFF  # inside the array bytes: the structure is intact
    path.write_bytes(bytes(raw))
    build = _Counter()
    with pytest.warns(UserWarning, match="checksum"):
        got = load_many(cache, {"c": KEY}, build)["c"]
    assert build.calls == [["c"]]
    _assert_same(got.arrays, _arrays())


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_eviction_removes_least_recently_used_idle_entries(tmp_path: Path) -> None:
    big = ColumnCache(directory=str(tmp_path))
    keys = [{**KEY, "column": c} for c in "abcd"]
    for i, key in enumerate(keys[:3]):
        load_many(big, {"c": key}, _Counter())
        _age(tmp_path / entry_name({**key, "format": 1}), 300 - 100 * i)  # a oldest, c newest
    size = (tmp_path / entry_name({**keys[0], "format": 1})).stat().st_size
    # Room for two entries: adding d must evict a and b (the oldest), keep c and d.
    small = ColumnCache(directory=str(tmp_path), max_bytes=2 * size + size // 2)
    load_many(small, {"c": keys[3]}, _Counter())
    left = {e.key["column"] for e in small.entries()}
    assert left == {"c", "d"}
    assert sum(e.nbytes for e in small.entries()) <= small.max_bytes


def test_entries_in_use_or_being_built_are_never_removed(tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    held = load_many(cache, {"c": KEY}, _Counter())["c"]  # mapped: in use
    other = {**KEY, "column": "y"}
    load_many(cache, {"c": other}, _Counter())
    # A builder of a third entry: its lock is held and its temporary file exists.
    building = entry_name({**KEY, "column": "w", "format": 1})[: -len(".ffc")]
    lock = open(tmp_path / f"{building}.lock", "a+b")  # noqa: SIM115
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    tmp = tmp_path / f"{building}.tmp-1-abc"
    tmp.write_bytes(b"partial")
    stale = tmp_path / f"{entry_name(other)[:-4]}.tmp-2-def"  # no builder holds its lock
    stale.write_bytes(b"left by a crash")
    try:
        freed = cache.clear()
    finally:
        lock.close()
    assert [e.key["column"] for e in cache.entries()] == ["x"]  # the mapped one stays
    assert freed > 0
    assert tmp.exists() and not stale.exists()
    del held
    cache.clear()
    assert cache.entries() == []


def test_closed_entry_is_released_when_its_arrays_are(tmp_path: Path) -> None:
    import gc

    cache = ColumnCache(directory=str(tmp_path))
    for build in (_Counter(), _Counter()):  # written by this process, then mapped from the file
        mapped = load_many(cache, {"c": KEY}, build)["c"]
        values = mapped.arrays["values"]
        mapped.close()
        mapped.close()
        assert mapped.inode is None and mapped.arrays == {}
        cache.clear()
        assert len(cache.entries()) == 1  # an array of it is still in use: kept
        assert np.array_equal(values, _arrays()["values"])
        del values
        gc.collect()
        cache.clear()
        assert cache.entries() == []  # closed and unused: removed
    mapped = load_many(cache, {"c": KEY}, _Counter())["c"]
    mapped.close()  # no array handed out: released at once
    cache.clear()
    assert cache.entries() == []


def test_dropped_entries_close_their_files(tmp_path: Path) -> None:
    """An entry whose store goes away without closing it closes its file (no ResourceWarning,
    no descriptor left)."""
    import gc

    cache = ColumnCache(directory=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for build in (_Counter(), _Counter()):  # the writer's file, then a reader's
            mapped = load_many(cache, {"c": KEY}, build)
            del mapped
            gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    assert cache.clear() > 0  # no shared lock left behind either


def test_unusable_folder_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    build = _Counter()
    with pytest.warns(UserWarning, match="not usable"):
        got = load_many(ColumnCache(directory=str(blocker / "cache")), {"c": KEY}, build)
    assert build.calls == [["c"]]
    _assert_same(got["c"].arrays, _arrays())


def test_source_errors_pass_through_unchanged(tmp_path: Path) -> None:
    def fail(names: list[str]) -> dict[str, dict[str, Any]]:
        raise framefeed.StorageError("data/chunk-000/file-000.parquet: file not found")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cache not usable" warning for a source error
        with pytest.raises(framefeed.StorageError, match="file not found"):
            load_many(ColumnCache(directory=str(tmp_path)), {"c": KEY}, fail)
    assert list(tmp_path.glob("*.ffc")) == []


def test_default_folder_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FRAMEFEED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == str(tmp_path / "xdg" / "framefeed" / "columns")
    monkeypatch.setenv("FRAMEFEED_CACHE_DIR", str(tmp_path / "ff"))
    assert ColumnCache().path == str(tmp_path / "ff" / "columns")
    assert ColumnCache(directory=str(tmp_path / "own")).path == str(tmp_path / "own")


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        ColumnCache(max_bytes=-1)
    with pytest.raises(ConfigError):
        ColumnCache.resolve("yes")  # type: ignore[arg-type]
    assert ColumnCache.resolve(False) is None and ColumnCache.resolve(None) is None
    assert ColumnCache.resolve(True) == ColumnCache()


# -- through the datasets ------------------------------------------------------------------------


def _all(ds: MapDataset) -> dict[str, Any]:
    return ds.get_batch(list(range(len(ds))))


def test_cached_dataset_serves_the_same_values(plain_root: Path, tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    deltas = {"action": [-1 / 30, 0.0, 1 / 30]}
    with MapDataset(plain_root, delta_timestamps=deltas) as plain:
        want = _all(plain)
    with MapDataset(plain_root, delta_timestamps=deltas, column_cache=cache) as first:
        got = _all(first)
        store = first._plan().store
        assert store.cache_stats["built"] > 0 and store.cache_stats["mapped"] == 0
        action = store.get("action")
        assert not action.flags.owndata  # served from the mapping
    with MapDataset(plain_root, delta_timestamps=deltas, column_cache=cache) as second:
        again = _all(second)
        assert second._plan().store.cache_stats["built"] == 0  # a later run reuses the files
    assert list(want) == list(got) == list(again)
    for key, value in want.items():
        for other in (got, again):
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), key
            else:
                assert value == other[key], key
    kinds = {e.key["kind"] for e in cache.entries()}
    assert kinds == {"numeric", "image"}  # image bytes (and text) are shared too
    assert IMAGE in {e.key["column"] for e in cache.entries()}


def test_changed_data_files_get_new_entries(plain_root: Path, tmp_path: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds")
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    fields = [framefeed.Field("action")]
    with MapDataset(root, fields=fields, column_cache=cache) as ds:
        _all(ds)
    assert len(cache.entries()) == 1
    _age(data_files(root)[0], 10)  # rewritten data: another mtime
    with MapDataset(root, fields=fields, column_cache=cache) as ds:
        _all(ds)
        assert ds._plan().store.cache_stats["built"] == 1
    assert len(cache.entries()) == 2
    with MapDataset(root, fields=fields, episodes=[0, 1], column_cache=cache) as ds:
        _all(ds)  # another selection of segments: another entry
    assert len(cache.entries()) == 3


def _try_lock_after(path: str, released: Any, conn: Any) -> None:
    released.wait(30)
    fh = open(path, "a+b")  # noqa: SIM115
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        conn.send("locked")
    except BlockingIOError:
        conn.send("still held")
    finally:
        fh.close()


def test_a_child_forked_during_a_build_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A build lock held by another thread at fork time is released when the parent releases."""
    ctx = multiprocessing.get_context("fork")
    name = entry_name({**KEY, "format": 1})
    lock_path = tmp_path / name.replace(".ffc", ".lock")
    holding, release, released = threading.Event(), threading.Event(), ctx.Event()

    def build_in_thread() -> None:
        with _locked(str(tmp_path), [name]):
            holding.set()
            release.wait(30)
        released.set()

    thread = threading.Thread(target=build_in_thread)
    thread.start()
    assert holding.wait(30)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_try_lock_after, args=(str(lock_path), released, child))
    proc.start()  # forked while the lock is held
    release.set()
    thread.join()
    proc.join(30)
    assert parent.recv() == "locked"


def test_cache_folder_that_is_missing_or_a_file(tmp_path: Path) -> None:
    missing = ColumnCache(directory=str(tmp_path / "never-made"))
    assert missing.entries() == []
    assert missing.clear() == 0
    assert missing.evict() == 0
    assert not (tmp_path / "never-made").exists()  # clearing creates nothing
    (tmp_path / "a-file").write_text("")
    as_file = ColumnCache(directory=str(tmp_path / "a-file"))
    for call in (as_file.entries, as_file.clear, as_file.evict):
        with pytest.raises(framefeed.StorageError, match="not a folder"):
            call()
