"""`RerunSource`: rows of the requested columns of one Rerun recording, through rerun-sdk.

`open_rerun` (in ``formats/rerun.py``) describes a folder of ``.rrd`` files; this module reads
their rows. A read opens the file's lazy chunk store (``rerun.chunk.RrdReader(path).store()``)
and hands it to `read_rows`, which streams only the chunks of the requested entities and
components (``store.stream().filter(content=..., components=..., is_static=False)``), keeps each
column's non-null rows with their index values and Rerun row ids, sorts them by (index value, row
id) and converts Rerun's list-per-row Arrow layout to framefeed's: one ``binary`` blob per row for
images and packet video, one string per row for text, flat or fixed-size-list numbers for numeric
columns. The catalog reader (``formats/rerun_catalog.py``) hands `read_rows` the lazy store of a
server's segment instead, so both give the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import ColumnKind
from ..errors import ConfigError, FormatError
from ..streams import ColumnRows

__all__ = [
    "PIP_LINE",
    "ColumnSpec",
    "RerunSource",
    "as_binary",
    "check_request",
    "import_rerun",
    "index_int64",
    "is_list",
    "one_per_row",
    "read_rows",
]

PIP_LINE = "pip install 'framefeed[rerun]'"
_ROW_ID = "rerun.controls.RowId"


def import_rerun() -> Any:
    """The ``rerun`` module, or an ImportError that gives the pip line."""
    try:
        import rerun
    except ImportError as exc:
        raise ImportError(f"reading Rerun recordings (.rrd) needs rerun-sdk: {PIP_LINE}") from exc
    return rerun


@dataclass(frozen=True)
class ColumnSpec:
    """Where a column lives inside a recording, and the layout of one row."""

    entity: str
    component: str
    kind: ColumnKind
    instances: int = 1
    """Values per row (Rerun "instances"); squeezed out of the shape when 1."""
    inner: tuple[int, ...] = ()
    """Fixed-size dimensions of one instance (``(3,)`` for a 3-D point)."""
    leaf: str = ""
    """numpy dtype name of a numeric column's values."""

    @property
    def shape(self) -> tuple[int, ...]:
        if self.instances != 1:
            return (self.instances, *self.inner)
        return self.inner or (1,)


class RerunSource:
    """A `SegmentSource` over ``.rrd`` files, one recording per file, read with rerun-sdk.

    Holds only file paths and column specs (it pickles into worker processes); every `read`
    opens the file's chunk store anew (a footer read, well under a millisecond locally).
    """

    def __init__(
        self,
        files: Sequence[str],
        recording_ids: Sequence[str],
        specs: dict[str, ColumnSpec],
        timelines: Sequence[str],
    ) -> None:
        self.files = list(files)
        self.recording_ids = list(recording_ids)
        self.specs = dict(specs)
        self.timelines = list(timelines)

    def _where(self, position: int) -> str:
        return f"{self.files[position]} (recording {self.recording_ids[position]!r})"

    def _store(self, position: int) -> Any:
        rr = import_rerun()
        reader = rr.chunk.RrdReader(self.files[position])
        entries = [e for e in reader.recordings() if e.recording_id == self.recording_ids[position]]
        if not entries:
            raise FormatError(f"{self._where(position)}: the recording is no longer in the file")
        return reader.store(store=entries[0])

    def read(self, position: int, paths: Sequence[str], timeline: str) -> dict[str, ColumnRows]:
        """Rows of each column in ``paths`` of the recording at ``position`` on ``timeline``."""
        specs = check_request(self.files, position, self.specs, self.timelines, paths, timeline)
        return read_rows(self._store(position), specs, timeline, self._where(position))


def check_request(
    names: Sequence[str],
    position: int,
    specs: dict[str, ColumnSpec],
    timelines: Sequence[str],
    paths: Sequence[str],
    timeline: str,
) -> dict[str, ColumnSpec]:
    """The specs of ``paths`` (once each), after checking the position, columns and timeline.

    ``names[p]`` names segment ``p`` in messages (its file, or its server and segment id).
    """
    if not 0 <= position < len(names):
        raise IndexError(f"segment position {position} out of range [0, {len(names)})")
    where = names[position]
    unknown = [p for p in paths if p not in specs]
    if unknown:
        raise ConfigError(f"{where}: no column {unknown[0]!r}; columns are: " + ", ".join(specs))
    if timeline not in timelines:
        raise ConfigError(
            f"{where}: no timeline {timeline!r}; timelines are: " + ", ".join(timelines)
        )
    return {p: specs[p] for p in dict.fromkeys(paths)}


def read_rows(
    store: Any, specs: dict[str, ColumnSpec], timeline: str, where: str
) -> dict[str, ColumnRows]:
    """Rows of each column of ``specs`` in a lazy chunk store, sorted and converted."""
    parts = _read_chunks(store, specs, timeline, where)
    return {p: _finish(parts[p], spec, f"{where}, column {p!r}") for p, spec in specs.items()}


@dataclass
class _Parts:
    index: list[np.ndarray] = field(default_factory=list)
    row_ids: list[np.ndarray] = field(default_factory=list)
    values: list[pa.Array] = field(default_factory=list)


def _read_chunks(
    store: Any, specs: dict[str, ColumnSpec], timeline: str, where: str
) -> dict[str, _Parts]:
    """Non-null rows of each column, chunk by chunk, with their index values and row ids."""
    entities = sorted({s.entity for s in specs.values()})
    components = sorted({s.component for s in specs.values()})
    by_key = {(s.entity, s.component): p for p, s in specs.items()}
    parts = {p: _Parts() for p in specs}
    stream = store.stream().filter(content=entities, components=components, is_static=False)
    for chunk in stream:
        batch = chunk.to_record_batch()
        names = batch.schema.names
        for component in components:
            path = by_key.get((chunk.entity_path, component))
            if path is None or component not in names:
                continue
            values = batch.column(component)
            if values.null_count == len(values):
                continue
            if timeline not in names:
                raise FormatError(
                    f"{where}, column {path!r}: rows logged without timeline "
                    f"{timeline!r}; pick a timeline every row is logged on"
                )
            index = batch.column(timeline)
            keep = pc.and_(pc.is_valid(values), pc.is_valid(index))
            kept = values.filter(keep)
            parts[path].values.append(kept)
            parts[path].index.append(index_int64(index.filter(keep)))
            parts[path].row_ids.append(_row_ids(batch.column(_ROW_ID).filter(keep)))
    return parts


def index_int64(index: pa.Array) -> np.ndarray:
    """Index values as int64 (timestamps and durations in nanoseconds)."""
    if pa.types.is_timestamp(index.type) or pa.types.is_duration(index.type):
        if index.type.unit != "ns":
            index = index.cast(
                pa.timestamp("ns") if pa.types.is_timestamp(index.type) else pa.duration("ns")
            )
        index = index.view(pa.int64())
    return np.asarray(index.to_numpy(zero_copy_only=False), dtype=np.int64)


def _row_ids(ids: pa.Array) -> np.ndarray:
    """Rerun row ids (16-byte TUIDs, ordered as big-endian bytes) as ``(n, 2)`` uint64."""
    raw = ids.storage if isinstance(ids, pa.ExtensionArray) else ids
    buf = np.frombuffer(raw.buffers()[1], dtype=np.uint8)
    data = buf[raw.offset * 16 : (raw.offset + len(raw)) * 16]
    return data.view(">u8").reshape(-1, 2).astype(np.uint64)


def _finish(parts: _Parts, spec: ColumnSpec, where: str) -> ColumnRows:
    if not parts.values:
        return ColumnRows(index=np.zeros(0, dtype=np.int64), values=_empty(spec))
    index = np.concatenate(parts.index)
    ids = np.concatenate(parts.row_ids)
    values = pa.concat_arrays(parts.values)
    order = np.lexsort((ids[:, 1], ids[:, 0], index))
    if not np.array_equal(order, np.arange(len(order))):
        index = index[order]
        values = values.take(pa.array(order))
    return ColumnRows(index=np.ascontiguousarray(index), values=_convert(values, spec, where))


def _empty(spec: ColumnSpec) -> pa.Array:
    if spec.kind in (ColumnKind.IMAGE, ColumnKind.PACKETS):
        return pa.array([], pa.binary())
    if spec.kind is ColumnKind.TEXT:
        return pa.array([], pa.string())
    typ: pa.DataType = pa.from_numpy_dtype(np.dtype(spec.leaf))
    for d in reversed(spec.shape if spec.shape != (1,) else ()):
        typ = pa.list_(typ, d)
    return pa.array([], typ)


def one_per_row(values: pa.Array, where: str) -> pa.Array:
    """The single instance of each row of a Rerun component (a list array) as a flat array."""
    counts = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if len(counts) and (counts.min() != 1 or counts.max() != 1):
        bad = int(np.flatnonzero(counts != 1)[0])
        raise FormatError(
            f"{where}: row {bad} holds {int(counts[bad])} values; framefeed reads "
            "components with one value per row"
        )
    return values.flatten()


def _convert(values: pa.Array, spec: ColumnSpec, where: str) -> pa.Array:
    if spec.kind in (ColumnKind.IMAGE, ColumnKind.PACKETS):
        return as_binary(one_per_row(values, where))
    if spec.kind is ColumnKind.TEXT:
        return one_per_row(values, where).cast(pa.string())
    return _numeric(values, spec, where)


def as_binary(blobs: pa.Array) -> pa.Array:
    """``list<uint8>`` blobs as a ``binary`` array, sharing the bytes (no copy)."""
    if pa.types.is_binary(blobs.type) or pa.types.is_large_binary(blobs.type):
        return blobs
    child = blobs.values
    offsets = blobs.offsets.to_numpy(zero_copy_only=False).astype(np.int64) + child.offset
    large = offsets[-1] >= 2**31 if len(offsets) else False
    typ = pa.large_binary() if large else pa.binary()
    off = offsets.astype(np.int64 if large else np.int32)
    return pa.Array.from_buffers(typ, len(blobs), [None, pa.py_buffer(off), child.buffers()[1]])


def _numeric(values: pa.Array, spec: ColumnSpec, where: str) -> pa.Array:
    """A numeric component as a flat array (shape ``(1,)``) or nested fixed-size lists."""
    counts = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if len(counts) and (counts.min() != spec.instances or counts.max() != spec.instances):
        bad = int(np.flatnonzero(counts != spec.instances)[0])
        raise FormatError(
            f"{where}: row {bad} holds {int(counts[bad])} values where the column "
            f"has {spec.instances} per row (shape {list(spec.shape)})"
        )
    flat = values
    while is_list(flat.type):
        flat = flat.flatten()
    if spec.shape == (1,):
        return flat
    out = flat
    for d in reversed(spec.shape):
        out = pa.FixedSizeListArray.from_arrays(out, d)
    return out


def is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
