"""A node-shared cache of columns: arrays written once per node and memory-mapped by everyone.

Every DataLoader worker and every local rank of a training run needs the same numeric columns
(state, action, timestamps, task ids). Loaded separately, a node holds one copy per process;
pickled into workers, they are copied too. Here the first process that needs an *entry* (the
arrays of one column of one dataset version and selection) writes it into a file, and every
process maps that file read-only: the node's page cache holds one copy, shared by all.

Layout of a cache folder (flat; only these names are ever created or removed):

- ``<h>.ffc``: one entry, ``h`` a SHA-256 prefix of its key. ``FFNCACHE``, the header length,
  a JSON header (the key, the creator, and per array its dtype and shape or Arrow format, its
  offset, length and CRC-32), 64-byte aligned array bytes (numpy arrays raw, Arrow arrays as an
  IPC stream), then ``FFNC-END`` and the file size. A reader checks all of that except the
  CRCs (`ColumnCache.verify` adds them), so a truncated, torn or foreign file is detected,
  removed and rebuilt.
- ``<h>.lock``: taken exclusively (``flock``) by the one process that builds the entry; the
  others wait on it, then map what it wrote. The entry is written to ``<h>.tmp-<pid>-<rand>``,
  fsynced and renamed into place, so no process ever maps a partial file.
- ``evict.lock``: held by the one process that evicts at a time.

A process keeps a shared ``flock`` on every entry it maps. Eviction (after each build, when the
folder is over `ColumnCache.max_bytes`) removes whole entries, least recently used first (mtime,
touched on every map), and skips those locked by a builder or a user, so it never removes an
entry that is being written or read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import socket
import struct
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from .errors import ConfigError, StorageError

__all__ = ["CacheEntry", "ColumnCache", "Mapped", "default_directory", "load_many"]

CACHE_ENV = "FRAMEFEED_CACHE_DIR"
"""Environment variable naming framefeed's cache root (the column cache is ``columns/`` in it)."""
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sQ")  # magic, header length
_TAIL = struct.Struct("<8sQ")  # magic, file size
_MAGIC = b"FFNCACHE"
_END = b"FFNC-END"
_ALIGN = 64
_SUFFIX = ".ffc"
_EVICT_FILE = "evict.lock"
_OPEN_TRIES = 100

Array: TypeAlias = Any
"""A numpy array (any fixed-size dtype) or a pyarrow ``Array``."""


def default_directory() -> str:
    """``$FRAMEFEED_CACHE_DIR/columns``, else ``$XDG_CACHE_HOME/framefeed/columns``, else
    ``~/.cache/framefeed/columns``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "framefeed")
    return os.path.join(root, "columns")


@dataclass(frozen=True, kw_only=True)
class CacheEntry:
    """One file of the cache, as `ColumnCache.entries` lists it."""

    path: str
    """The entry's file."""
    nbytes: int
    """Its size on disk."""
    last_used: float
    """When a process last mapped it (seconds since the epoch; the file's mtime)."""
    key: Mapping[str, Any]
    """What it holds: dataset fingerprint, column, rows (empty if the file is unreadable)."""


@dataclass(frozen=True, kw_only=True)
class ColumnCache:
    """Where the node-shared column cache lives, how large it may grow, how files are checked.

    Pass it (or ``True`` for the defaults) as ``column_cache=`` to `MapDataset` or
    `IterableDataset`. The folder must be on a local filesystem with working ``flock`` and
    ``mmap`` (not NFS), shared by the processes of one node.
    """

    directory: str | None = None
    """Folder of the cache files (created if missing); ``None``: `default_directory`."""
    max_bytes: int = 32 << 30
    """Bound on the total size of the entries. After a build, least recently used entries are
    removed until the folder fits; entries being built or mapped are never removed, so the bound
    is exceeded only by what live processes use."""
    verify: bool = False
    """Check each array's CRC-32 whenever a process maps an entry (reads the whole file once per
    process). Without it every structural fact is still checked (sizes, header, key)."""

    def __post_init__(self) -> None:
        if self.directory is not None and (not isinstance(self.directory, str | os.PathLike)):
            raise ConfigError(f"ColumnCache.directory must be a path, not {self.directory!r}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int):
            raise ConfigError(f"ColumnCache.max_bytes must be an int, not {self.max_bytes!r}")
        if self.max_bytes < 0:
            raise ConfigError(f"ColumnCache.max_bytes must be >= 0, got {self.max_bytes}")

    @staticmethod
    def resolve(value: ColumnCache | bool | None) -> ColumnCache | None:
        """A dataset's ``column_cache`` argument: ``True`` is the default cache, ``False`` or
        ``None`` no cache."""
        if value is None or value is False:
            return None
        if value is True:
            return ColumnCache()
        if isinstance(value, ColumnCache):
            return value
        raise ConfigError(f"column_cache must be a ColumnCache, True or False, not {value!r}")

    @property
    def path(self) -> str:
        """The cache folder this config names."""
        if self.directory is None:
            return default_directory()
        return os.path.abspath(os.fspath(self.directory))

    def _exists(self) -> bool:
        """Whether the folder exists (a file in its place is a `StorageError`)."""
        if not os.path.exists(self.path):
            return False
        if not os.path.isdir(self.path):
            raise StorageError(
                f"column cache {self.path}: not a folder; give ColumnCache(directory=...) a folder"
            )
        return True

    def entries(self) -> list[CacheEntry]:
        """The entries in the folder, least recently used first."""
        if not self._exists():
            return []
        out = []
        for name, size, used in _scan(self.path):
            path = os.path.join(self.path, name)
            out.append(CacheEntry(path=path, nbytes=size, last_used=used, key=_peek_key(path)))
        return out

    def clear(self) -> int:
        """Remove every entry no process is using (and stale temporaries); bytes freed."""
        return _evict(self.path, 0, keep=frozenset()) if self._exists() else 0

    def evict(self) -> int:
        """Remove least recently used idle entries until the folder fits; bytes freed."""
        return _evict(self.path, self.max_bytes, keep=frozenset()) if self._exists() else 0


class Mapped:
    """The arrays of one entry and what keeps them valid: the mapping and a shared lock.

    Without a file (the cache folder was unusable) it just holds the arrays built in memory.
    """

    def __init__(
        self,
        arrays: Mapping[str, Array],
        header: Mapping[str, Any] | None = None,
        fh: Any = None,
        mm: mmap.mmap | None = None,
        path: str | None = None,
    ) -> None:
        self.arrays = dict(arrays)
        self.header: Mapping[str, Any] = header or {}
        self.path = path
        self._fh = fh  # shared flock: evictors skip this entry while it is open
        self._mm = mm
        # Dropped without `close` (its store went away): the file is still closed, not left
        # to the garbage collector's "unclosed file" path.
        self._release = weakref.finalize(self, fh.close) if fh is not None else None

    @property
    def inode(self) -> int | None:
        if self._fh is None or self._fh.closed:
            return None
        return os.fstat(self._fh.fileno()).st_ino

    def close(self) -> None:
        """Release the entry (idempotent): the file now; the mapping, and with it the shared
        lock that keeps evictors away, as soon as no array of it is in use."""
        self.arrays = {}
        mm, self._mm = self._mm, None
        if mm is not None:
            with suppress(BufferError):  # arrays handed out still use it: it goes with them
                mm.close()
        if self._release is not None:
            self._release()


class _Bad(Exception):
    """An entry file that exists but cannot be trusted."""


def entry_name(key: Mapping[str, Any]) -> str:
    """File name of the entry for ``key``."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:40] + _SUFFIX


def load_many(
    cache: ColumnCache,
    keys: Mapping[str, Mapping[str, Any]],
    build: Callable[[list[str]], Mapping[str, Mapping[str, Array]]],
) -> dict[str, Mapped]:
    """The entries for ``keys`` (one per name), mapped from the cache or built and written.

    ``build(names)`` returns, for each missing name, its arrays (one pass over the source for
    all of them). Each missing entry is built by exactly one process of the node: the others
    wait on its lock and map the file. If the folder cannot be used, a warning says why and
    the built arrays are returned in memory.
    """
    directory = cache.path
    keys = {n: _keyed(k) for n, k in keys.items()}
    names = {n: entry_name(k) for n, k in keys.items()}
    out: dict[str, Mapped] = {}
    built: dict[str, Mapping[str, Array]] = {}
    building = False  # an OSError while building is the source's (StorageError), not ours
    try:
        os.makedirs(directory, exist_ok=True)
        for n in keys:
            with suppress(_Bad):
                hit = _open(directory, names[n], keys[n], cache.verify)
                if hit is not None:
                    out[n] = hit
        missing = [n for n in keys if n not in out]
        if not missing:
            return out
        with _locked(directory, sorted({names[n] for n in missing})):
            todo = []
            for n in missing:
                try:
                    hit = _open(directory, names[n], keys[n], cache.verify)
                except _Bad as exc:
                    warnings.warn(f"column cache: rebuilding {exc}", stacklevel=3)
                    _unlink(os.path.join(directory, names[n]))
                    hit = None
                if hit is not None:
                    out[n] = hit
                else:
                    todo.append(n)
            if todo:
                building = True
                built.update(build(todo))
                building = False
                for n in todo:
                    out[n] = _write(directory, names[n], keys[n], built[n])
    except OSError as exc:
        if building:
            raise
        warnings.warn(
            f"column cache {directory}: not usable ({exc}); these columns stay in this "
            "process's memory",
            stacklevel=3,
        )
        rest = [n for n in keys if n not in out]
        if any(n not in built for n in rest):
            built.update(build([n for n in rest if n not in built]))
        out.update({n: Mapped(built[n]) for n in rest})
        return out
    with suppress(OSError):
        _evict(directory, cache.max_bytes, keep=frozenset(names.values()))
    return out


def _keyed(key: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps({**key, "format": FORMAT_VERSION}, sort_keys=True))
    return out


# -- reading -------------------------------------------------------------------------------------


def _open(directory: str, name: str, key: Mapping[str, Any], verify: bool) -> Mapped | None:
    """The entry ``name`` mapped under a shared lock; None if absent; `_Bad` if untrustworthy."""
    path = os.path.join(directory, name)
    for _ in range(_OPEN_TRIES):
        try:
            fh = open(path, "rb")  # noqa: SIM115 - kept open by the returned Mapped
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            if _same_file(fh.fileno(), path):
                mapped = _map(fh, path, key, verify)
                with suppress(OSError):
                    os.utime(path)  # last use, for LRU eviction
                return mapped
        except BaseException:
            fh.close()
            raise
        fh.close()  # replaced or removed between open and lock: look again
    raise StorageError(f"column cache: {path} keeps being replaced; is another program using it?")


def _same_file(fd: int, path: str) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev)


def _map(fh: Any, path: str, key: Mapping[str, Any], verify: bool) -> Mapped:
    size = os.fstat(fh.fileno()).st_size
    if size < _HEAD.size + _TAIL.size:
        raise _Bad(f"{path}: truncated ({size} bytes)")
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    magic, hlen = _HEAD.unpack_from(mm, 0)
    end, total = _TAIL.unpack_from(mm, size - _TAIL.size)
    if magic != _MAGIC or end != _END or total != size or _HEAD.size + hlen > size:
        raise _Bad(f"{path}: not a complete cache file (truncated or overwritten)")
    try:
        header = json.loads(mm[_HEAD.size : _HEAD.size + hlen])
        if header.get("key") != key:
            raise _Bad(f"{path}: holds another entry (key mismatch)")
        start = _align(_HEAD.size + hlen)
        arrays = {
            n: _array(mm, spec, start, size - _TAIL.size, verify)
            for n, spec in header["arrays"].items()
        }
    except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise _Bad(f"{path}: unreadable ({exc})") from exc
    return Mapped(arrays, header, fh, mm, path)


def _array(mm: mmap.mmap, spec: Mapping[str, Any], start: int, stop: int, verify: bool) -> Array:
    off, n = start + int(spec["offset"]), int(spec["nbytes"])
    if off < start or off + n > stop:
        raise ValueError(f"array bytes [{off}, {off + n}) outside the data [{start}, {stop})")
    if verify and zlib.crc32(memoryview(mm)[off : off + n]) != int(spec["crc32"]):
        raise ValueError("checksum mismatch")
    if spec["format"] == "numpy":
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(s) for s in spec["shape"])
        if int(np.prod(shape)) * dtype.itemsize != n:
            raise ValueError(f"{n} bytes cannot hold {shape} {dtype}")
        arr: np.ndarray = np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)), offset=off)
        return arr.reshape(shape)
    buf = pa.py_buffer(mm).slice(off, n)
    batch = pa.ipc.open_stream(buf).read_next_batch()
    return batch.column(0)


def _peek_key(path: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as fh:
            magic, hlen = _HEAD.unpack(fh.read(_HEAD.size))
            if magic != _MAGIC or hlen > 1 << 24:
                return {}
            out: Mapping[str, Any] = json.loads(fh.read(hlen)).get("key", {})
            return out
    except (OSError, ValueError, struct.error):
        return {}


# -- writing -------------------------------------------------------------------------------------


def _blob(arr: Array) -> tuple[dict[str, Any], Any]:
    if isinstance(arr, np.ndarray):
        if arr.dtype.hasobject:
            raise ConfigError(f"column cache: cannot store an object array ({arr.dtype})")
        arr = np.ascontiguousarray(arr)
        spec = {"format": "numpy", "dtype": arr.dtype.str, "shape": list(arr.shape)}
        return spec, arr.reshape(-1).view(np.uint8).data
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    sink = pa.BufferOutputStream()
    batch = pa.record_batch([arr], names=["v"])
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return {"format": "arrow"}, sink.getvalue()


def _write(
    directory: str, name: str, key: Mapping[str, Any], arrays: Mapping[str, Array]
) -> Mapped:
    """Write the entry to a temporary file, map it, then rename it into place."""
    specs: dict[str, Any] = {}
    blobs = []
    offset = 0
    for n, arr in arrays.items():
        spec, blob = _blob(arr)
        nbytes = memoryview(blob).nbytes
        spec.update(offset=offset, nbytes=nbytes, crc32=zlib.crc32(blob))
        specs[n] = spec
        blobs.append((offset, blob))
        offset = _align(offset + nbytes)
    creator = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    header = json.dumps({"key": key, "creator": creator, "arrays": specs}).encode()
    start = _align(_HEAD.size + len(header))
    size = start + offset + _TAIL.size
    path = os.path.join(directory, name)
    tmp = f"{path[: -len(_SUFFIX)]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fh = open(tmp, "xb+")  # noqa: SIM115 - kept open by the returned Mapped
    try:
        fh.write(_HEAD.pack(_MAGIC, len(header)))
        fh.write(header)
        for off, blob in blobs:
            fh.seek(start + off)
            fh.write(blob)
        fh.seek(size - _TAIL.size)
        fh.write(_TAIL.pack(_END, size))
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        mapped = _map(fh, path, key, verify=False)
        os.replace(tmp, path)
    except BaseException:
        fh.close()
        _unlink(tmp)
        raise
    _fsync_dir(directory)
    return mapped


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


# -- locks and eviction --------------------------------------------------------------------------


# Descriptors holding an exclusive lock. A child forked while one is held (a build in another
# thread) must not keep the lock alive after the parent releases it, so the child points them
# at /dev/null right after the fork. This set is the module's only state, and exists for fork.
_EXCLUSIVE: set[int] = set()


def _after_fork_in_child() -> None:
    if not _EXCLUSIVE:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in list(_EXCLUSIVE):
            with suppress(OSError):
                os.dup2(null, fd)  # drops the child's reference to the locked file
    finally:
        os.close(null)
    _EXCLUSIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(fh: Any) -> None:
    _EXCLUSIVE.discard(fh.fileno())
    fh.close()


def _lock_file(path: str, how: int) -> Any:
    """``path`` opened (created if missing) under ``flock(how)``, still the file at ``path``;
    release it with `_release`."""
    for _ in range(_OPEN_TRIES):
        fh = open(path, "a+b")  # noqa: SIM115 - released by the caller
        _EXCLUSIVE.add(fh.fileno())
        try:
            fcntl.flock(fh.fileno(), how)
        except BaseException:
            _release(fh)
            raise
        if _same_file(fh.fileno(), path):
            return fh
        _release(fh)  # an evictor removed it after our open: take the new one
    raise StorageError(f"column cache: {path} keeps being replaced; is another program using it?")


@contextmanager
def _locked(directory: str, names: list[str]) -> Iterator[None]:
    """Exclusive build locks of ``names``, taken in sorted order (no cycles between builders)."""
    held = []
    try:
        for name in names:
            held.append(
                _lock_file(os.path.join(directory, name[: -len(_SUFFIX)] + ".lock"), fcntl.LOCK_EX)
            )
        yield
    finally:
        for fh in held:
            _release(fh)


def _scan(directory: str) -> list[tuple[str, int, float]]:
    """(name, size, mtime) of every entry, least recently used first."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(_SUFFIX):
            with suppress(FileNotFoundError):
                st = os.stat(os.path.join(directory, name))
                out.append((name, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: (e[2], e[0]))


def _evict(directory: str, max_bytes: int, keep: frozenset[str]) -> int:
    """Remove idle entries, LRU first, until the folder holds at most ``max_bytes``; and stale
    temporaries and lock files. Does nothing while another process evicts. Bytes freed."""
    entries = _scan(directory)
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes and max_bytes > 0:
        return 0
    try:
        guard = _lock_file(os.path.join(directory, _EVICT_FILE), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    freed = 0
    try:
        for name, size, _ in entries:
            if total <= max_bytes:
                break
            if name not in keep and _remove_entry(directory, name[: -len(_SUFFIX)]):
                total -= size
                freed += size
        for name in os.listdir(directory):
            stem, _, rest = name.partition(".")
            if rest.startswith("tmp-") or rest == "lock":
                _remove_entry(directory, stem, data=False)
    finally:
        _release(guard)
    return freed


def _remove_entry(directory: str, stem: str, *, data: bool = True) -> bool:
    """Remove an entry (and its temporaries) unless a process builds or maps it."""
    nb = fcntl.LOCK_EX | fcntl.LOCK_NB
    lock_path = os.path.join(directory, stem + ".lock")
    try:
        lock = _lock_file(lock_path, nb)
    except BlockingIOError:
        return False  # being built
    try:
        if data:
            path = os.path.join(directory, stem + _SUFFIX)
            try:
                fh = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fh.fileno(), nb)
            except BlockingIOError:
                fh.close()
                return False  # mapped by a process
            with fh:
                if _same_file(fh.fileno(), path):
                    _unlink(path)
        for name in os.listdir(directory):
            if name.startswith(stem + ".tmp-"):
                _unlink(os.path.join(directory, name))  # no builder holds the lock: stale
        _unlink(lock_path)
        return True
    finally:
        _release(lock)
