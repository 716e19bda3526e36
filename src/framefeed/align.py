"""`RecordingStore`: a recording's columns in memory, and latest-at alignment over them.

Each column of a recording has its own rows. The store reads, once, the rows of the selected
segments of every column a field needs (through the dataset's `SegmentSource`), concatenates
them segment after segment, and remembers where each segment's rows start and end. A batch then
aligns every column to the sample's index values with ``searchsorted`` over the column's index
values, one call per segment of the batch, never row by row in Python: the value at ``t`` is the
column's latest row at or before ``t``.

With a `ColumnCache` (`use_cache`) and a dataset that knows its version (`recording_fingerprint`),
each column's three arrays (values, index values, per-segment row bounds) are built by one
process of the node and memory-mapped by the others (`framefeed.nodecache`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .catalog import Column, ColumnKind, Dataset
from .errors import FormatError
from .nodecache import ColumnCache, Mapped, load_many
from .select import SELECT_SEP, apply_select
from .streams import recording_fingerprint
from .table import arrow_to_numpy

__all__ = ["RecordingStore"]


class RecordingStore:
    """Rows of the segments at ``positions`` (sorted) on ``timeline``, per column."""

    def __init__(self, dataset: Dataset, positions: np.ndarray, timeline: str) -> None:
        if dataset.source is None:
            raise FormatError(f"{dataset.root}: not a recording (it has no segment source)")
        self.dataset = dataset
        self.positions = np.asarray(positions, dtype=np.int64)
        self.timeline = timeline
        self._values: dict[str, Any] = {}
        self._index: dict[str, np.ndarray] = {}
        self._bounds: dict[str, np.ndarray] = {}  # (num_segments, 2): first row, end row
        self._columns: dict[str, Column] = {}  # columns derived by a field's select
        self._lock = threading.Lock()
        self.cache: ColumnCache | None = None
        self._mapped: dict[str, Mapped] = {}
        self.cache_stats = {"built": 0, "mapped": 0}
        """Columns this process wrote to the cache, and columns it mapped that others wrote."""

    def use_cache(self, cache: ColumnCache | None) -> None:
        """Serve columns loaded from now on through the node-shared ``cache``; a recording
        without a fingerprint (in memory, or from a catalog server) stays in memory."""
        self.cache = cache if recording_fingerprint(self.dataset) is not None else None

    def derive(self, column: Column, expr: str) -> Column:
        """A column holding ``expr`` (`framefeed.select`) of ``column``'s values."""
        path = f"{column.path}{SELECT_SEP}{expr}"
        if path not in self._columns:
            info = {**column.info, "select_base": column.path, "select": expr}
            self._columns[path] = Column(
                path=path, kind=column.kind, dtype=column.dtype, shape=(), info=info
            )
        return self._columns[path]

    def column(self, path: str) -> Column:
        """The dataset's column ``path``, or a column made by `derive`."""
        return self._columns.get(path) or self.dataset.column(path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_values", "_index", "_bounds", "_mapped"):
            state[key] = {}
        state["cache_stats"] = {"built": 0, "mapped": 0}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def for_this_process(self) -> RecordingStore:
        """This store, safe to use after ``fork`` (a fresh lock; the arrays are shared)."""
        self._lock = threading.Lock()
        self.cache_stats = {"built": 0, "mapped": 0}  # the parent's work, not this process's
        return self

    @property
    def nbytes(self) -> int:
        arrays = [*self._values.values(), *self._index.values()]
        return sum(int(getattr(a, "nbytes", 0)) for a in arrays)

    def load(self, paths: Iterable[str]) -> None:
        """Read the rows of the named columns for every selected segment (one read per segment),
        or map them from the node's cache."""
        with self._lock:
            todo = [p for p in dict.fromkeys(paths) if p not in self._values]
            if not todo:
                return
            if self.cache is None:
                for p, arrays in self._read(todo).items():
                    self._keep(p, arrays)
                return
            keys = {p: self._cache_key(p) for p in todo}
            built: list[str] = []

            def build(names: list[str]) -> dict[str, dict[str, Any]]:
                built.extend(names)
                return self._read(names)

            for p, mapped in load_many(self.cache, keys, build).items():
                self._mapped[p] = mapped
                self._keep(p, mapped.arrays)
            self.cache_stats["built"] += len(built)
            self.cache_stats["mapped"] += len(todo) - len(built)

    def cached(self, path: str) -> Mapped | None:
        """The cache entry that serves column ``path`` in this process, if any."""
        return self._mapped.get(path)

    def _cache_key(self, path: str) -> dict[str, Any]:
        col = self.column(path)
        base = self.dataset.column(str(col.info.get("select_base", path)))
        return {
            "store": "recording",
            "dataset": recording_fingerprint(self.dataset),
            "timeline": self.timeline,
            "segments": hashlib.sha256(self.positions.tobytes()).hexdigest()[:32],
            "num_segments": int(self.positions.size),
            "column": path,
            "select": col.info.get("select"),
            "kind": base.kind.value,
            "dtype": base.dtype,
            "shape": list(base.shape),
        }

    def _keep(self, path: str, arrays: Mapping[str, Any]) -> None:
        self._values[path] = arrays["values"]
        self._index[path] = arrays["index"]
        self._bounds[path] = arrays["bounds"]
        col = self.column(path)
        if col.info.get("select") is not None:
            meta = json.loads(arrays["column"][0].as_py())
            self._columns[path] = Column(
                path=path, kind=col.kind, dtype=meta[0], shape=tuple(meta[1]), info=col.info
            )

    def _read(self, todo: list[str]) -> dict[str, dict[str, Any]]:
        """Per column: values, index values, per-segment (first, end) rows and (dtype, shape)."""
        columns = [self.column(p) for p in todo]
        base = {p: str(c.info.get("select_base", p)) for p, c in zip(todo, columns, strict=True)}
        wanted = list(dict.fromkeys(base.values()))
        source = self.dataset.source
        assert source is not None  # checked in __init__
        parts: dict[str, list[pa.Array]] = {p: [] for p in todo}
        index: dict[str, list[np.ndarray]] = {p: [] for p in todo}
        bounds = {p: np.zeros((self.dataset.num_segments, 2), dtype=np.int64) for p in todo}
        rows = dict.fromkeys(todo, 0)
        for pos in self.positions.tolist():
            got = source.read(pos, wanted, self.timeline)
            for p in todo:
                where = self._where(pos, p)
                if base[p] not in got:
                    raise FormatError(f"{where}: the source returned no rows")
                found = got[base[p]]
                if found.index.size > 1 and np.any(np.diff(found.index) < 0):
                    raise FormatError(f"{where}: index values are not in ascending order")
                bounds[p][pos] = (rows[p], rows[p] + len(found.index))
                rows[p] += len(found.index)
                parts[p].append(found.values)
                index[p].append(np.asarray(found.index, dtype=np.int64))
        out: dict[str, dict[str, Any]] = {}
        for col in columns:
            p = col.path
            chunked = pa.chunked_array(parts[p], type=parts[p][0].type if parts[p] else None)
            values_index = np.concatenate(index[p]) if index[p] else np.zeros(0, dtype=np.int64)
            expr = col.info.get("select")
            if expr is not None:
                selected = apply_select(chunked, str(expr))
                if selected.null_count:
                    # A row whose selection is empty is a row where the value was not
                    # logged: drop it, so latest-at finds the previous real value.
                    keep = np.asarray(selected.is_valid().to_numpy(zero_copy_only=False))
                    selected = selected.filter(pa.array(keep))
                    values_index = values_index[keep]
                    kept = np.concatenate([[0], np.cumsum(keep)])
                    bounds[p] = kept[bounds[p]]
                col = _with_shape(col, selected)
                chunked = pa.chunked_array([selected])
            out[p] = {
                "values": _convert(chunked, col),
                "index": values_index,
                "bounds": bounds[p],
                "column": pa.array([json.dumps([col.dtype, list(col.shape)])]),
            }
        return out

    def _where(self, position: int, path: str) -> str:
        seg = int(self.dataset.segment_ids[position])
        return f"{self.dataset.root}: segment {seg}, column {path!r}"

    def get(self, path: str) -> Any:
        """Values of column ``path`` over all loaded rows (numpy for numeric, else Arrow)."""
        if path not in self._values:
            self.load([path])
        return self._values[path]

    def index_values(self, path: str) -> np.ndarray:
        """Index value of every loaded row of ``path``."""
        if path not in self._index:
            self.load([path])
        return self._index[path]

    def segment_rows(self, path: str, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First row and end row (exclusive) of ``path`` in each of ``segments``."""
        if path not in self._bounds:
            self.load([path])
        b = self._bounds[path][np.asarray(segments, dtype=np.int64)]
        return b[..., 0], b[..., 1]

    def latest_at(self, path: str, segments: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Row of the latest value at or before ``t`` in the segment, or -1 where none is.

        ``segments`` and ``t`` have one shape (any); so does the result.
        """
        values = self.index_values(path)
        segs = np.asarray(segments, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        segs, t = np.broadcast_arrays(segs, t)
        first, end = self.segment_rows(path, segs)
        out = np.full(t.shape, -1, dtype=np.int64)
        for seg in np.unique(segs).tolist():
            sel = segs == seg
            lo = int(first[sel].flat[0])
            hi = int(end[sel].flat[0])
            hit = lo + np.searchsorted(values[lo:hi], t[sel], side="right") - 1
            out[sel] = np.where(hit >= lo, hit, -1)
        return out


def _with_shape(col: Column, values: pa.Array) -> Column:
    """``col`` with the per-row shape of its selected numeric ``values``."""
    if col.kind is not ColumnKind.NUMERIC:
        return col
    shape: list[int] = []
    arr: pa.Array = values
    while (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or (pa.types.is_fixed_size_list(arr.type))
    ):
        lengths = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False))
        if lengths.size and np.any(lengths != lengths[0]):
            raise FormatError(
                f"column {col.info.get('select_base')!r} select {col.info.get('select')!r}: rows "
                f"hold {int(lengths.min())} to {int(lengths.max())} values; numeric fields need "
                "the same number in every row"
            )
        shape.append(int(lengths[0]) if lengths.size else 0)
        arr = arr.flatten()
    return Column(
        path=col.path, kind=col.kind, dtype=str(arr.type), shape=tuple(shape) or (1,), info=col.info
    )


def _convert(chunks: pa.ChunkedArray, col: Column) -> Any:
    if col.kind is ColumnKind.NUMERIC:
        return arrow_to_numpy(chunks, col)
    return chunks.combine_chunks()
