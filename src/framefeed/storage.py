"""Where bytes come from: local paths and fsspec URLs behind one small interface.

`Storage` is rooted at a dataset's folder or URL. Paths below it are POSIX-style relative
strings (``data/chunk-000/file-000.parquet``). Local files are read with plain OS calls
(`os.pread` releases the GIL and needs no shared file position); any other URL goes through
fsspec. A `Storage` is cheap to pickle: it carries only its root, and file handles are opened
per process.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import IO, Any

from .errors import StorageError

__all__ = ["Storage"]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Storage:
    """Read access to the files under one root (a local folder or an fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root_s = os.fspath(root)
        if root_s.startswith("file://"):
            root_s = root_s[len("file://") :]
        self.root: str = root_s.rstrip("/") if _is_url(root_s) else os.path.abspath(root_s)
        self.is_local: bool = not _is_url(self.root)
        self._fs: Any = None

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "is_local": self.is_local, "_fs": None}

    @property
    def fs(self) -> Any:
        """The fsspec filesystem for a URL root (created on first use, per process)."""
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.root)
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

    def open(self, rel: str) -> IO[bytes]:
        """Open ``rel`` for binary reading; the caller closes it."""
        path = self.url(rel)
        try:
            if self.is_local:
                return open(path, "rb")
            return self.fs.open(path, "rb")  # type: ignore[no-any-return]
        except FileNotFoundError as exc:
            raise StorageError(f"{path}: file not found") from exc
        except OSError as exc:
            raise StorageError(f"{path}: cannot open ({exc})") from exc

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as fh:
            return fh.read()

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.url(rel)}: not valid JSON ({exc})") from exc

    def size(self, rel: str) -> int:
        if self.is_local:
            return os.path.getsize(self.url(rel))
        return int(self.fs.size(self.url(rel)))
