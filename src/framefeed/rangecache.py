"""A bounded local disk cache of byte ranges of remote objects, shared by worker processes.

`RangeCache.read` serves ``[start, stop)`` of a remote object from local disk where it can and
calls the caller's ``fetch(a, b)`` for exactly the missing intervals, so that a second epoch on
one node does not download again what still fits under `CacheConfig.max_bytes`.

Layout of `CacheConfig.directory` (flat; only these names are ever created or removed):

- ``<h>.data``: a sparse file holding the object's bytes at their own offsets plus one page
  (``os.pwrite``), where ``h`` is a SHA-256 prefix of the key (the key is never written to
  disk); the first page holds a random token that identifies this very file;
- ``<h>.idx``: its sidecar: the sorted, coalesced valid intervals, the known end of the object,
  the data file's token and the boot id, with a CRC. A sidecar that is truncated, corrupt, or
  names another token (its data file was deleted and made again) reads as empty;
- ``usage``: the running total of cached payload bytes (a counter, and the lock that guards it);
- ``evict.lock``: held by the one process that evicts at a time.

Locks (``flock``, taken in this order only, so no cycle can form):

1. ``<h>.data`` shared, by every reader for its whole read, fetches included; an evictor takes it
   exclusive and non-blocking, skips busy objects, and unlinks sidecar then data while holding
   it. A reader that locked a file an evictor has just unlinked sees that the path now names
   another inode (or none) and opens it again.
2. ``<h>.idx`` shared to read the intervals, exclusive to publish new ones. Data is written
   before its interval is published, so a published interval always has its bytes.
3. ``usage`` exclusive, briefly, to add a delta. A publisher adds before it writes the sidecar,
   so a crash leaves an over-count (evicts early), never an under-count (would break the bound).

Each eviction rescans the sidecars and corrects the counter, then removes whole objects, least
recently used first (last use = sidecar mtime, set on every hit), until the total is at most
15/16 of the bound; the slack keeps a full cache from rescanning on every miss.

Nothing is fsynced. Sidecars record the boot id and are trusted only within the boot that wrote
them, so that bytes lost in a power failure are never served. The cache assumes remote objects
do not change under a key: callers should put a version (size, ETag, mtime) into the key.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import os
import re
import struct
import threading
import time
import uuid
import warnings
import weakref
import zlib
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .errors import ConfigError, StorageError

__all__ = ["CacheConfig", "RangeCache"]

Interval = tuple[int, int]

_IDX_HEAD = struct.Struct("<8sQq16sI")  # magic, data token, known end (-1: unknown), boot, count
_IDX_MAGIC = b"FFRCIDX1"
_CRC = struct.Struct("<I")
_TOKEN = struct.Struct("<8sQ")  # at offset 0 of a data file: magic, random nonzero token
_DATA_MAGIC = b"FFRCDAT1"
_HEADER = 4096  # object offset x lives at data file offset _HEADER + x (page aligned)
_USAGE = struct.Struct("<8sqI")  # magic, payload bytes, crc of the first two
_USAGE_MAGIC = b"FFRCUSE1"
_NAME = re.compile(r"([0-9a-f]{40})\.(?:data|idx)")
_USAGE_FILE = "usage"
_EVICT_FILE = "evict.lock"
_OPEN_TRIES = 1000


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Where the range cache lives and how large it may grow."""

    directory: str
    """Local folder of the cache (created if missing); share it between processes of one node."""
    max_bytes: int = 2 << 30
    """Bound on the cached payload bytes of all objects together (exceeded only transiently,
    by ranges being stored while an eviction runs). A single range larger than this is
    returned but not stored; 0 disables storing."""

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str) or not self.directory:
            raise ConfigError(
                f"CacheConfig.directory must be a non-empty path, not {self.directory!r}"
            )
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int):
            raise ConfigError(f"CacheConfig.max_bytes must be an int, not {self.max_bytes!r}")
        if self.max_bytes < 0:
            raise ConfigError(f"CacheConfig.max_bytes must be >= 0, got {self.max_bytes}")


def _u64(values: Any = ()) -> array[int]:
    return array("Q", values)


@dataclass
class _Index:
    """The valid intervals of one data file (sorted, disjoint, not touching: starts[i] <
    stops[i] < starts[i + 1]) and the known end of the object (-1: unknown)."""

    starts: array[int] = field(default_factory=_u64)
    stops: array[int] = field(default_factory=_u64)
    end: int = -1

    @property
    def intervals(self) -> list[Interval]:
        return list(zip(self.starts, self.stops, strict=True))

    @property
    def total(self) -> int:
        return sum(self.stops) - sum(self.starts)

    def split(self, start: int, stop: int) -> tuple[list[Interval], list[Interval]]:
        """The cached pieces and the missing gaps that together tile ``[start, stop)``."""
        pieces: list[Interval] = []
        gaps: list[Interval] = []
        pos = start
        for i in range(max(0, bisect.bisect_right(self.starts, start) - 1), len(self.starts)):
            a, b = self.starts[i], self.stops[i]
            if a >= stop:
                break
            if b <= pos:
                continue
            if a > pos:
                gaps.append((pos, a))
            lo, pos = max(a, pos), min(b, stop)
            pieces.append((lo, pos))
        if pos < stop:
            gaps.append((pos, stop))
        return pieces, gaps

    def add(self, a: int, b: int) -> None:
        """Add ``[a, b)``, coalescing it with the intervals it overlaps or touches."""
        i = bisect.bisect_left(self.stops, a)  # first interval that ends at or after a
        j = bisect.bisect_right(self.starts, b)  # past the last one that starts at or before b
        if i < j:
            a, b = min(a, self.starts[i]), max(b, self.stops[j - 1])
        self.starts[i:j] = _u64((a,))
        self.stops[i:j] = _u64((b,))

    def clip(self, end: int) -> None:
        """Forget everything at or past ``end`` and remember ``end`` as the object's end."""
        self.end = end if self.end < 0 else min(self.end, end)
        k = bisect.bisect_left(self.starts, self.end)
        del self.starts[k:], self.stops[k:]
        if k:
            self.stops[k - 1] = min(self.stops[k - 1], self.end)


def _encode(index: _Index, token: int, boot: bytes) -> bytes:
    body = _IDX_HEAD.pack(_IDX_MAGIC, token, index.end, boot, len(index.starts))
    body += index.starts.tobytes() + index.stops.tobytes()  # native order: the cache is local
    return body + _CRC.pack(zlib.crc32(body))


def _decode(buf: bytes, token: int, boot: bytes) -> _Index | None:
    """The index in ``buf``; None if it is truncated, corrupt (CRC), or belongs to another data
    file (its token differs: the data file was replaced) or to another boot (its bytes may not
    have reached the disk). Only `_encode` writes sidecars, so a CRC-valid one is well formed."""
    if len(buf) < _IDX_HEAD.size:
        return None
    magic, idx_token, end, idx_boot, count = _IDX_HEAD.unpack_from(buf)
    size = _IDX_HEAD.size + 16 * count
    if magic != _IDX_MAGIC or len(buf) < size + _CRC.size:
        return None
    if _CRC.unpack_from(buf, size)[0] != zlib.crc32(memoryview(buf)[:size]):
        return None
    if token == 0 or idx_token != token or idx_boot != boot or end < -1:
        return None
    index = _Index(_u64(), _u64(), end)
    mid = _IDX_HEAD.size + 8 * count
    index.starts.frombytes(buf[_IDX_HEAD.size : mid])
    index.stops.frombytes(buf[mid:size])
    return index


def _close_fd(fd: int, pid: int) -> None:
    if os.getpid() == pid:
        os.close(fd)


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return uuid.UUID(fh.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)  # no boot id on this OS: sidecars are trusted across reboots


def _read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _token(data_fd: int) -> int:
    """The identity of a data file, written once into its header (0: none yet). Inode numbers
    are no identity: a file deleted by a cleaner and created again often gets the same one."""
    buf = os.pread(data_fd, _TOKEN.size, 0)
    if len(buf) == _TOKEN.size:
        magic, token = _TOKEN.unpack(buf)
        if magic == _DATA_MAGIC:
            return int(token)
    return 0


def _unlink(name: str, dir_fd: int) -> None:
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _open_locked(name: str, dir_fd: int, flags: int, lock: int) -> int | None:
    """A descriptor of ``name`` under ``flock(lock)`` that is still the file at ``name`` (an
    evictor may unlink it between our open and our lock); None if there is no such file and
    ``flags`` does not create one. A non-blocking lock that is busy raises `BlockingIOError`."""
    for _ in range(_OPEN_TRIES):
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, lock)
            mine = os.fstat(fd)
            now = os.stat(name, dir_fd=dir_fd)
            if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StorageError(f"range cache: {name} keeps being replaced; is another program using it?")


class _Object:
    """One cached object in use: its data file under a shared lock and its sidecar."""

    def __init__(self, data_fd: int, idx_fd: int | None, boot: bytes) -> None:
        self.data_fd = data_fd
        self.idx_fd = idx_fd
        self.boot = boot

    def _load_unlocked(self) -> _Index:
        if self.idx_fd is None:
            return _Index()
        return _decode(_read_all(self.idx_fd), _token(self.data_fd), self.boot) or _Index()

    def load(self) -> _Index:
        if self.idx_fd is None:
            return _Index()
        fcntl.flock(self.idx_fd, fcntl.LOCK_SH)
        try:
            return self._load_unlocked()
        finally:
            fcntl.flock(self.idx_fd, fcntl.LOCK_UN)

    def touch(self) -> None:
        """Mark the object used now (the sidecar's mtime orders eviction)."""
        if self.idx_fd is not None:
            now = time.time_ns()
            os.utime(self.idx_fd, ns=(now, now))

    def publish(
        self, added: list[Interval], end: int | None, reset: bool, account: Callable[[int], int]
    ) -> int:
        """Add ``added`` (already written) and a newly learned end to the sidecar; the counter
        that ``account`` returns after adding the change in payload bytes."""
        if self.idx_fd is None:
            raise StorageError("range cache: publishing to an object opened without a sidecar")
        fcntl.flock(self.idx_fd, fcntl.LOCK_EX)
        try:
            prev = self._load_unlocked()
            index = _Index() if reset else _Index(_u64(prev.starts), _u64(prev.stops), prev.end)
            for a, b in added:
                index.add(a, b)
            if end is not None:
                index.clip(end)
            counter = account(index.total - prev.total)  # before the sidecar: see module doc
            token = _token(self.data_fd)
            if token == 0:  # a new data file: written only here, under the exclusive lock
                token = int.from_bytes(os.urandom(8), "little") | 1
                os.pwrite(self.data_fd, _TOKEN.pack(_DATA_MAGIC, token), 0)
            buf = _encode(index, token, self.boot)
            os.pwrite(self.idx_fd, buf, 0)
            os.ftruncate(self.idx_fd, len(buf))
            self.touch()
            return counter
        finally:
            fcntl.flock(self.idx_fd, fcntl.LOCK_UN)


class RangeCache:
    """Bytes of remote objects cached in a bounded local folder, safe to share by processes.

    Thread-safe and fork-safe; it pickles only its config, and each process opens its own
    handles on first use. ``close()`` (or leaving a ``with`` block) releases them.
    """

    def __init__(self, config: CacheConfig) -> None:
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"RangeCache needs a CacheConfig, not {type(config).__name__}")
        self.config = config
        self._start()
        self._handle()  # fail here, at the boundary, if the folder cannot be used

    def _start(self) -> None:
        self._root = os.path.abspath(os.path.expanduser(self.config.directory))
        self._closed = False
        self._pid = -1  # the process that opened _dir_fd
        self._dir_fd = -1
        self._boot = b""
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._counts = {"hits_bytes": 0, "fetched_bytes": 0, "evicted_bytes": 0}

    def __repr__(self) -> str:
        return f"RangeCache(directory={self._root!r}, max_bytes={self.config.max_bytes})"

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self._start()  # handles open lazily, in the process that uses them

    def __enter__(self) -> RangeCache:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release this process's handles; idempotent. Reads afterwards raise `StorageError`."""
        self._closed = True
        if self._dir_fd >= 0 and self._pid == os.getpid():
            self._release()
        self._dir_fd = -1

    def _handle(self) -> int:
        """This process's descriptor of the cache folder (opened on first use per process)."""
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        pid = os.getpid()
        if self._pid == pid:
            return self._dir_fd
        if self._lock_pid != pid:  # inherited through fork: the parent's lock may be held
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            if self._pid != pid:  # first use in this process: never use the parent's handles
                try:
                    os.makedirs(self._root, exist_ok=True)
                    dir_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
                except OSError as exc:
                    raise StorageError(
                        f"range cache folder {self._root}: cannot create or open it ({exc}); "
                        "choose a writable local folder in CacheConfig.directory"
                    ) from exc
                self._counts = dict.fromkeys(self._counts, 0)
                self._boot = _boot_id()
                self._dir_fd, self._pid = dir_fd, pid
                # A cache dropped without `close` (its `Storage` has no close) still releases
                # the descriptor, in this process only.
                self._release = weakref.finalize(self, _close_fd, dir_fd, pid)
        return self._dir_fd

    def stats(self) -> dict[str, int]:
        """This process's ``hits_bytes``, ``fetched_bytes`` and ``evicted_bytes``, and the
        ``cached_bytes`` of all processes together (approximate: never below the truth)."""
        dir_fd = self._handle()
        with self._lock:
            out = dict(self._counts)
        out["cached_bytes"] = max(0, self._add_usage(dir_fd, 0, write=False)[0])
        return out

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def read(self, key: str, start: int, stop: int, fetch: Callable[[int, int], bytes]) -> bytes:
        """Bytes ``[start, stop)`` of the remote object ``key`` (fewer only at its end).

        Cached bytes are served from disk; ``fetch(a, b)`` is called, in order, for exactly the
        missing intervals (coalesced, never rounded), and what it returns is stored. A fetch
        that returns fewer bytes than asked marks the end of the object. ``key`` names the
        object (a redacted URL, ideally with a version); only its hash is written to disk.
        """
        if not isinstance(key, str) or not key:
            raise ConfigError(f"RangeCache.read: key must be a non-empty string, not {key!r}")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
            raise ConfigError(f"RangeCache.read({key!r}): bad range {start!r}..{stop!r}")
        dir_fd = self._handle()
        if start == stop:
            return b""
        name = hashlib.sha256(key.encode()).hexdigest()[:40]
        store = stop - start <= self.config.max_bytes
        with self._use(dir_fd, name, create=store) as obj:
            data, counter = self._read_object(dir_fd, obj, start, stop, fetch, store)
        if counter is not None and (counter < 0 or counter > self.config.max_bytes):
            try:
                self._evict(dir_fd, force=counter < 0)
            except OSError as exc:
                self._warn("evict", exc)
        return data

    @contextmanager
    def _use(self, dir_fd: int, name: str, create: bool) -> Iterator[_Object | None]:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            data_fd = _open_locked(f"{name}.data", dir_fd, flags, fcntl.LOCK_SH)
        except OSError as exc:  # a cache that cannot be used must not fail the read
            self._warn("open", exc)
            data_fd = None
        if data_fd is None:
            yield None
            return
        idx_fd: int | None = None
        try:
            try:
                idx_fd = os.open(f"{name}.idx", flags, 0o644, dir_fd=dir_fd)
            except FileNotFoundError:  # not creating, and there is no sidecar
                pass
            except OSError as exc:
                self._warn("open", exc)
            yield _Object(data_fd, idx_fd, self._boot)
        finally:
            if idx_fd is not None:
                os.close(idx_fd)
            os.close(data_fd)  # releases the shared lock

    def _read_object(
        self,
        dir_fd: int,
        obj: _Object | None,
        start: int,
        stop: int,
        fetch: Callable[[int, int], bytes],
        store: bool,
    ) -> tuple[bytes, int | None]:
        """The bytes, and the usage counter after storing (None: nothing stored; -1: the
        counter was unreadable and needs a recount)."""
        index = obj.load() if obj is not None else _Index()
        end = stop if index.end < 0 else min(stop, index.end)
        pieces, gaps = index.split(start, end) if start < end else ([], [])
        parts: list[tuple[int, bytes]] = []
        reset = False
        for a, b in pieces:
            if obj is None:
                break
            chunk = os.pread(obj.data_fd, b - a, _HEADER + a)
            if len(chunk) != b - a:  # the data file was truncated behind our back: start over
                reset, parts, gaps = True, [], [(start, end)]
                break
            parts.append((a, chunk))
        store = store and obj is not None and obj.idx_fd is not None
        added: list[Interval] = []
        short_end: int | None = None
        fetched = 0
        counter: int | None = None
        try:
            for a, b in gaps:
                chunk = fetch(a, b)
                if len(chunk) > b - a:
                    raise StorageError(
                        f"range cache: fetch({a}, {b}) returned {len(chunk)} bytes, more than "
                        f"the {b - a} asked for; the fetch function must honour the range"
                    )
                fetched += len(chunk)
                parts.append((a, chunk))
                if store and chunk and obj is not None:
                    try:
                        if os.pwrite(obj.data_fd, chunk, _HEADER + a) != len(chunk):
                            raise OSError("short write")
                        added.append((a, a + len(chunk)))
                    except OSError as exc:
                        store = False
                        self._warn("store", exc)
                if len(chunk) < b - a:
                    short_end = a + len(chunk)
                    break
        finally:
            self._count(fetched_bytes=fetched)
            if obj is not None:
                try:
                    if store and (added or short_end is not None or reset):
                        counter = obj.publish(
                            added, short_end, reset, lambda d: self._add_usage(dir_fd, d)[0]
                        )
                    else:
                        obj.touch()
                except OSError as exc:
                    self._warn("store", exc)
        final = end if short_end is None else short_end
        parts.sort(key=lambda p: p[0])
        out: list[bytes] = []
        pos = start
        for off, chunk in parts:
            if off >= final:
                break
            out.append(chunk[: final - off])
            pos += len(out[-1])
        if pos != max(start, final):
            raise StorageError(f"range cache: internal error assembling {start}..{stop}")
        data = out[0] if len(out) == 1 else b"".join(out)
        self._count(hits_bytes=len(data) - fetched)
        return data, counter

    def _warn(self, what: str, exc: OSError) -> None:
        warnings.warn(
            f"range cache {self._root}: cannot {what} cached bytes ({exc}); serving them "
            "uncached. Is the disk full or the folder unwritable?",
            RuntimeWarning,
            stacklevel=4,
        )

    def _add_usage(self, dir_fd: int, delta: int, *, write: bool = True) -> tuple[int, bool]:
        """Add ``delta`` to the usage counter; (the new value, or -1 if the counter was
        unreadable and must be recounted; whether it was readable)."""
        fd = os.open(_USAGE_FILE, os.O_RDWR | os.O_CREAT, 0o644, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            buf = os.pread(fd, _USAGE.size, 0)
            valid = False
            value = 0
            if len(buf) == _USAGE.size:
                magic, value, crc = _USAGE.unpack(buf)
                valid = magic == _USAGE_MAGIC and crc == zlib.crc32(buf[:-4]) and value >= 0
                value = value if valid else 0
            if not write:
                return value, valid
            value = max(0, value + delta)
            body = _USAGE.pack(_USAGE_MAGIC, value, 0)[:-4]
            os.pwrite(fd, body + _CRC.pack(zlib.crc32(body)), 0)
            return (value if valid else -1), valid
        finally:
            os.close(fd)

    def _scan(self, dir_fd: int) -> tuple[list[tuple[int, str]], int]:
        """(last use in ns, name) of every object, -1 for invalid ones; the valid bytes."""
        names = {m.group(1) for n in os.listdir(dir_fd) if (m := _NAME.fullmatch(n))}
        entries: list[tuple[int, str]] = []
        total = 0
        for name in names:
            fds: list[int] = []
            try:
                fds.append(os.open(f"{name}.data", os.O_RDONLY, dir_fd=dir_fd))
                fds.append(os.open(f"{name}.idx", os.O_RDONLY, dir_fd=dir_fd))
                fcntl.flock(fds[1], fcntl.LOCK_SH)
                index = _decode(_read_all(fds[1]), _token(fds[0]), self._boot)
                used = os.fstat(fds[1]).st_mtime_ns
            except FileNotFoundError:
                entries.append((-1, name))
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            entries.append((used if index is not None else -1, name))
            total += index.total if index is not None else 0
        return entries, total

    def _evict(self, dir_fd: int, force: bool) -> None:
        """Recount, then remove least recently used idle objects until the total is at most
        15/16 of the bound. Does nothing if another process is evicting already."""
        limit = self.config.max_bytes
        target = limit - limit // 16
        for _ in range(3):  # again if others stored more while we held the evict lock
            lock_fd = os.open(_EVICT_FILE, os.O_RDWR | os.O_CREAT, 0o644, dir_fd=dir_fd)
            try:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                before = self._add_usage(dir_fd, 0)[0]
                if not force and before <= limit:
                    return
                entries, total = self._scan(dir_fd)
                # Counter := true total + what others added during the scan (an over-count at
                # worst, for objects stored during the scan and scanned after).
                counter = self._add_usage(dir_fd, total - max(before, 0))[0]
                for _, name in sorted(entries):
                    if counter <= target:
                        break
                    freed = self._evict_object(dir_fd, name)
                    if freed is not None:
                        counter = self._add_usage(dir_fd, -freed)[0]
                        self._count(evicted_bytes=freed)
            finally:
                os.close(lock_fd)
            force = False
            if self._add_usage(dir_fd, 0, write=False)[0] <= limit:
                return

    def _evict_object(self, dir_fd: int, name: str) -> int | None:
        """Remove one object unless a process is using it: the valid bytes it held, None if busy."""
        lock = fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fd = _open_locked(f"{name}.data", dir_fd, os.O_RDWR, lock)
        except BlockingIOError:
            return None
        if fd is None:  # a sidecar without data (removed by hand or a cleaner)
            _unlink(f"{name}.idx", dir_fd)
            return 0
        try:
            obj = _Object(fd, None, self._boot)
            with suppress(FileNotFoundError):
                obj.idx_fd = os.open(f"{name}.idx", os.O_RDONLY, dir_fd=dir_fd)
            try:
                freed = obj.load().total
            finally:
                if obj.idx_fd is not None:
                    os.close(obj.idx_fd)
            _unlink(f"{name}.idx", dir_fd)
            _unlink(f"{name}.data", dir_fd)
            return freed
        finally:
            os.close(fd)
