"""Recordings: segments whose columns each have their own rows, rate and timestamps.

A LeRobot dataset has one row per frame for every column. A robot log does not: a camera at
30 Hz, joint states at 500 Hz and a gripper at 10 Hz each have their own rows, stamped on one or
more timelines. A format reader for such data (Rerun recordings, or `from_streams` for arrays
already in memory) describes its segments, timelines and columns with the usual `Dataset`
model and hands out rows through a `SegmentSource`: for one segment, one timeline and a few
columns, the column's non-empty rows with their index values in ascending order.

Everything above the source (the sample index over a fixed-rate grid, latest-at alignment,
windows, decoders, batch plans) is shared with LeRobot datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from .catalog import Column, ColumnKind, Dataset, Timeline, TimelineKind
from .errors import ConfigError, FormatError
from .index import episode_ids

__all__ = [
    "ColumnRows",
    "SegmentSource",
    "Stream",
    "from_streams",
    "recording_dataset",
    "recording_fingerprint",
]

FINGERPRINT_INFO = "framefeed.fingerprint"
"""Key of a recording's version in ``Dataset.info`` (see `recording_fingerprint`)."""


@dataclass(frozen=True, eq=False)
class ColumnRows:
    """The rows of one column in one segment, on one timeline, in ascending index order."""

    index: np.ndarray
    """int64 index values (nanoseconds on a time timeline, steps on a sequence timeline)."""
    values: pa.Array
    """One value per index value; rows where the column was not logged are left out."""

    def __post_init__(self) -> None:
        if self.index.ndim != 1 or len(self.index) != len(self.values):
            raise FormatError(
                f"{len(self.index)} index values for {len(self.values)} rows; they must match"
            )


@runtime_checkable
class SegmentSource(Protocol):
    """Reads rows of a recording's columns, one segment at a time."""

    def read(self, position: int, paths: Sequence[str], timeline: str) -> dict[str, ColumnRows]:
        """Rows of each column in ``paths`` of the segment at ``position``, on ``timeline``."""
        ...


def recording_dataset(
    *,
    source: SegmentSource,
    root: str,
    format_name: str,
    columns: Sequence[Column],
    timelines: Sequence[Timeline],
    segment_ids: Sequence[int],
    ranges: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    lengths: Sequence[int],
    meta: Mapping[str, Sequence[Any]] | None = None,
    version: str = "",
    fingerprint: str | None = None,
) -> Dataset:
    """A `Dataset` whose rows come from ``source``.

    ``ranges[timeline]`` holds each segment's first and last index value (inclusive) on that
    timeline, over all its columns; ``lengths`` the number of rows of each segment's densest
    column (a size hint shown to users); ``meta`` extra per-segment columns users can filter on.
    ``fingerprint`` names this version of the rows (it changes whenever they may have): with
    one, the node-shared column cache keeps the recording's columns; ``None``: never cached.
    """
    from .storage import Storage  # local: storage is a lower room, imported only to build one

    n = len(segment_ids)
    arrays: dict[str, Any] = {
        "episode_index": pa.array(np.asarray(segment_ids, dtype=np.int64)),
        "length": pa.array(np.asarray(lengths, dtype=np.int64)),
    }
    for t in timelines:
        if t.name not in ranges:
            raise FormatError(f"{root}: no segment ranges for timeline {t.name!r}")
        start, end = (np.asarray(v, dtype=np.int64) for v in ranges[t.name])
        if start.shape != (n,) or end.shape != (n,):
            raise FormatError(f"{root}: ranges of timeline {t.name!r} must have {n} entries")
        arrays[f"{t.name}/start"] = pa.array(start)
        arrays[f"{t.name}/end"] = pa.array(end)
    for key, values in (meta or {}).items():
        arrays[key] = pa.array(list(values))
    table = pa.table(arrays)
    rates = [t.rate_hz for t in timelines if t.rate_hz]
    return Dataset(
        storage=Storage(root),
        format_name=format_name,
        version=version,
        fps=float(rates[0]) if rates else 0.0,
        columns={c.path: c for c in columns},
        timelines=timelines,
        tasks=(),
        segments=table,
        info={} if fingerprint is None else {FINGERPRINT_INFO: str(fingerprint)},
        source=source,
    )


def recording_fingerprint(dataset: Dataset) -> str | None:
    """The version its reader gave a recording (`recording_dataset`); ``None``: unknown, so
    its columns are not cached."""
    value = dataset.info.get(FINGERPRINT_INFO)
    return None if value is None else str(value)


@dataclass(frozen=True, kw_only=True)
class Stream:
    """One column of one in-memory segment: values and their index values per timeline."""

    values: Any
    """A numpy array (rows first), a pyarrow array, or a list of ``bytes``/``str``."""
    index: Mapping[str, Any]
    """Per timeline, one index value per row (int64 ns or ``datetime64`` for time timelines)."""
    kind: ColumnKind | None = None
    """Column kind; inferred (numeric for numbers, image for bytes, text for str) if omitted."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """Extras copied into the `Column` (``codec`` for packet video, ...)."""


class _MemorySource:
    def __init__(
        self,
        segments: Sequence[Mapping[str, tuple[dict[str, np.ndarray], pa.Array]]],
        types: Mapping[str, pa.DataType] | None = None,
    ):
        self.segments = segments
        self.types = dict(types or {})
        """Arrow type of each column, for the empty rows of a segment that lacks it."""

    def read(self, position: int, paths: Sequence[str], timeline: str) -> dict[str, ColumnRows]:
        seg = self.segments[position]
        out: dict[str, ColumnRows] = {}
        for path in paths:
            if path not in seg:  # this segment never logged the column: no rows
                empty = pa.array([], type=self.types.get(path, pa.null()))
                out[path] = ColumnRows(index=np.zeros(0, dtype=np.int64), values=empty)
                continue
            index, values = seg[path]
            if timeline not in index:
                raise FormatError(f"column {path!r} has no values on timeline {timeline!r}")
            out[path] = ColumnRows(index=index[timeline], values=values)
        return out


def from_streams(
    segments: Sequence[Mapping[str, Stream]],
    *,
    timelines: Mapping[str, TimelineKind],
    segment_ids: Sequence[int] | None = None,
    name: str = "memory://streams",
) -> Dataset:
    """A recording `Dataset` from arrays in memory: one mapping of column path to `Stream`
    per segment. Every stream must be indexed on every timeline named in ``timelines``.
    """
    if not segments:
        raise ConfigError("from_streams needs at least one segment")
    if not timelines:
        raise ConfigError(
            "from_streams needs at least one timeline, such as {'step': TimelineKind.SEQUENCE}"
        )
    try:
        timelines = {str(t): TimelineKind(k) for t, k in timelines.items()}
    except ValueError as exc:
        raise ConfigError(f"from_streams: timelines map names to TimelineKind ({exc})") from None
    prepared: list[dict[str, tuple[dict[str, np.ndarray], pa.Array]]] = []
    columns: dict[str, Column] = {}
    ranges: dict[str, tuple[list[int], list[int]]] = {t: ([], []) for t in timelines}
    lengths: list[int] = []
    for pos, seg in enumerate(segments):
        rows: dict[str, tuple[dict[str, np.ndarray], pa.Array]] = {}
        if not isinstance(seg, Mapping):
            raise ConfigError(
                f"{name}: segment {pos} must map column paths to Streams, not {type(seg).__name__}"
            )
        for path, stream in seg.items():
            where = f"{name}: segment {pos}, column {path!r}"
            if not isinstance(stream, Stream):
                raise ConfigError(f"{where}: expected a Stream, not {type(stream).__name__}")
            values, column = _to_arrow(stream, path, where)
            known = columns.setdefault(path, column)
            if known.kind is not column.kind or known.shape != column.shape:
                raise ConfigError(
                    f"{where}: {column.kind.value} {column.shape} differs from "
                    f"{known.kind.value} {known.shape} in an earlier segment"
                )
            index: dict[str, np.ndarray] = {}
            for tl, kind in timelines.items():
                if tl not in stream.index:
                    raise ConfigError(f"{where}: no index values on timeline {tl!r}")
                index[tl] = _index_values(stream.index[tl], kind, len(values), f"{where}, {tl}")
            order = np.argsort(index[next(iter(timelines))], kind="stable")
            if not np.array_equal(order, np.arange(len(order))):
                values = values.take(pa.array(order))
                index = {tl: v[order] for tl, v in index.items()}
            rows[path] = (index, values)
        if not rows:
            raise ConfigError(f"{name}: segment {pos} has no columns")
        for tl in timelines:
            firsts = [v[0][tl][0] for v in rows.values() if len(v[1])]
            lasts = [v[0][tl].max() for v in rows.values() if len(v[1])]
            if not firsts:
                raise ConfigError(f"{name}: segment {pos} has no rows")
            ranges[tl][0].append(int(min(firsts)))
            ranges[tl][1].append(int(max(lasts)))
        lengths.append(max(len(v[1]) for v in rows.values()))
        prepared.append(rows)
    ids = (
        episode_ids(segment_ids, "segment_ids").tolist()
        if segment_ids is not None
        else list(range(len(segments)))
    )
    if len(ids) != len(segments):
        raise ConfigError(f"{len(ids)} segment ids for {len(segments)} segments")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{name}: segment_ids repeat an id: {sorted(ids)[:20]}")
    return recording_dataset(
        source=_MemorySource(prepared, {p: _arrow_type(p, prepared) for p in columns}),
        root=name,
        format_name="memory",
        version="1",
        columns=list(columns.values()),
        timelines=[Timeline(name=t, kind=k) for t, k in timelines.items()],
        segment_ids=ids,
        ranges={t: (r[0], r[1]) for t, r in ranges.items()},
        lengths=lengths,
    )


def _arrow_type(path: str, segments: Sequence[Mapping[str, tuple[Any, pa.Array]]]) -> pa.DataType:
    return next(seg[path][1].type for seg in segments if path in seg)


def _index_values(raw: Any, kind: TimelineKind, n: int, where: str) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.dtype.kind == "M":
        if kind is not TimelineKind.TIME:
            raise ConfigError(f"{where}: datetime values on a sequence timeline")
        arr = arr.astype("datetime64[ns]").view(np.int64)
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"{where}: index values must be integers or datetime64, not {arr.dtype}")
    if arr.shape != (n,):
        raise ConfigError(f"{where}: {arr.shape[0] if arr.ndim else 0} index values for {n} rows")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _to_arrow(stream: Stream, path: str, where: str) -> tuple[pa.Array, Column]:
    values = stream.values
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            raise ConfigError(f"{where}: numpy values must be numeric, not {values.dtype}")
        flat = pa.array(values.reshape(-1))
        shape = tuple(int(d) for d in values.shape[1:])
        arr: pa.Array = flat
        for d in reversed(shape):
            arr = pa.FixedSizeListArray.from_arrays(arr, d)
        kind = stream.kind or ColumnKind.NUMERIC
        return arr, Column(
            path=path,
            kind=kind,
            dtype=str(values.dtype),
            shape=shape or (1,),
            info=dict(stream.info),
        )
    if isinstance(values, Mapping | str | bytes):
        raise ConfigError(f"{where}: values must be an array or a list of rows, not {values!r}")
    try:
        arr = values if isinstance(values, pa.Array) else pa.array(list(values))
    except (pa.ArrowException, TypeError) as exc:
        raise ConfigError(f"{where}: values of mixed or unsupported types ({exc})") from exc
    if stream.kind is not None:
        kind = stream.kind
    elif pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        kind = ColumnKind.IMAGE
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        kind = ColumnKind.TEXT
    else:
        kind = ColumnKind.NUMERIC
    dtype = "uint8" if kind in (ColumnKind.IMAGE, ColumnKind.PACKETS) else str(arr.type)
    shape = tuple(stream.info.get("shape", ()))
    return arr, Column(path=path, kind=kind, dtype=dtype, shape=shape, info=dict(stream.info))
