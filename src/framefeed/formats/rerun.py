"""Rerun recordings (``.rrd``) as a framefeed dataset: one recording file per segment.

Everything is read through rerun-sdk's own chunk API (``rerun.chunk.RrdReader``): opening a
dataset reads each file's footer (its chunk manifest) and nothing else, apart from one small probe
per column in the first recording that has it (the shape of a numeric row, the size of an image or
video frame, the static media type or codec). `RerunSource.read` then loads only the chunks of the
requested columns of one recording.

Column paths keep Rerun's form, ``<entity path>:<component>``, e.g.
``/camera:EncodedImage:blob``. Kinds: ``EncodedImage:blob`` is an image column
(``info["media_type"]``); a ``VideoSample`` component (``VideoStream:sample``) holds packet video
(``info["codec"]``: ``h264``, ``hevc``, ``av1``, ``vp8`` or ``vp9``, and ``info["keyframe_column"]``
when the sibling ``VideoStream:is_keyframe`` exists); text components are text columns; other
components of numbers or booleans (``Scalars:scalars``, ``VideoStream:is_keyframe``, ...) are
numeric with the shape of one row. Static components and recording properties are not columns;
other component types are left out (listed in ``dataset.info["rerun.skipped_columns"]``).

Rows come back as Rerun logged them: rows where a column was not logged (null) are left out, rows
are sorted by index value and, for equal values, by Rerun's row id, so the last of several rows
logged at one index value is the one latest-at picks, as in Rerun's own queries.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import Column, ColumnKind, Dataset, Timeline, TimelineKind
from ..errors import FormatError
from ..storage import Storage
from ..streams import recording_dataset
from .rerun_source import (
    ColumnSpec,
    RerunSource,
    as_binary,
    import_rerun,
    index_int64,
    is_list,
    one_per_row,
)

__all__ = ["RerunSource", "is_rerun", "open_rerun"]

_PROPERTIES = "/__properties"
_CODECS = {
    0x61766331: "h264",
    0x68657631: "hevc",
    0x61763031: "av1",
    0x76703038: "vp8",
    0x76703039: "vp9",
}
"""Rerun's ``VideoCodec`` values (big-endian fourccs) and the PyAV decoder of each."""


def _rrd_files(storage: Storage) -> list[str]:
    if os.path.isfile(storage.root):
        return [storage.root] if storage.root.endswith(".rrd") else []
    if not os.path.isdir(storage.root):
        return []
    names = sorted(n for n in os.listdir(storage.root) if n.endswith(".rrd"))
    return [os.path.join(storage.root, n) for n in names]


def is_rerun(storage: Storage) -> bool:
    """Whether ``storage`` is a ``.rrd`` file or a folder holding ``.rrd`` files."""
    if not storage.is_local:
        return storage.root.endswith(".rrd")
    return bool(_rrd_files(storage))


# --- opening: footers, column kinds, probes -------------------------------------------------


@dataclass
class _Footer:
    """What the footer (chunk manifest) of one recording file tells."""

    path: str
    recording_id: str
    application_id: str
    fields: dict[str, pa.Field] = field(default_factory=dict)
    timelines: dict[str, TimelineKind] = field(default_factory=dict)
    extent: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    """Per (column, timeline): first and last index value and number of rows."""


def _meta(f: pa.Field, key: str) -> str:
    raw: bytes = (f.metadata or {}).get(key.encode(), b"")
    return raw.decode()


def _footer(rr: Any, path: str) -> _Footer:
    try:
        reader = rr.chunk.RrdReader(path)
        entries = reader.recordings()
        if len(entries) != 1:
            raise FormatError(
                f"{path}: holds {len(entries)} recordings; framefeed reads files "
                "with exactly one recording (one segment per file)"
            )
        store = reader.store(store=entries[0])
    except (ValueError, OSError, RuntimeError) as exc:
        raise FormatError(
            f"{path}: not a readable Rerun recording ({exc}); RRD files need the "
            "footer that rerun-sdk >= 0.41 writes (re-save older files)"
        ) from exc
    out = _Footer(path, entries[0].recording_id, entries[0].application_id)
    for f in store.schema().to_arrow():
        kind = _meta(f, "rerun:kind")
        if kind == "index":
            out.timelines[f.name] = (
                TimelineKind.SEQUENCE if pa.types.is_integer(f.type) else TimelineKind.TIME
            )
        elif (
            kind == "data"
            and _meta(f, "rerun:is_static") != "true"
            and _meta(f, "rerun:entity_path") != _PROPERTIES
        ):
            out.fields[f.name] = f
    out.extent = _extent(store, out)
    return out


def _extent(store: Any, footer: _Footer) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Per-column ranges and row counts from the chunk manifest, without loading chunks.

    The manifest is read through ``LazyStore._chunk_index``, which rerun-sdk 0.41 marks private;
    if it is missing or changes shape, the index columns are read from the chunks instead.
    """
    try:
        table = pa.Table.from_batches([store._chunk_index().to_arrow()])
    except (AttributeError, TypeError, ValueError, pa.ArrowInvalid):
        return _scan_extent(store, footer)
    entity = np.asarray(table.column("chunk_entity_path").to_pylist(), dtype=object)
    temporal = ~np.asarray(table.column("chunk_is_static").to_numpy(zero_copy_only=False))
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for name, f in footer.fields.items():
        rows = temporal & (entity == _meta(f, "rerun:entity_path"))
        component = _meta(f, "rerun:component")
        for tl in footer.timelines:
            keys = [f"{tl}:{component}:{k}" for k in ("start", "end", "num_rows")]
            if not all(k in table.column_names for k in keys):
                return _scan_extent(store, footer)
            start, end, count = (table.column(k).filter(pa.array(rows)) for k in keys)
            n = int(pc.sum(count).as_py() or 0)
            if n:
                first = index_int64(start.drop_null().combine_chunks())
                last = index_int64(end.drop_null().combine_chunks())
                out[(name, tl)] = (int(first.min()), int(last.max()), n)
    return out


def _scan_extent(store: Any, footer: _Footer) -> dict[tuple[str, str], tuple[int, int, int]]:
    """`_extent` by reading every temporal chunk's index columns (slow: loads the chunks)."""
    acc: dict[tuple[str, str], list[int]] = {}
    by_key = {
        (_meta(f, "rerun:entity_path"), _meta(f, "rerun:component")): name
        for name, f in footer.fields.items()
    }
    for chunk in store.stream().filter(is_static=False):
        batch = chunk.to_record_batch()
        for component in batch.schema.names:
            name = by_key.get((chunk.entity_path, component))
            if name is None:
                continue
            valid = pc.is_valid(batch.column(component))
            for tl in footer.timelines:
                if tl not in batch.schema.names:
                    continue
                idx = index_int64(batch.column(tl).filter(valid))
                if idx.size:
                    lo, hi, n = acc.get((name, tl), [int(idx.min()), int(idx.max()), 0])
                    acc[(name, tl)] = [
                        min(lo, int(idx.min())),
                        max(hi, int(idx.max())),
                        n + idx.size,
                    ]
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def _classify(f: pa.Field) -> ColumnKind | None:
    """The kind of a Rerun component column, or None for kinds framefeed does not read."""
    component_type = _meta(f, "rerun:component_type")
    if component_type == "rerun.components.VideoSample":
        return ColumnKind.PACKETS
    if _meta(f, "rerun:component") == "EncodedImage:blob":
        return ColumnKind.IMAGE
    t = f.type
    if not is_list(t):
        return None
    t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ColumnKind.TEXT
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return ColumnKind.NUMERIC
    return None


def _first_rows(store: Any, entity: str, component: str, *, static: bool | None) -> pa.Array:
    """The non-null rows of the first chunk that has any (an empty array when none has)."""
    for chunk in store.stream().filter(content=entity, components=[component], is_static=static):
        if chunk.entity_path != entity:
            continue
        batch = chunk.to_record_batch()
        if component in batch.schema.names:
            values = batch.column(component).drop_null()
            if len(values):
                return values
    return pa.array([], pa.null())


def _probe(
    store: Any, name: str, f: pa.Field, kind: ColumnKind, names: set[str]
) -> tuple[ColumnSpec, tuple[int, ...], dict[str, Any], str]:
    """Spec, row shape, info and dtype of a column, from its first chunk in ``store``."""
    entity, component = _meta(f, "rerun:entity_path"), _meta(f, "rerun:component")
    spec = ColumnSpec(entity=entity, component=component, kind=kind)
    rows = _first_rows(store, entity, component, static=False)
    info: dict[str, Any] = {"rerun.component_type": _meta(f, "rerun:component_type")}
    if kind is ColumnKind.NUMERIC:
        t = f.type.value_type
        inner: list[int] = []
        while pa.types.is_fixed_size_list(t):
            inner.append(t.list_size)
            t = t.value_type
        counts = pc.list_value_length(rows).to_numpy(zero_copy_only=False) if len(rows) else [1]
        leaf = "bool" if pa.types.is_boolean(t) else t.to_pandas_dtype().__name__
        spec = ColumnSpec(
            entity=entity,
            component=component,
            kind=kind,
            instances=int(counts[0]),
            inner=tuple(inner),
            leaf=str(np.dtype(leaf)),
        )
        return spec, spec.shape, info, spec.leaf
    if kind is ColumnKind.TEXT:
        return spec, (), info, "string"
    blobs = as_binary(one_per_row(rows, name)) if len(rows) else pa.array([], pa.binary())
    first = blobs[0].as_py() if len(blobs) else b""
    if kind is ColumnKind.IMAGE:
        media = _first_rows(store, entity, _sibling(component, "media_type"), static=None)
        media_type = media.flatten()[0].as_py() if len(media) else _sniff(first)
        info["media_type"] = media_type
        return spec, _image_shape(first) or (), info, "uint8"
    codecs = _first_rows(store, entity, _sibling(component, "codec"), static=None)
    fourcc = int(codecs.flatten()[0].as_py()) if len(codecs) else -1
    if fourcc not in _CODECS:
        raise FormatError(
            f"{name}: video codec {fourcc:#x} is not one of "
            f"{sorted(_CODECS.values())} (log VideoStream:codec with the samples)"
        )
    info["codec"] = _CODECS[fourcc]
    keyframes = f"{entity}:{_sibling(component, 'is_keyframe')}"
    if keyframes in names:
        info["keyframe_column"] = keyframes
    return spec, _frame_shape(info["codec"], blobs), info, "uint8"


def _sibling(component: str, field_name: str) -> str:
    """``VideoStream:sample`` -> ``VideoStream:codec``: a component of the same archetype."""
    archetype = component.rsplit(":", 1)[0]
    return f"{archetype}:{field_name}"


def _sniff(blob: bytes) -> str | None:
    if blob.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _image_shape(blob: bytes) -> tuple[int, int, int] | None:
    """(height, width, channels) from a JPEG or PNG header, or None."""
    if blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) >= 26:
        width, height = struct.unpack(">II", blob[16:24])
        channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(blob[25], 3)
        return int(height), int(width), channels
    pos = 2
    while blob.startswith(b"\xff\xd8") and pos + 4 <= len(blob):
        if blob[pos] != 0xFF:
            return None
        marker = blob[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in _SOF and pos + 10 <= len(blob):
            height, width = struct.unpack(">HH", blob[pos + 5 : pos + 9])
            return int(height), int(width), int(blob[pos + 9])
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            pos += 2
            continue
        pos += 2 + struct.unpack(">H", blob[pos + 2 : pos + 4])[0]
    return None


def _frame_shape(codec: str, packets: pa.Array) -> tuple[int, ...]:
    """(height, width, 3) of the first frame the packets decode to, or () if none does."""
    import av

    try:
        ctx: Any = av.CodecContext.create(codec, "r")
        for blob in packets.to_pylist():
            for frame in ctx.decode(av.Packet(blob)):
                return int(frame.height), int(frame.width), 3
        for frame in ctx.decode(None):
            return int(frame.height), int(frame.width), 3
    except av.FFmpegError:
        return ()
    return ()


def open_rerun(storage: Storage) -> Dataset:
    """Open a ``.rrd`` file or a folder of them (one recording each) as a recording `Dataset`."""
    if not storage.is_local:
        raise FormatError(
            f"{storage.root}: Rerun recordings are read from local .rrd files; "
            "copy them to a local folder"
        )
    files = _rrd_files(storage)
    if not files:
        raise FormatError(f"{storage.root}: no .rrd files")
    rr = import_rerun()
    footers = [_footer(rr, path) for path in files]
    where = {fo.path: fo for fo in footers}
    common = [tl for tl in footers[0].timelines if all(tl in fo.timelines for fo in footers)]
    if not common:
        raise FormatError(f"{storage.root}: the recordings share no timeline")
    names: dict[str, pa.Field] = {}
    for fo in footers:
        for name, f in fo.fields.items():
            names.setdefault(name, f)
    specs: dict[str, ColumnSpec] = {}
    columns: list[Column] = []
    skipped: list[str] = []
    for name, f in names.items():
        kind = _classify(f)
        if kind is None:
            skipped.append(name)
            continue
        home = next(
            (fo for fo in footers if any((name, tl) in fo.extent for tl in common)), footers[0]
        )
        store = rr.chunk.RrdReader(home.path).store()
        spec, shape, info, dtype = _probe(
            store, f"{where[home.path].path}: column {name!r}", f, kind, set(names)
        )
        specs[name] = spec
        columns.append(Column(path=name, kind=kind, dtype=dtype, shape=shape, info=info))
    starts: dict[str, list[int]] = {tl: [] for tl in common}
    ends: dict[str, list[int]] = {tl: [] for tl in common}
    lengths: list[int] = []
    for fo in footers:
        for tl in common:
            got = [fo.extent[(c, tl)] for c in specs if (c, tl) in fo.extent]
            if not got:
                raise FormatError(
                    f"{fo.path}: recording {fo.recording_id!r} has no rows on timeline {tl!r}"
                )
            starts[tl].append(min(g[0] for g in got))
            ends[tl].append(max(g[1] for g in got))
        lengths.append(max(fo.extent.get((c, common[0]), (0, 0, 0))[2] for c in specs))
    dataset = recording_dataset(
        source=RerunSource(files, [fo.recording_id for fo in footers], specs, common),
        root=storage.root,
        format_name="rerun",
        version=str(rr.__version__),
        columns=columns,
        timelines=[Timeline(name=tl, kind=footers[0].timelines[tl]) for tl in common],
        segment_ids=list(range(len(footers))),
        ranges={tl: (starts[tl], ends[tl]) for tl in common},
        lengths=lengths,
        meta={
            "recording_id": [fo.recording_id for fo in footers],
            "application_id": [fo.application_id for fo in footers],
            "_data_path": [
                os.path.relpath(fo.path, storage.root)
                if fo.path != storage.root
                else os.path.basename(fo.path)
                for fo in footers
            ],
        },
    )
    dataset.info["rerun.skipped_columns"] = skipped
    return dataset
