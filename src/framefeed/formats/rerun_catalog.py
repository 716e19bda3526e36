"""A dataset on a Rerun catalog server as a framefeed dataset: one server segment per segment.

``framefeed.open_dataset("rerun+http://host:port/<dataset>")`` names the server (``rerun://``
and ``rerun+https://`` for TLS, ``rerun+http://`` for plain HTTP, as rerun-sdk spells them) and,
as the URL path, the dataset (percent-encoded if it holds ``/``, spaces or ``%``). Needs
``pip install 'framefeed[rerun]'`` (rerun-sdk with its ``catalog`` extra, which brings
``datafusion``).

Opening reads the segment table (segment ids, sizes) and, per segment, its chunk manifest
(``DatasetEntry.segment_store``: schema, per-column ranges and row counts, no chunk data), a few
at a time in threads; columns are then probed on the first chunk that holds each, exactly as the
``.rrd`` reader does (`describe_recordings`). `CatalogSource.read` asks the server for the
chunks of the requested columns of one segment only, and turns them into rows with the same
code as the ``.rrd`` reader (`read_rows`): the same rows, byte for byte, as reading the
recordings' files. (The server's dataframe query, ``DatasetEntry.reader``, keeps one row per
index value; it would drop video packets logged at one timestamp, so it is not used.)

rerun-sdk starts a network runtime (tokio threads) when it is imported, and a process forked
afterwards cannot use the catalog client: it would hang. A forked DataLoader worker that has to
read raises a `ConfigError` instead; call the dataset's ``prepare()`` before the workers start
(they inherit the rows) or start them with ``multiprocessing_context="spawn"`` or
``"forkserver"`` (each connects once, lazily).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pyarrow as pa

from ..catalog import Dataset
from ..errors import ConfigError, FormatError, StorageError
from ..storage import redact
from ..streams import ColumnRows, recording_dataset
from .rerun import Footer, describe_recordings
from .rerun_source import PIP_LINE, ColumnSpec, check_request, import_rerun, read_rows

__all__ = ["CatalogAddress", "CatalogSource", "is_catalog_url", "open_rerun_catalog"]

SCHEMES = ("rerun://", "rerun+http://", "rerun+https://")
_MANIFEST_THREADS = 8

_runtime_lost = False
"""True in a process forked after rerun-sdk started its network runtime."""


def _after_fork_in_child() -> None:
    global _runtime_lost
    if "rerun_bindings" in sys.modules:
        _runtime_lost = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def is_catalog_url(path: object) -> bool:
    """Whether ``path`` is a Rerun catalog URL (``rerun://``, ``rerun+http(s)://``)."""
    return isinstance(path, str) and path.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class CatalogAddress:
    """A catalog URL split into the server and the dataset name."""

    server: str
    """``rerun+http://host:port``: what ``rerun.catalog.CatalogClient`` connects to."""
    dataset: str
    """The dataset name ("" when the URL names none)."""

    @classmethod
    def parse(cls, url: str) -> CatalogAddress:
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"{redact(url)}: no server; write rerun+http://host:port/<dataset>")
        if parts.query or parts.fragment:
            raise ConfigError(
                f"{redact(url)}: a catalog URL is rerun+http://host:port/<dataset>, without "
                "?query or #fragment"
            )
        return cls(f"{parts.scheme}://{parts.netloc}", unquote(parts.path.lstrip("/")))

    @property
    def url(self) -> str:
        """The URL again (the dataset name percent-encoded)."""
        return f"{self.server}/{quote(self.dataset, safe='')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connect(address: CatalogAddress) -> Any:
    """A ``rerun.catalog.DatasetEntry`` for ``address`` (connects; checks the dataset)."""
    if _runtime_lost:
        raise ConfigError(
            f"{redact(address.url)}: this process was forked after rerun-sdk started its "
            "network runtime, so it cannot reach the catalog server; call the dataset's "
            "prepare() before DataLoader workers start, or start them with "
            "multiprocessing_context='spawn' (or 'forkserver')"
        )
    rr = import_rerun()
    try:
        import datafusion  # noqa: F401  (rerun's catalog client needs it)
    except ImportError as exc:
        raise ImportError(
            f"reading a Rerun catalog server needs rerun-sdk's catalog extra (datafusion): "
            f"{PIP_LINE}"
        ) from exc
    try:
        client = rr.catalog.CatalogClient(address.server)
        names = sorted(client.dataset_names())
    except (OSError, RuntimeError) as exc:
        raise StorageError(
            f"{redact(address.server)}: cannot reach the Rerun catalog server "
            f"({_first_line(exc)}); is it running, and is the URL rerun+http://host:port/"
            "<dataset>?"
        ) from exc
    if address.dataset not in names:
        what = f"no dataset {address.dataset!r}" if address.dataset else "the URL names no dataset"
        raise FormatError(
            f"{redact(address.url)}: {what}; the server's datasets are: "
            f"{', '.join(names) or '(none)'} (open one as {redact(address.server)}/<name>)"
        )
    return client.get_dataset(name=address.dataset)


def _segment_store(entry: Any, segment_id: str, where: str) -> Any:
    """The lazy chunk store of one segment (fetches its manifest)."""
    rr = import_rerun()
    try:
        return entry.segment_store(segment_id)
    except rr.catalog.NotFoundError as exc:
        raise FormatError(
            f"{where}: the segment is not on the server ({_first_line(exc)})"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise StorageError(f"{where}: reading the segment failed ({_first_line(exc)})") from exc


class CatalogSource:
    """A `SegmentSource` over the segments of one dataset on a Rerun catalog server.

    Holds the URL, segment ids and column specs (it pickles into worker processes) and
    connects lazily, once per process.
    """

    def __init__(
        self,
        address: CatalogAddress,
        segment_ids: Sequence[str],
        specs: dict[str, ColumnSpec],
        timelines: Sequence[str],
    ) -> None:
        self.address = address
        self.segment_ids = list(segment_ids)
        self.specs = dict(specs)
        self.timelines = list(timelines)
        self._names = [f"{redact(address.url)}: segment {sid!r}" for sid in self.segment_ids]
        self._entry: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_entry"] = None
        state["_pid"] = -1
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def adopt(self, entry: Any) -> None:
        """Use ``entry`` (a ``DatasetEntry`` connected in this process) instead of connecting."""
        with self._lock:
            self._entry = entry
            self._pid = os.getpid()

    def _dataset(self) -> Any:
        with self._lock:
            if self._entry is None or self._pid != os.getpid():
                self._entry = _connect(self.address)
                self._pid = os.getpid()
            return self._entry

    def read(self, position: int, paths: Sequence[str], timeline: str) -> dict[str, ColumnRows]:
        """Rows of each column in ``paths`` of the segment at ``position`` on ``timeline``."""
        specs = check_request(self._names, position, self.specs, self.timelines, paths, timeline)
        where = self._names[position]
        store = _segment_store(self._dataset(), self.segment_ids[position], where)
        try:
            return read_rows(store, specs, timeline, where)
        except (OSError, RuntimeError) as exc:
            raise StorageError(
                f"{where}: fetching chunks of {', '.join(specs)} failed ({_first_line(exc)})"
            ) from exc


def open_rerun_catalog(url: str) -> Dataset:
    """Open the dataset a ``rerun+http://host:port/<dataset>`` URL names (see the module doc)."""
    address = CatalogAddress.parse(url)
    entry = _connect(address)
    try:
        table = pa.table(entry.segment_table())
    except (OSError, RuntimeError) as exc:
        raise StorageError(
            f"{redact(address.url)}: reading the segment table failed ({_first_line(exc)})"
        ) from exc
    if table.num_rows == 0:
        raise FormatError(f"{redact(address.url)}: the dataset has no segments")
    table = table.sort_by("rerun_segment_id")
    ids = [str(s) for s in table.column("rerun_segment_id").to_pylist()]
    names = [f"{redact(address.url)}: segment {sid!r}" for sid in ids]

    def footer(position: int) -> Footer:
        store = _segment_store(entry, ids[position], names[position])
        return Footer.of_store(store, names[position], ids[position])

    threads = min(_MANIFEST_THREADS, len(ids))
    with ThreadPoolExecutor(threads, thread_name_prefix="framefeed-rerun-manifest") as pool:
        footers = list(pool.map(footer, range(len(ids))))
    layout = describe_recordings(
        footers, lambda pos: _segment_store(entry, ids[pos], names[pos]), redact(address.url)
    )
    meta: dict[str, Sequence[Any]] = {"recording_id": ids}
    if "rerun_size_bytes" in table.column_names:
        meta["size_bytes"] = table.column("rerun_size_bytes").to_pylist()
    source = CatalogSource(address, ids, layout.specs, [t.name for t in layout.timelines])
    source.adopt(entry)
    dataset = recording_dataset(
        source=source,
        root=address.url,
        format_name="rerun",
        version=str(import_rerun().__version__),
        columns=layout.columns,
        timelines=layout.timelines,
        segment_ids=list(range(len(ids))),
        ranges=layout.ranges,
        lengths=layout.lengths,
        meta=meta,
    )
    dataset.info["rerun.skipped_columns"] = layout.skipped
    dataset.info["rerun.server"] = address.server
    dataset.info["rerun.dataset"] = address.dataset
    return dataset
