"""Rerun recordings (``.rrd``) as a framefeed dataset: one recording file per segment.

Everything is read through rerun-sdk's own chunk API (``rerun.chunk.RrdReader``): opening a
dataset reads each file's footer (its chunk manifest) and nothing else, apart from one small probe
per column in the first recording that has it (``formats/rerun_columns.py``: the shape of a
numeric row, the size of an image or video frame, the static media type or codec).
`RerunSource.read` then loads only the chunks of the requested columns of one recording.

Column paths keep Rerun's form, ``<entity path>:<component>``, e.g.
``/camera:EncodedImage:blob``; see ``rerun_columns`` for the kinds. Static components and
recording properties are not columns; other component types are left out (listed in
``dataset.info["rerun.skipped_columns"]``).

Rows come back as Rerun logged them: rows where a column was not logged (null) are left out, rows
are sorted by index value and, for equal values, by Rerun's row id, so the last of several rows
logged at one index value is the one latest-at picks, as in Rerun's own queries.

`describe_recordings` turns the lazy chunk stores of some recordings into columns, timelines,
ranges and lengths; the catalog server reader (``formats/rerun_catalog.py``) uses it too, on the
stores of a server's segments.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import Column, Dataset, Timeline, TimelineKind
from ..errors import FormatError
from ..storage import Storage
from ..streams import recording_dataset
from .rerun_columns import PROPERTIES, classify, field_meta, probe
from .rerun_source import ColumnSpec, RerunSource, import_rerun, index_int64

__all__ = ["Footer", "Layout", "RerunSource", "describe_recordings", "is_rerun", "open_rerun"]


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
class Footer:
    """What the chunk manifest of one recording tells (a file's footer, or a server's segment)."""

    where: str
    """The recording in messages: its file, or its server and segment id."""
    recording_id: str
    fields: dict[str, pa.Field] = field(default_factory=dict)
    timelines: dict[str, TimelineKind] = field(default_factory=dict)
    extent: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    """Per (column, timeline): first and last index value and number of rows."""

    @classmethod
    def of_store(cls, store: Any, where: str, recording_id: str) -> Footer:
        """The footer of a ``rerun.chunk.LazyStore`` (schema and chunk manifest; no chunk)."""
        out = cls(where, recording_id)
        for f in store.schema().to_arrow():
            kind = field_meta(f, "rerun:kind")
            if kind == "index":
                out.timelines[f.name] = (
                    TimelineKind.SEQUENCE if pa.types.is_integer(f.type) else TimelineKind.TIME
                )
            elif (
                kind == "data"
                and field_meta(f, "rerun:is_static") != "true"
                and field_meta(f, "rerun:entity_path") != PROPERTIES
            ):
                out.fields[f.name] = f
        out.extent = _extent(store, out)
        return out


def _file_footer(rr: Any, path: str) -> tuple[Footer, str]:
    """The footer and application id of the one recording in the ``.rrd`` file ``path``."""
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
    return Footer.of_store(store, path, entries[0].recording_id), entries[0].application_id


def _extent(store: Any, footer: Footer) -> dict[tuple[str, str], tuple[int, int, int]]:
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
        rows = temporal & (entity == field_meta(f, "rerun:entity_path"))
        component = field_meta(f, "rerun:component")
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


def _scan_extent(store: Any, footer: Footer) -> dict[tuple[str, str], tuple[int, int, int]]:
    """`_extent` by reading every temporal chunk's index columns (slow: loads the chunks)."""
    acc: dict[tuple[str, str], list[int]] = {}
    by_key = {
        (field_meta(f, "rerun:entity_path"), field_meta(f, "rerun:component")): name
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


@dataclass
class Layout:
    """Columns, timelines, ranges and lengths of some recordings (`describe_recordings`)."""

    specs: dict[str, ColumnSpec]
    columns: list[Column]
    skipped: list[str]
    timelines: list[Timeline]
    ranges: dict[str, tuple[list[int], list[int]]]
    lengths: list[int]


def describe_recordings(
    footers: Sequence[Footer], open_store: Callable[[int], Any], root: str
) -> Layout:
    """Columns (probed in the first recording that has each: ``open_store(position)``), the
    timelines every recording has, each recording's range on them over framefeed's columns, and
    its length (rows of its densest column)."""
    common = [tl for tl in footers[0].timelines if all(tl in fo.timelines for fo in footers)]
    if not common:
        raise FormatError(f"{root}: the recordings share no timeline")
    names: dict[str, pa.Field] = {}
    for fo in footers:
        for name, f in fo.fields.items():
            names.setdefault(name, f)
    specs: dict[str, ColumnSpec] = {}
    columns: list[Column] = []
    skipped: list[str] = []
    for name, f in names.items():
        kind = classify(f)
        if kind is None:
            skipped.append(name)
            continue
        home = next(
            (p for p, fo in enumerate(footers) if any((name, tl) in fo.extent for tl in common)), 0
        )
        where = f"{footers[home].where}: column {name!r}"
        spec, shape, info, dtype = probe(open_store(home), where, f, kind, set(names))
        specs[name] = spec
        columns.append(Column(path=name, kind=kind, dtype=dtype, shape=shape, info=info))
    ranges: dict[str, tuple[list[int], list[int]]] = {tl: ([], []) for tl in common}
    lengths: list[int] = []
    for fo in footers:
        for tl in common:
            got = [fo.extent[(c, tl)] for c in specs if (c, tl) in fo.extent]
            if not got:
                raise FormatError(
                    f"{fo.where}: recording {fo.recording_id!r} has no rows on timeline {tl!r}"
                )
            ranges[tl][0].append(min(g[0] for g in got))
            ranges[tl][1].append(max(g[1] for g in got))
        lengths.append(max(fo.extent.get((c, common[0]), (0, 0, 0))[2] for c in specs))
    return Layout(
        specs=specs,
        columns=columns,
        skipped=skipped,
        timelines=[Timeline(name=tl, kind=footers[0].timelines[tl]) for tl in common],
        ranges=ranges,
        lengths=lengths,
    )


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
    read = [_file_footer(rr, path) for path in files]
    footers = [fo for fo, _ in read]
    layout = describe_recordings(
        footers, lambda pos: rr.chunk.RrdReader(files[pos]).store(), storage.root
    )
    dataset = recording_dataset(
        source=RerunSource(
            files,
            [fo.recording_id for fo in footers],
            layout.specs,
            [t.name for t in layout.timelines],
        ),
        root=storage.root,
        format_name="rerun",
        version=str(rr.__version__),
        columns=layout.columns,
        timelines=layout.timelines,
        segment_ids=list(range(len(footers))),
        ranges=layout.ranges,
        lengths=layout.lengths,
        fingerprint=_fingerprint(storage.root, files, str(rr.__version__)),
        meta={
            "recording_id": [fo.recording_id for fo in footers],
            "application_id": [app for _, app in read],
            "_data_path": [
                os.path.relpath(path, storage.root)
                if path != storage.root
                else os.path.basename(path)
                for path in files
            ],
        },
    )
    dataset.info["rerun.skipped_columns"] = layout.skipped
    return dataset


def _fingerprint(root: str, files: Sequence[str], version: str) -> str:
    """This version of the recordings: the folder, rerun-sdk's version and each ``.rrd`` file's
    name, size and modification time (a rewritten file gets a new fingerprint)."""
    stats = []
    for path in files:
        st = os.stat(path)
        stats.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    blob = json.dumps([os.path.abspath(root), version, stats])
    return hashlib.sha256(blob.encode()).hexdigest()
