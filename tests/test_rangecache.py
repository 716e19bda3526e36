"""The local range cache: exact bytes, exact gap fetches, a bound, LRU eviction, and safety
when several processes (fork and spawn) share one folder."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import pickle
import random
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framefeed.errors import ConfigError, StorageError
from framefeed.rangecache import _HEADER, CacheConfig, RangeCache, _decode, _Index, _token

pytestmark = pytest.mark.timeout(120)

CHILD_TIMEOUT = {"fork": 60, "spawn": 100}  # spawned children import torch (via framefeed)


def _source(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Remote:
    """An in-memory remote object store whose fetch functions record every call."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, int, int]] = []

    def fetch(self, key: str) -> Callable[[int, int], bytes]:
        def get(a: int, b: int) -> bytes:
            self.calls.append((key, a, b))
            return self.objects[key][a:b]

        return get

    def ranges(self) -> list[tuple[int, int]]:
        out = [(a, b) for _, a, b in self.calls]
        self.calls.clear()
        return out


def _failing(a: int, b: int) -> bytes:
    raise AssertionError(f"unexpected fetch({a}, {b})")


def _intervals(cache: RangeCache, key: str) -> list[tuple[int, int]]:
    """The valid intervals that the sidecar of ``key`` publishes."""
    name = hashlib.sha256(key.encode()).hexdigest()[:40]
    root = Path(cache.config.directory)
    fd = os.open(root / f"{name}.data", os.O_RDONLY)
    try:
        index = _decode((root / f"{name}.idx").read_bytes(), _token(fd), cache._boot)
    finally:
        os.close(fd)
    assert index is not None
    return index.intervals


def _on_disk_total(cache: RangeCache) -> int:
    """The valid cached bytes of all objects, counted from the sidecars."""
    return cache._scan(cache._handle())[1]


@pytest.fixture
def remote() -> Remote:
    return Remote({"s3://b/a.mp4": _source(1, 10_000), "s3://b/b.mp4": _source(2, 3_000)})


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    with RangeCache(CacheConfig(directory=str(tmp_path / "cache"), max_bytes=1 << 20)) as c:
        yield c


def test_config_and_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_bytes"):
        CacheConfig(directory=str(tmp_path), max_bytes=-1)
    with pytest.raises(ConfigError, match="directory"):
        CacheConfig(directory="")
    with pytest.raises(TypeError):
        CacheConfig(str(tmp_path))  # type: ignore[call-arg]
    (tmp_path / "file").write_bytes(b"not a folder")
    with pytest.raises(StorageError, match="cannot create"):
        RangeCache(CacheConfig(directory=str(tmp_path / "file" / "sub")))
    with RangeCache(CacheConfig(directory=str(tmp_path / "c"))) as cache:
        with pytest.raises(ConfigError, match="bad range"):
            cache.read("k", 10, 5, _failing)
        with pytest.raises(ConfigError, match="bad range"):
            cache.read("k", -1, 5, _failing)
        with pytest.raises(ConfigError, match="key"):
            cache.read("", 0, 5, _failing)
        assert cache.read("k", 7, 7, _failing) == b""


def test_hits_return_identical_bytes_without_fetch(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    assert cache.read(key, 1000, 5000, remote.fetch(key)) == src[1000:5000]
    assert remote.ranges() == [(1000, 5000)]
    for a, b in [(1000, 5000), (1000, 1001), (2500, 4999), (4999, 5000)]:
        assert cache.read(key, a, b, _failing) == src[a:b]
    assert cache.stats() == {
        "hits_bytes": 4000 + 1 + 2499 + 1,
        "fetched_bytes": 4000,
        "evicted_bytes": 0,
        "cached_bytes": 4000,
    }


def test_partial_overlaps_fetch_exactly_the_gaps(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    get = remote.fetch(key)
    cache.read(key, 100, 200, get)
    cache.read(key, 300, 400, get)
    remote.ranges()
    assert cache.read(key, 50, 450, get) == src[50:450]
    assert remote.ranges() == [(50, 100), (200, 300), (400, 450)]
    assert cache.read(key, 150, 350, _failing) == src[150:350]
    assert cache.read(key, 0, 60, get) == src[0:60]  # overlaps the start of [50, 450)
    assert cache.read(key, 440, 500, get) == src[440:500]  # and its end
    assert remote.ranges() == [(0, 50), (450, 500)]
    assert _intervals(cache, key) == [(0, 500)]
    assert cache.stats()["cached_bytes"] == 500


def test_missing_bytes_are_coalesced_and_never_rounded(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    get = remote.fetch(key)
    assert cache.read(key, 0, 10, get) == src[:10]
    assert cache.read(key, 10, 20, get) == src[10:20]  # adjacent: one interval
    assert _intervals(cache, key) == [(0, 20)]
    assert cache.read(key, 5, 1001, get) == src[5:1001]  # one call for all that is missing
    assert remote.ranges() == [(0, 10), (10, 20), (20, 1001)]
    cache.read(key, 2000, 2001, get)
    cache.read(key, 2002, 2003, get)
    assert _intervals(cache, key) == [(0, 1001), (2000, 2001), (2002, 2003)]
    assert cache.read(key, 0, 3000, get) == src[:3000]
    assert remote.ranges()[-3:] == [(1001, 2000), (2001, 2002), (2003, 3000)]
    assert _intervals(cache, key) == [(0, 3000)]
    assert cache.stats()["fetched_bytes"] == 3000


def test_end_of_object_short_reads(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/b.mp4"  # 3000 bytes
    src = remote.objects[key]
    get = remote.fetch(key)
    assert cache.read(key, 2900, 3100, get) == src[2900:]
    assert remote.ranges() == [(2900, 3100)]
    assert cache.read(key, 2950, 4000, _failing) == src[2950:]  # the end is now known
    assert cache.read(key, 3000, 3100, _failing) == b""
    assert cache.read(key, 5000, 6000, _failing) == b""
    assert cache.read(key, 0, 10_000, get) == src
    assert remote.ranges() == [(0, 2900)]
    assert cache.stats()["cached_bytes"] == 3000
    # Past the end with nothing known: one fetch returns nothing, and that is remembered too.
    other = "s3://b/a.mp4"
    assert cache.read(other, 20_000, 20_100, remote.fetch(other)) == b""
    assert cache.read(other, 20_000, 20_100, _failing) == b""


def test_a_range_larger_than_the_bound_is_served_but_not_stored(
    tmp_path: Path, remote: Remote
) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    get = remote.fetch(key)
    with RangeCache(CacheConfig(directory=str(tmp_path / "c"), max_bytes=1000)) as cache:
        assert cache.read(key, 0, 1500, get) == src[:1500]
        assert cache.read(key, 0, 1500, get) == src[:1500]
        assert remote.ranges() == [(0, 1500), (0, 1500)]
        assert cache.stats()["cached_bytes"] == 0
        assert cache.read(key, 0, 500, get) == src[:500]  # fits: stored
        assert cache.read(key, 0, 1500, get) == src[:1500]  # cached part served, rest fetched
        assert remote.ranges() == [(0, 500), (500, 1500)]
        assert cache.stats()["cached_bytes"] == 500
    with RangeCache(CacheConfig(directory=str(tmp_path / "off"), max_bytes=0)) as cache:
        assert cache.read(key, 0, 10, get) == src[:10]
        assert os.listdir(tmp_path / "off") == []


def test_eviction_keeps_the_bound_and_removes_least_recently_used(tmp_path: Path) -> None:
    remote = Remote({k: _source(i, 400) for i, k in enumerate("ABCD")})
    root = tmp_path / "c"
    with RangeCache(CacheConfig(directory=str(root), max_bytes=1000)) as cache:

        def files() -> int:
            return len(list(root.glob("*.data")))

        cache.read("A", 0, 400, remote.fetch("A"))
        cache.read("B", 0, 400, remote.fetch("B"))
        assert cache.read("A", 0, 10, _failing) == remote.objects["A"][:10]  # A is now newer
        cache.read("C", 0, 400, remote.fetch("C"))  # 1200 > 1000: B goes
        assert files() == 2
        assert cache.stats()["cached_bytes"] == _on_disk_total(cache) == 800
        assert cache.stats()["evicted_bytes"] == 400
        assert cache.read("C", 0, 400, _failing) == remote.objects["C"]
        assert cache.read("A", 0, 400, _failing) == remote.objects["A"]  # C is now older
        remote.ranges()
        assert cache.read("B", 0, 400, remote.fetch("B")) == remote.objects["B"]  # C goes
        assert remote.ranges() == [(0, 400)]
        assert cache.read("A", 0, 400, _failing) == remote.objects["A"]
        assert cache.read("B", 0, 400, _failing) == remote.objects["B"]  # A is now older
        cache.read("D", 0, 300, remote.fetch("D"))  # 1100: A goes (least recently used)
        assert cache.read("B", 0, 400, _failing) == remote.objects["B"]
        assert cache.read("D", 0, 300, _failing) == remote.objects["D"][:300]
        assert cache.stats()["cached_bytes"] == _on_disk_total(cache) == 700 <= 1000
        assert files() == 2


def test_eviction_skips_objects_being_read(tmp_path: Path) -> None:
    remote = Remote({k: _source(i, 800) for i, k in enumerate("ABC")})
    root = tmp_path / "c"
    with RangeCache(CacheConfig(directory=str(root), max_bytes=1000)) as cache:
        cache.read("A", 0, 400, remote.fetch("A"))  # A is the least recently used from here on
        inside, release = threading.Event(), threading.Event()
        result: list[bytes] = []

        def slow(a: int, b: int) -> bytes:
            inside.set()
            assert release.wait(30)
            return remote.objects["A"][a:b]

        reader = threading.Thread(target=lambda: result.append(cache.read("A", 0, 800, slow)))
        reader.start()
        try:
            assert inside.wait(30)
            cache.read("B", 0, 400, remote.fetch("B"))
            cache.read("C", 0, 400, remote.fetch("C"))  # 1200: A is busy, so B goes
            assert cache.read("A", 0, 400, _failing) == remote.objects["A"][:400]
            assert cache.read("C", 0, 400, _failing) == remote.objects["C"][:400]
            assert cache.stats()["evicted_bytes"] == 400
        finally:
            release.set()
            reader.join(30)
        assert result == [remote.objects["A"]]
        assert cache.read("A", 0, 800, _failing) == remote.objects["A"]  # stored; C went
        assert cache.stats()["cached_bytes"] == _on_disk_total(cache) == 800


def _killed_mid_fetch(directory: str, inside: Any) -> None:
    def hang(a: int, b: int) -> bytes:
        inside.set()
        signal.pause()
        return b""

    RangeCache(CacheConfig(directory=directory, max_bytes=1000)).read("A", 0, 400, hang)


def test_a_killed_reader_leaves_a_usable_cache(tmp_path: Path) -> None:
    remote = Remote({"A": _source(1, 800), "B": _source(2, 800)})
    directory = str(tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    inside = ctx.Event()
    child = ctx.Process(target=_killed_mid_fetch, args=(directory, inside))
    child.start()
    try:
        assert inside.wait(CHILD_TIMEOUT["fork"])
    finally:
        child.kill()
        child.join(CHILD_TIMEOUT["fork"])
    with RangeCache(CacheConfig(directory=directory, max_bytes=1000)) as cache:
        assert cache.read("A", 0, 400, remote.fetch("A")) == remote.objects["A"][:400]
        assert remote.ranges() == [(0, 400)]
        cache.read("B", 0, 800, remote.fetch("B"))  # its lock died with it: A can be evicted
        assert cache.stats()["cached_bytes"] == _on_disk_total(cache) == 800


def test_a_lost_usage_counter_is_recounted(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    cache.read(key, 0, 700, remote.fetch(key))
    (Path(cache.config.directory) / "usage").write_bytes(b"garbage")
    assert cache.stats()["cached_bytes"] == 0  # unreadable: reported as 0, never trusted
    cache.read(key, 700, 800, remote.fetch(key))
    assert cache.stats()["cached_bytes"] == 800


def test_corrupt_or_stale_sidecars_are_discarded(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    get = remote.fetch(key)
    root = Path(cache.config.directory)
    cache.read(key, 0, 1000, get)
    (idx,) = root.glob("*.idx")
    (data,) = root.glob("*.data")
    good = idx.read_bytes()
    remote.ranges()
    for bad in [b"", good[:-1], good[:30], b"\0" * len(good), good[:-1] + bytes([good[-1] ^ 1])]:
        idx.write_bytes(bad)
        assert cache.read(key, 0, 1000, get) == src[:1000]
        assert remote.ranges() == [(0, 1000)]
    for size in (_HEADER + 500, 0):  # data truncated under a valid sidecar: never zeros
        os.truncate(data, size)
        assert cache.read(key, 0, 1000, get) == src[:1000]
        assert remote.ranges() == [(0, 1000)]
        assert cache.read(key, 0, 1000, _failing) == src[:1000]
    data.unlink()  # data removed by a cleaner, sidecar left: names another inode
    data.write_bytes(bytes(2000))
    assert cache.read(key, 0, 1000, get) == src[:1000]
    assert remote.ranges() == [(0, 1000)]
    assert cache.read(key, 0, 1000, _failing) == src[:1000]
    idx.unlink()  # data without sidecar
    assert cache.read(key, 0, 1000, get) == src[:1000]
    assert remote.ranges() == [(0, 1000)]


def test_a_failing_fetch_propagates_and_keeps_what_was_fetched(
    cache: RangeCache, remote: Remote
) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    cache.read(key, 100, 200, remote.fetch(key))

    def flaky(a: int, b: int) -> bytes:
        if a > 0:
            raise StorageError("boom")
        return src[a:b]

    with pytest.raises(StorageError, match="boom"):
        cache.read(key, 0, 1000, flaky)
    assert _intervals(cache, key) == [(0, 200)]

    with pytest.raises(StorageError, match="more than"):
        cache.read(key, 0, 1000, lambda a, b: bytes(b - a + 1))
    assert _intervals(cache, key) == [(0, 200)]


def test_a_full_disk_serves_uncached(
    cache: RangeCache, remote: Remote, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "s3://b/a.mp4"
    src = remote.objects[key]
    cache.read(key, 0, 10, remote.fetch(key))

    def full(fd: int, buf: Any, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert cache.read(key, 0, 500, remote.fetch(key)) == src[:500]
    monkeypatch.undo()
    assert _intervals(cache, key) == [(0, 10)]
    assert cache.read(key, 0, 500, remote.fetch(key)) == src[:500]
    assert remote.ranges() == [(0, 10), (10, 500), (10, 500)]


def test_keys_never_reach_the_disk(cache: RangeCache) -> None:
    key = "s3://AKIDSECRET:hunter2@bucket/v.mp4?X-Amz-Signature=deadbeef"
    cache.read(key, 0, 100, lambda a, b: bytes(b - a))
    root = Path(cache.config.directory)
    blobs = b"".join(p.name.encode() + p.read_bytes() for p in root.iterdir())
    for secret in (b"AKIDSECRET", b"hunter2", b"deadbeef", b"bucket"):
        assert secret not in blobs


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    cache = RangeCache(CacheConfig(directory=str(tmp_path / "c")))
    with cache:
        pass
    cache.close()
    with pytest.raises(StorageError, match="closed"):
        cache.read("k", 0, 1, _failing)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_dropped_cache_releases_its_folder(tmp_path: Path) -> None:
    """A cache dropped without close (a `Storage` going away) releases its folder descriptor."""
    import gc

    folder = str(tmp_path / "c")

    def open_on_folder() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == folder for fd in fds)

    for _ in range(3):
        cache = RangeCache(CacheConfig(directory=folder))
        assert open_on_folder() == 1
        del cache
        gc.collect()
        assert open_on_folder() == 0
    with RangeCache(CacheConfig(directory=folder)):
        assert open_on_folder() == 1
    assert open_on_folder() == 0


def test_pickles_only_its_config(cache: RangeCache, remote: Remote) -> None:
    key = "s3://b/a.mp4"
    cache.read(key, 0, 100, remote.fetch(key))
    blob = pickle.dumps(cache)
    assert len(blob) < 400
    with pickle.loads(blob) as copy:
        assert copy.config == cache.config
        assert copy.read(key, 0, 100, _failing) == remote.objects[key][:100]
        assert copy.stats()["hits_bytes"] == 100


# ---- several processes ------------------------------------------------------------------------

KEYS = ("s3://b/x.mp4", "s3://b/y.mp4", "s3://b/z.mp4")
SIZE = 48_000


def _objects() -> dict[str, bytes]:
    return {k: _source(100 + i, SIZE - 1000 * i) for i, k in enumerate(KEYS)}


def _child(cache: RangeCache, worker: int, reads: int, out: str) -> None:
    """Random overlapping reads of shared objects; writes "ok" or the failure to ``out``."""
    try:
        remote = Remote(_objects())
        rng = random.Random(worker)
        requested = 0
        for _ in range(reads):
            key = rng.choice(KEYS)
            start = rng.randrange(0, SIZE)
            stop = start + rng.randrange(1, 6000)
            data = cache.read(key, start, stop, remote.fetch(key))
            if data != remote.objects[key][start:stop]:
                raise AssertionError(f"worker {worker}: wrong bytes for {key} {start}..{stop}")
            requested += stop - start
        fetched = sum(b - a for _, a, b in remote.calls)
        if fetched > requested or cache.stats()["fetched_bytes"] > requested:
            raise AssertionError(f"worker {worker}: fetched {fetched} > requested {requested}")
        Path(out).write_text("ok")
    except BaseException:
        Path(out).write_text(traceback.format_exc())
        raise


def _check_consistent(root: Path, max_bytes: int) -> None:
    """Every published interval holds the source bytes; the bound holds at rest."""
    with RangeCache(CacheConfig(directory=str(root), max_bytes=max_bytes)) as cache:
        objects = _objects()
        for key, src in objects.items():
            try:
                intervals = _intervals(cache, key)
            except FileNotFoundError:
                continue  # evicted
            for a, b in intervals:
                assert cache.read(key, a, b, _failing) == src[a:b]
        cache.read("s3://b/fresh", 0, 10, lambda a, b: bytes(b - a))  # runs a due eviction
        assert _on_disk_total(cache) <= cache.stats()["cached_bytes"] <= max_bytes


@pytest.mark.parametrize(
    ("method", "max_bytes"),
    [("fork", 1 << 20), ("fork", 60_000), ("spawn", 60_000)],
    ids=["fork-fits", "fork-evicting", "spawn-evicting"],
)
def test_processes_share_one_cache(tmp_path: Path, method: str, max_bytes: int) -> None:
    fork, spawn = multiprocessing.get_context("fork"), multiprocessing.get_context("spawn")
    ctx = fork if method == "fork" else spawn
    root = tmp_path / "c"
    # Under fork the children inherit this very object (its handles are per process);
    # under spawn it travels pickled.
    cache = RangeCache(CacheConfig(directory=str(root), max_bytes=max_bytes))
    cache.read(KEYS[0], 0, 100, Remote(_objects()).fetch(KEYS[0]))
    outs = [str(tmp_path / f"out{i}") for i in range(4)]
    procs = [ctx.Process(target=_child, args=(cache, i, 150, outs[i])) for i in range(4)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(CHILD_TIMEOUT[method])
        for p, out in zip(procs, outs, strict=True):
            assert not p.is_alive(), "a child hung"
            assert Path(out).read_text() == "ok"
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    cache.close()
    _check_consistent(root, max_bytes)


def _reopen_and_read(directory: str, key: str, size: int, out: str) -> None:
    with RangeCache(CacheConfig(directory=directory)) as cache:
        data = cache.read(key, 0, size, _failing)
        Path(out).write_bytes(data)


def test_a_new_process_sees_earlier_data(cache: RangeCache, remote: Remote, tmp_path: Path) -> None:
    key = "s3://b/b.mp4"
    src = remote.objects[key]
    cache.read(key, 0, len(src), remote.fetch(key))
    out = tmp_path / "seen"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_reopen_and_read, args=(cache.config.directory, key, len(src), out))
    p.start()
    p.join(CHILD_TIMEOUT["fork"])
    assert p.exitcode == 0
    assert out.read_bytes() == src


# ---- property -----------------------------------------------------------------------------

PROP = {"p": _source(7, 1000), "q": _source(8, 700)}
_reads = st.lists(
    st.tuples(st.sampled_from(sorted(PROP)), st.integers(0, 1100), st.integers(0, 400)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads=_reads, max_bytes=st.sampled_from([1 << 30, 1200, 500, 0]))
def test_any_read_sequence_returns_the_source_bytes(
    reads: list[tuple[str, int, int]], max_bytes: int
) -> None:
    remote = Remote(dict(PROP))
    requested = 0
    seen: dict[str, set[int]] = {k: set() for k in PROP}
    with (
        tempfile.TemporaryDirectory() as tmp,
        RangeCache(CacheConfig(directory=tmp, max_bytes=max_bytes)) as cache,
    ):
        for key, start, length in reads:
            stop = start + length
            assert cache.read(key, start, stop, remote.fetch(key)) == PROP[key][start:stop]
            requested += length
            calls = remote.calls[:]
            remote.calls.clear()
            # Within one read: inside the range, in order, disjoint and coalesced.
            assert all(start <= a < b <= stop for _, a, b in calls)
            assert all(x[2] < y[1] for x, y in itertools.pairwise(calls))
            if max_bytes == 1 << 30:  # nothing is evicted: no byte is ever fetched twice
                for _, a, b in calls:
                    got = set(range(a, min(b, len(PROP[key]))))
                    assert not got & seen[key]
                    seen[key] |= got
            assert cache.stats()["cached_bytes"] <= max_bytes
        assert cache.stats()["fetched_bytes"] <= requested
        assert _on_disk_total(cache) <= cache.stats()["cached_bytes"]


@settings(max_examples=200, deadline=None)
@given(
    adds=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), max_size=12),
    query=st.tuples(st.integers(0, 80), st.integers(0, 30)),
    end=st.none() | st.integers(0, 80),
)
def test_interval_index_matches_a_set_model(
    adds: list[tuple[int, int]], query: tuple[int, int], end: int | None
) -> None:
    index = _Index()
    model: set[int] = set()
    for a, n in adds:
        index.add(a, a + n)
        model |= set(range(a, a + n))
    if end is not None:
        index.clip(end)
        model = {x for x in model if x < end}
    flat = [x for iv in index.intervals for x in iv]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)  # disjoint, not touching
    assert {x for a, b in index.intervals for x in range(a, b)} == model
    assert index.total == len(model)
    start, length = query
    pieces, gaps = index.split(start, start + length)
    tiles = sorted(pieces + gaps)
    assert [x for a, b in tiles for x in range(a, b)] == list(range(start, start + length))
    assert all(set(range(a, b)) <= model for a, b in pieces)
    assert all(not set(range(a, b)) & model for a, b in gaps)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(gaps))  # coalesced
