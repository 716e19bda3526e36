"""Where bytes come from: local paths and fsspec URLs behind one small interface.

`Storage` is rooted at a dataset's folder or URL. Paths below it are POSIX-style relative
strings (``data/chunk-000/file-000.parquet``). Local files are read with plain OS calls
(`os.pread` releases the GIL and needs no shared file position); any other URL goes through
fsspec. A `Storage` is cheap to pickle: it carries only its root, and file handles are opened
per process.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import random
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

from .errors import ConfigError, StorageError
from .tracing import tracing_scope

if TYPE_CHECKING:
    from .rangecache import CacheConfig, RangeCache

__all__ = ["RangeReader", "RetryPolicy", "Storage", "redact"]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_SECRET_PARAMS = re.compile(
    r"(?i)((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token|"
    r"access_key|secret|password)=)[^&\s]+"
)


def redact(text: str) -> str:
    """``text`` with credentials in URLs (``user:secret@``, signed query parameters) removed."""
    return _SECRET_PARAMS.sub(r"\1***", _CREDENTIALS.sub(r"\g<scheme>***@", text))


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How remote reads retry transient failures (5xx, throttling, resets, timeouts)."""

    attempts: int = 6
    """Tries in all, the first included."""
    base_delay_s: float = 0.05
    """Delay before the first retry; doubles each time (plus full jitter)."""
    max_delay_s: float = 4.0
    """Upper bound of one delay."""
    max_concurrency: int = 16
    """Remote range reads in flight at once, per process."""


_TRANSIENT_TEXT = re.compile(
    r"(?i)(\b5\d\d\b|slow ?down|throttl|reset|timed? ?out|timeout|temporar|unavailable|"
    r"connection|broken pipe|too many requests|\b429\b|request rate)"
)


_TRANSIENT_ERRNO = {
    errno.EBUSY,
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
}


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True  # s3fs maps SlowDown/503 to EBUSY
    return bool(_TRANSIENT_TEXT.search(f"{type(exc).__name__} {exc}"))


class Storage:
    """Read access to the files under one root (a local folder or an fsspec URL)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        index_dir: str | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        self.retry = retry if retry is not None else RetryPolicy()
        self.cache = cache
        """Local disk cache of fetched byte ranges (remote roots only), shared by processes."""
        self._range_cache: RangeCache | None = None
        self._cache_pid = -1
        self._sizes: dict[str, int] = {}
        self.index_dir = index_dir
        """Extra folder where ``framefeed index --out`` put packet-index sidecars."""
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        if not isinstance(root, (str, os.PathLike)):
            raise ConfigError(
                f"a dataset root is a folder path or an fsspec URL, got {type(root).__name__} "
                f"{root!r}"
            )
        root_s = os.fspath(root)
        if root_s.startswith("file://"):
            root_s = root_s[len("file://") :]
        self.root: str = root_s.rstrip("/") if _is_url(root_s) else os.path.abspath(root_s)
        self.is_local: bool = not _is_url(self.root)
        self._fs: Any = None
        self._fs_pid = -1
        self._gate = threading.BoundedSemaphore(self.retry.max_concurrency)
        self.stats = {"range_reads": 0, "bytes_read": 0, "retries": 0}

    def __repr__(self) -> str:
        return f"Storage({redact(self.root)!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "is_local": self.is_local,
            "retry": self.retry,
            "storage_options": self.storage_options,
            "index_dir": self.index_dir,
            "cache": self.cache,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None
        self._fs_pid = -1
        self._range_cache = None
        self._cache_pid = -1
        self._sizes = {}
        self._gate = threading.BoundedSemaphore(self.retry.max_concurrency)
        self.stats = {"range_reads": 0, "bytes_read": 0, "retries": 0}

    @property
    def fs(self) -> Any:
        """The fsspec filesystem for a URL root (created on first use, per process).

        A filesystem inherited through ``fork`` is never used: async ones (s3fs, gcsfs) are
        bound to an event-loop thread that does not exist in the child.
        """
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            options = {"skip_instance_cache": True, **self.storage_options}
            try:
                self._fs, _ = fsspec.core.url_to_fs(self.root, **options)
            except ValueError as exc:  # fsspec: "Protocol not known: ..."
                raise ConfigError(
                    f"{redact(self.root)}: fsspec has no filesystem for this URL ({exc}); "
                    "use a local folder or a URL such as s3://bucket/dataset"
                ) from exc
            if self._fs_pid != -1:  # a forked child: the parent may have held the gate
                self._gate = threading.BoundedSemaphore(self.retry.max_concurrency)
            self._fs_pid = os.getpid()
        return self._fs

    def url(self, rel: str) -> str:
        """The full path or URL of ``rel``."""
        if self.is_local:
            return os.path.join(self.root, *rel.split("/"))
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return os.path.exists(self.url(rel))
        return bool(self.fs.exists(self.url(rel)))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` (sorted lexicographically, as LeRobot does)."""
        if self.is_local:
            import glob

            hits = glob.glob(os.path.join(self.root, pattern))
            return sorted(os.path.relpath(h, self.root).replace(os.sep, "/") for h in hits)
        base = self.fs._strip_protocol(self.root).rstrip("/")
        hits = self.fs.glob(posixpath.join(base, pattern))
        return sorted(posixpath.relpath(h, base) for h in hits)

    def open(self, rel: str, *, buffer_size: int = 1 << 20) -> IO[bytes]:
        """Open ``rel`` for binary reading; the caller closes it.

        A remote file is read through `read_range` (ranged requests with retries), buffered
        ``buffer_size`` bytes at a time.
        """
        path = self.url(rel)
        try:
            if self.is_local:
                return open(path, "rb")
            raw = _RangeFile(self, rel, self.size(rel))
            return io.BufferedReader(raw, buffer_size=buffer_size)
        except FileNotFoundError as exc:
            raise StorageError(f"{redact(path)}: file not found") from exc
        except OSError as exc:
            raise StorageError(f"{redact(path)}: cannot open ({redact(str(exc))})") from exc

    def open_arrow(self, rel: str) -> pa.NativeFile | IO[bytes]:
        """Open ``rel`` for Arrow readers (parquet); the caller closes it.

        A local file is Arrow's own (`pyarrow.OSFile`), so Arrow may decode it on its threads;
        a remote file is `open`'s Python file object. Pass ``use_threads=self.is_local`` to
        the read: when Arrow's threads hold buffers read from a Python file object, the last
        of them may be released after the interpreter began to exit, which aborts the process
        (apache/arrow#49942, seen about once in 15 runs that merely opened a dataset).
        """
        if not self.is_local:
            return self.open(rel)
        path = self.url(rel)
        try:
            return pa.OSFile(path, "rb")
        except FileNotFoundError as exc:
            raise StorageError(f"{redact(path)}: file not found") from exc
        except OSError as exc:
            raise StorageError(f"{redact(path)}: cannot open ({redact(str(exc))})") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically (a temporary name, then a rename) where the backend allows."""
        path = self.url(rel)
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StorageError(f"{redact(path)}: cannot write ({redact(str(exc))})") from exc

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes ``start..stop`` of ``rel`` (exactly that many; fewer only at end of file).

        Remote reads are ranged requests, at most ``retry.max_concurrency`` at once, retried
        with exponential backoff and full jitter on transient errors; after the last try a
        `StorageError` names the URL (without credentials) and the range.
        """
        if stop <= start:
            return b""
        with tracing_scope("framefeed.read", path=rel, start=int(start), stop=int(stop)):
            return self._read_range(rel, start, stop)

    def _read_range(self, rel: str, start: int, stop: int) -> bytes:
        path = self.url(rel)
        if self.is_local:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise StorageError(f"{path}: file not found") from exc
            try:
                data = os.pread(fd, stop - start, start)
            finally:
                os.close(fd)
            self._count(len(data))
            return data

        def fetch(a: int, b: int) -> bytes:
            got = self._with_retries(
                lambda: bytes(self.fs.cat_file(path, start=a, end=b)),
                f"{redact(path)} bytes {a}..{b}",
            )
            self._count(len(got))
            return got

        if self.cache is None:
            return fetch(start, stop)
        if self._range_cache is None or self._cache_pid != os.getpid():
            from .rangecache import RangeCache

            self._range_cache = RangeCache(self.cache)
            self._cache_pid = os.getpid()
        # The key names the object and its size, so a rewritten object is never served stale.
        key = (
            f"{redact(path)}#{self._sizes.get(rel) or self._sizes.setdefault(rel, self.size(rel))}"
        )
        return self._range_cache.read(key, start, stop, fetch)

    def _with_retries(self, call: Callable[[], bytes], what: str) -> bytes:
        """``call()``, retried on transient errors with exponential backoff and full jitter."""
        policy = self.retry
        for attempt in range(policy.attempts):
            try:
                with self._gate:
                    return call()
            except Exception as exc:
                if not _transient(exc):
                    raise StorageError(f"{what}: {redact(str(exc))}") from None
                if attempt + 1 == policy.attempts:
                    raise StorageError(
                        f"{what}: still failing after {policy.attempts} tries "
                        f"({type(exc).__name__}: {redact(str(exc))})"
                    ) from None
                self.stats["retries"] += 1
                delay = min(policy.max_delay_s, policy.base_delay_s * 2**attempt)
                time.sleep(random.uniform(0, delay))  # full jitter
        raise StorageError(f"{what}: no attempt was made (retry.attempts < 1)")

    def _count(self, n: int) -> None:
        self.stats["range_reads"] += 1
        self.stats["bytes_read"] += n

    def read_bytes(self, rel: str) -> bytes:
        """The whole of ``rel`` (a retried, cached range read when remote)."""
        if self.is_local:
            with self.open(rel) as fh:
                return fh.read()
        return self.read_range(rel, 0, self.size(rel))

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.url(rel)}: not valid JSON ({exc})") from exc

    def size(self, rel: str) -> int:
        """Size of ``rel`` in bytes; `StorageError` if it does not exist."""
        path = self.url(rel)
        try:
            if self.is_local:
                return os.path.getsize(path)
            return int(self.fs.size(path))
        except FileNotFoundError as exc:
            raise StorageError(f"{redact(path)}: file not found") from exc
        except OSError as exc:
            raise StorageError(f"{redact(path)}: cannot stat ({redact(str(exc))})") from exc


class RangeReader:
    """Byte ranges of one file: ``pread`` on a file descriptor locally, ranged GETs remotely.

    Owned by one user at a time (a decoder); `close` releases the descriptor. A reader made
    in one process must not be used in another.
    """

    def __init__(self, storage: Storage, rel: str) -> None:
        self.storage = storage
        self.rel = rel
        self.path = storage.url(rel)
        self.bytes_read = 0
        self._fd: int | None = None
        if storage.is_local:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise StorageError(f"{self.path}: file not found") from exc
            except OSError as exc:
                raise StorageError(f"{self.path}: cannot open ({exc})") from exc
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                os.close(self._fd)
                self._fd = None
                raise StorageError(f"{self.path}: not a regular file")

    def size(self) -> int:
        if self._fd is not None:
            return os.fstat(self._fd).st_size
        return self.storage.size(self.rel)

    def read(self, start: int, stop: int) -> bytes:
        """Bytes ``start..stop`` (fewer only at the end of the file)."""
        if self._fd is not None:
            with tracing_scope("framefeed.read", path=self.rel, start=int(start), stop=int(stop)):
                data = os.pread(self._fd, max(0, stop - start), start)
        else:
            data = self.storage.read_range(self.rel, start, stop)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over `Storage.read_range`."""

    def __init__(self, storage: Storage, rel: str, size: int) -> None:
        super().__init__()
        self._storage = storage
        self._rel = rel
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        stop = min(self._size, self._pos + len(view))
        if stop <= self._pos:
            return 0
        data = self._storage.read_range(self._rel, self._pos, stop)
        if len(data) != stop - self._pos:
            raise StorageError(
                f"{redact(self._storage.url(self._rel))}: short read at {self._pos} "
                f"({len(data)} of {stop - self._pos} bytes); the object changed or is truncated"
            )
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)
