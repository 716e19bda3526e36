"""`ColumnStore`: the tabular columns of the selected segments, loaded once into arrays.

A batch gathers its numeric values with one fancy-indexing operation per column, so the rows
must be addressable in memory. The store reads only the columns that fields ask for, and only
the row groups of the selected episodes when the file has one row group per episode (as
LeRobot writes it); otherwise it reads the file and filters rows by ``episode_index``. Every
read is checked: the rows must carry the expected episode and consecutive frame numbers.

Numeric columns become numpy arrays with LeRobot's output dtypes (every float as float32,
every integer as int64, bools as bool; a ``(1,)`` feature becomes a scalar per row). Image and
text columns stay Arrow arrays.

A field's ``select`` (`framefeed.select`) makes a derived column (`derive`, `select_column`): its
base column's rows, as nested fixed-size lists of the feature's shape, with the expression
applied; an index drops an axis, a slice keeps it (``"[0:7]"`` of a ``(14,)`` state is ``(7,)``
per frame, ``"[3]"`` a scalar). Only numeric vectors and tensors have items to select.

With a `ColumnCache` (`use_cache`), each column is read by one process of the node, written to
the cache folder and memory-mapped by every process (`framefeed.nodecache`): workers and local
ranks share one copy, and later runs skip the parquet read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .catalog import Column, ColumnKind, Dataset
from .errors import ConfigError, FormatError
from .nodecache import ColumnCache, Mapped, load_many
from .select import SELECT_SEP, apply_select

__all__ = ["ColumnStore", "arrow_to_numpy", "select_column"]

_CHECK = ("episode_index", "frame_index")
_BATCH_ROWS = 1 << 16  # rows per piece when a file is filtered rather than read by row group


class ColumnStore:
    """Columns of the segments at ``positions`` (sorted), addressed by store row."""

    def __init__(self, dataset: Dataset, positions: np.ndarray) -> None:
        self.dataset = dataset
        self.positions = np.asarray(positions, dtype=np.int64)
        lengths = dataset.lengths[self.positions]
        self.starts = np.full(dataset.num_segments, -1, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        self.starts[self.positions] = offsets
        self.num_rows = int(lengths.sum())
        self._arrays: dict[str, Any] = {}
        self._columns: dict[str, Column] = {}  # columns derived by a field's select
        self._lock = threading.Lock()
        self.cache: ColumnCache | None = None
        self._mapped: dict[str, Mapped] = {}
        self._fingerprint: str | None = None
        self.cache_stats = {"built": 0, "mapped": 0}
        """Columns this process wrote to the cache, and columns it mapped that others wrote."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # reloaded (or mapped again) on first use in the new process
        state["_mapped"] = {}
        state["cache_stats"] = {"built": 0, "mapped": 0}
        del state["_lock"]
        return state

    def use_cache(self, cache: ColumnCache | None, fingerprint: str | None = None) -> None:
        """Serve columns loaded from now on through the node-shared ``cache`` (None: memory).

        ``fingerprint`` is this selection's `fingerprint`, when the caller has it already.
        """
        self.cache = cache
        self._fingerprint = fingerprint

    def for_this_process(self) -> ColumnStore:
        """This store, made safe to use after ``fork`` (a fresh lock; arrays are shared)."""
        self._lock = threading.Lock()
        self.cache_stats = {"built": 0, "mapped": 0}  # the parent's work, not this process's
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(a, "nbytes", 0)) for a in self._arrays.values())

    def derive(self, column: Column, expr: str) -> Column:
        """A column holding ``expr`` (`framefeed.select`) of ``column``'s values."""
        derived = select_column(column, expr)
        self._columns.setdefault(derived.path, derived)
        return self._columns[derived.path]

    def column(self, path: str) -> Column:
        """The dataset's column ``path``, or a column made by `derive`."""
        return self._columns.get(path) or self.dataset.column(path)

    def rows(self, positions: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Store rows of ``(segment position, frame)`` pairs (any matching shapes)."""
        rows: np.ndarray = self.starts[positions] + frames
        return rows

    def get(self, path: str) -> Any:
        """The array of column ``path`` (loaded on first use)."""
        arr = self._arrays.get(path)
        if arr is None:
            self.load([path])
            arr = self._arrays[path]
        return arr

    def load(self, paths: Iterable[str]) -> None:
        """Load the named columns for every selected segment, with one pass over the files."""
        with self._lock:
            todo = [p for p in dict.fromkeys(paths) if p not in self._arrays]
            if not todo:
                return
            if self.cache is None:
                self._arrays.update(self._read_columns(todo))
                return
            keys = {p: self._cache_key(p) for p in todo}
            built: list[str] = []

            def build(names: list[str]) -> dict[str, dict[str, Any]]:
                built.extend(names)
                return {p: {"values": a} for p, a in self._read_columns(names).items()}

            for p, mapped in load_many(self.cache, keys, build).items():
                self._mapped[p] = mapped
                self._arrays[p] = mapped.arrays["values"]
            self.cache_stats["built"] += len(built)
            self.cache_stats["mapped"] += len(todo) - len(built)

    def cached(self, path: str) -> Mapped | None:
        """The cache entry that serves column ``path`` in this process, if any."""
        return self._mapped.get(path)

    def _cache_key(self, path: str) -> dict[str, Any]:
        col = self.column(path)
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.dataset, self.positions)
        key: dict[str, Any] = {
            "store": "frames",
            "dataset": self._fingerprint,
            "column": path,
            "kind": col.kind.value,
            "dtype": col.dtype,
            "shape": list(col.shape),
            "rows": self.num_rows,
        }
        if "select" in col.info:  # its own entry: the base column and the expression
            base = self.dataset.column(str(col.info["select_base"]))
            key["select"] = [base.path, col.info["select"], list(base.shape)]
        return key

    def _read_columns(self, todo: list[str]) -> dict[str, Any]:
        """The named columns, read from the data files one row group (or batch) at a time.

        Numeric values are converted piece by piece into arrays of the final size, so loading
        holds the result plus one piece, not a second copy of the whole column.
        """
        columns = [self.column(p) for p in todo]
        names = list(dict.fromkeys(_base_path(c) for c in columns))  # what the files hold
        numeric: dict[str, np.ndarray] = {}
        parts: dict[str, list[pa.Array]] = {p: [] for p in todo}
        by_file: dict[str, list[int]] = defaultdict(list)
        for pos in self.positions.tolist():
            by_file[str(self.dataset.data_paths[pos])].append(pos)
        row = 0
        # Files in the order of their first selected segment, so rows come out in store order.
        for rel, members in sorted(by_file.items(), key=lambda kv: kv[1][0]):
            where = self.dataset.storage.url(rel)
            expected = int(self.dataset.lengths[members].sum())
            checks: list[pa.Table] = []
            in_file = 0
            for piece in self._read(rel, members, names):
                n = piece.num_rows
                checks.append(piece.select(list(_CHECK)))
                in_file += n
                if in_file > expected:
                    self._check(pa.concat_tables(checks), members, where)  # says what is wrong
                for col in columns:
                    if col.kind is not ColumnKind.NUMERIC:
                        parts[col.path].extend(piece.column(col.path).chunks)
                        continue
                    try:
                        values = self._numeric(piece.column(_base_path(col)), col)
                    except FormatError as exc:
                        raise FormatError(f"{where}: {exc}") from exc
                    if col.path not in numeric:
                        shape = (self.num_rows, *values.shape[1:])
                        numeric[col.path] = np.empty(shape, dtype=values.dtype)
                    numeric[col.path][row : row + n] = values
                row += n
            self._check(pa.concat_tables(checks) if checks else None, members, where)
        out: dict[str, Any] = {}
        for col in columns:
            if col.kind is ColumnKind.NUMERIC:
                out[col.path] = numeric.get(col.path)
                if out[col.path] is None:  # no rows at all
                    out[col.path] = self._numeric(pa.array([], pa.float32()), col)
            else:
                chunks = parts[col.path]
                out[col.path] = (
                    (pa.concat_arrays(chunks) if len(chunks) != 1 else chunks[0])
                    if chunks
                    else pa.array([])
                )
        return out

    def _numeric(self, values: pa.ChunkedArray | pa.Array, col: Column) -> np.ndarray:
        """Rows of the numeric column ``col`` from its (base column's) Arrow ``values``."""
        if "select" not in col.info:
            return arrow_to_numpy(values, col)
        base = self.dataset.column(str(col.info["select_base"]))
        return _selected(arrow_to_numpy(values, base), col)

    def _read(self, rel: str, members: list[int], names: list[str]) -> Iterator[pa.Table]:
        """The rows of ``members`` in ``rel``, as consecutive pieces."""
        ds = self.dataset
        where = ds.storage.url(rel)
        try:
            with ds.storage.open_arrow(rel) as fh:
                pf = pq.ParquetFile(fh)
                have = pf.schema_arrow.names
                missing = [n for n in [*names, *_CHECK] if n not in have]
                if missing:
                    raise FormatError(
                        f"{where}: column {missing[0]!r} is named in meta/info.json but is not "
                        f"in this data file (columns: {have})"
                    )
                wanted = list(dict.fromkeys([*names, *_CHECK]))
                yield from self._read_rows(pf, members, wanted)
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{where}: unreadable parquet ({exc})") from exc

    def _read_rows(
        self, pf: pq.ParquetFile, members: list[int], wanted: list[str]
    ) -> Iterator[pa.Table]:
        """Rows of ``members``: by row group when the file has one per episode, else filtered."""
        ds = self.dataset
        threads = ds.storage.is_local  # see Storage.open_arrow
        meta = pf.metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        rel = str(ds.data_paths[members[0]])
        in_file = np.flatnonzero(ds.data_paths == rel)
        if groups == ds.lengths[in_file].tolist():
            slot = {int(p): i for i, p in enumerate(in_file.tolist())}
            for p in members:
                yield pf.read_row_group(slot[p], columns=wanted, use_threads=threads)
            return
        ids = pa.array(ds.segment_ids[members])
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted, use_threads=threads)
        for batch in batches:
            table = pa.Table.from_batches([batch])
            kept = table.filter(pc.is_in(table.column("episode_index"), value_set=ids))
            if kept.num_rows:
                yield kept

    def _check(self, table: pa.Table | None, members: list[int], where: str) -> None:
        ds = self.dataset
        lengths = ds.lengths[members]
        if table is None:
            table = pa.table({n: pa.array([], pa.int64()) for n in _CHECK})
        episodes = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
        frames = np.asarray(table.column("frame_index").to_numpy(), dtype=np.int64)
        expect_ep = np.repeat(ds.segment_ids[members], lengths)
        if episodes.shape != expect_ep.shape or not np.array_equal(episodes, expect_ep):
            got = np.unique(episodes).tolist()[:10]
            raise FormatError(
                f"{where}: expected {int(lengths.sum())} rows of episodes "
                f"{ds.segment_ids[members].tolist()[:10]} in order, found {len(episodes)} rows of "
                f"episodes {got}; the data file does not match meta/episodes"
            )
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        expect_frames = np.arange(len(frames)) - starts
        if not np.array_equal(frames, expect_frames):
            bad = int(np.flatnonzero(frames != expect_frames)[0])
            raise FormatError(
                f"{where}: episode {int(episodes[bad])}: frame_index is not 0..length-1 in order "
                f"(row {bad} has {int(frames[bad])}, expected {int(expect_frames[bad])})"
            )


def fingerprint(dataset: Dataset, positions: np.ndarray) -> str:
    """Identity and version of the rows of ``positions``: the root, ``info``, the selected
    segments (ids, lengths, data files) and each data file's size and modification time (or
    ETag, remotely). A rewritten dataset gets a new fingerprint, so stale entries are not used.
    """
    positions = np.asarray(positions, dtype=np.int64)
    files = sorted({str(p) for p in dataset.data_paths[positions].tolist()})
    digest = hashlib.sha256()
    for part in (
        dataset.root,
        json.dumps(dataset.info, sort_keys=True, default=str),
        positions.tobytes(),
        dataset.segment_ids[positions].astype(np.int64).tobytes(),
        dataset.lengths[positions].astype(np.int64).tobytes(),
        json.dumps([[rel, *_file_version(dataset, rel)] for rel in files]),
    ):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _file_version(dataset: Dataset, rel: str) -> list[Any]:
    storage = dataset.storage
    try:
        if storage.is_local:
            st = os.stat(storage.url(rel))
            return [st.st_size, st.st_mtime_ns]
        info = storage.fs.info(storage.url(rel))
    except OSError:
        return ["unreadable"]  # reading the file reports the error, with its name
    tags = [str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime") if k in info]
    return [int(info.get("size") or 0), *tags]


def select_column(column: Column, expr: str, key: str | None = None) -> Column:
    """The column holding ``expr`` (`framefeed.select`) of every row of numeric ``column``.

    The expression is checked here, on one row of the feature's shape: a step that does not fit
    (a field name on a vector), an index out of range or an empty selection is a `ConfigError`
    naming the field (``key``), the column and the expression. The result's ``shape`` is the
    selected value's (``(1,)`` for a scalar, as for LeRobot's scalar features).
    """
    what = f"field {key!r}: " if key is not None else ""
    where = f"{what}select {expr!r} on column {column.path!r}"
    if column.kind is not ColumnKind.NUMERIC:
        reason = {
            ColumnKind.VIDEO: "a video feature (frames are decoded from MP4 files, whole)",
            ColumnKind.IMAGE: "an image feature (encoded bytes, decoded whole)",
            ColumnKind.TEXT: "a string feature (one string per frame, nothing nested)",
        }.get(column.kind, f"a {column.kind.value} column")
        raise ConfigError(
            f"{where}: the column is {reason}; select applies to numeric vectors such as "
            "observation.state (crop or post-process frames in a custom decoder or a transform)"
        )
    shape = tuple(int(d) for d in column.shape)
    if shape in ((), (1,)):
        raise ConfigError(
            f"{where}: the column holds one {column.dtype} per frame (shape {list(shape)}), which "
            "has no items to select; drop select to read the value"
        )
    probe = np.zeros((1, *shape), dtype=_out_dtype(np.dtype(column.dtype)))
    try:
        selected = apply_select(_as_lists(probe), expr)
    except ConfigError as exc:
        raise ConfigError(f"{where} ({column.dtype}, shape {list(shape)}): {exc}") from None
    dims: list[int] = []
    while True:
        if selected.null_count:
            raise ConfigError(
                f"{where}: an index is out of range for a value of shape {list(shape)} (an "
                "axis of n items takes -n <= i < n)"
            )
        if not _is_list(selected.type):
            break
        dims.append(int(selected.value_lengths()[0].as_py()))
        selected = selected.flatten()
    if 0 in dims:
        raise ConfigError(f"{where}: selects no values of shape {list(shape)}")
    names = column.names
    if len(shape) == 1 and isinstance(names, list) and len(names) == shape[0]:
        names = apply_select(pa.array([[str(n) for n in names]]), expr).to_pylist()[0]
    else:
        names = None
    info = {**column.info, "select_base": column.path, "select": expr, "select_shape": dims}
    return Column(
        path=f"{column.path}{SELECT_SEP}{expr}",
        kind=ColumnKind.NUMERIC,
        dtype=column.dtype,
        shape=tuple(dims) or (1,),
        names=names,
        info=info,
    )


def _base_path(col: Column) -> str:
    return str(col.info.get("select_base", col.path))


def _as_lists(values: np.ndarray) -> pa.Array:
    """``(rows, *shape)`` values as (nested) fixed-size lists, without copying."""
    arr: pa.Array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _selected(values: np.ndarray, col: Column) -> np.ndarray:
    """The derived column ``col`` (`select_column`) of its base column's ``values``."""
    dims = tuple(int(d) for d in col.info["select_shape"])
    out = apply_select(_as_lists(values), str(col.info["select"]))
    while _is_list(out.type):
        out = out.flatten()
    flat = out.to_numpy(zero_copy_only=False)
    if out.null_count or flat.shape[0] != len(values) * int(np.prod(dims)):
        raise FormatError(
            f"column {col.info['select_base']!r}: select {col.info['select']!r} gave "
            f"{flat.shape[0]} values for {len(values)} rows of shape {list(dims)}"
        )
    return np.ascontiguousarray(flat.reshape(len(values), *dims), dtype=values.dtype)


def _out_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind == "f":
        return np.dtype(np.float32)
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    if dtype.kind == "b":
        return np.dtype(np.bool_)
    raise FormatError(f"unsupported numeric dtype {dtype}")


def arrow_to_numpy(chunks: pa.ChunkedArray | pa.Array, col: Column) -> np.ndarray:
    """A numeric column as ``(rows, *shape)`` numpy with LeRobot's output dtypes.

    Scalars (shape ``(1,)``) become ``(rows,)``. Fixed-size and variable lists and HF ``ArrayND``
    extension types are flattened; every row must hold ``prod(shape)`` values.
    """
    arr = chunks.combine_chunks() if isinstance(chunks, pa.ChunkedArray) else chunks
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    n = len(arr)
    if arr.null_count:
        raise FormatError(f"column {col.path!r}: {arr.null_count} null values")
    while _is_list(arr.type):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    shape = tuple(col.shape)
    per_row = int(np.prod(shape)) if shape else 1
    if values.shape[0] != n * per_row:
        raise FormatError(
            f"column {col.path!r}: expected {per_row} values per row (declared shape "
            f"{list(shape)}), found "
            f"{values.shape[0]} values in {n} rows"
        )
    out_shape = (n,) if shape in ((1,), ()) else (n, *shape)
    return np.ascontiguousarray(values.reshape(out_shape), dtype=_out_dtype(values.dtype))


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
