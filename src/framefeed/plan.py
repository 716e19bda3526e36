"""Batch read plans: from sample numbers and fields to the batch's values, in one pass.

`resolve_fields` turns user input (fields, LeRobot ``delta_timestamps``) into `PlannedField`s
with integer offsets (frames for LeRobot; index units, nanoseconds or steps, for recordings).
`BatchPlanner.run` maps a batch of sample numbers to segments and positions, applies every
window (clamp to the segment, pad mask), finds each column's rows (LeRobot: the frame's row;
recordings: the latest row at or before the index value), gathers tabular values with one
indexing operation per column, and collects every video frame of every camera into one call of
the video engine, which sorts them per file and decodes each needed GOP once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .align import RecordingStore
from .catalog import Column, ColumnKind, Dataset, TimelineKind
from .errors import ConfigError, FormatError
from .fields import (
    MAX_OFFSET,
    BatchIO,
    Decoder,
    Field,
    FieldRequest,
    TaskDecoder,
    Window,
    check_decoder,
    default_decoder,
)
from .index import NS_PER_S, Grid, SampleIndex
from .table import ColumnStore, select_column
from .tracing import tracing_scope
from .video.engine import VideoEngine

__all__ = ["BatchPlanner", "PlannedField", "build_index", "default_fields", "resolve_fields"]


@dataclass(frozen=True, eq=False)
class PlannedField:
    """A field with its column, decoder and integer window resolved."""

    key: str
    column: Column | None
    decoder: Decoder
    offsets: np.ndarray | None
    """int64 offsets (frames, or index units for recordings), or ``None`` for the sample's own
    position without a T axis."""
    max_staleness: int | None = None
    """Recordings: largest age (index units) of a value that is not masked."""
    drop_stale: bool = False
    """Recordings: samples whose own value is stale leave the index."""
    select: str | None = None
    """Path into nested values (`framefeed.select`), applied when the column is loaded."""

    @property
    def pad_key(self) -> str:
        return f"{self.key}_is_pad"


def default_fields(dataset: Dataset) -> list[Field]:
    """Every feature as LeRobot returns it: cameras first, then columns, then ``task``.

    For a recording: every column, in the order the format lists them.
    """
    if dataset.is_recording:
        return [Field(c.path) for c in dataset.columns.values()]
    videos = [Field(k) for k in dataset.video_keys]
    others = [Field(c.path) for c in dataset.columns.values() if c.kind is not ColumnKind.VIDEO]
    return [*videos, *others, Field("task", decode=TaskDecoder())]


def resolve_fields(
    dataset: Dataset,
    fields: Sequence[Field] | None,
    delta_timestamps: Mapping[str, Sequence[float]] | None,
    tolerance_s: float,
    grid: Grid | None = None,
) -> list[PlannedField]:
    """Fields to `PlannedField`s; ``delta_timestamps`` adds windows to the fields it names.

    ``grid`` (recordings) gives the index timeline: windows become offsets in its units.
    """
    if fields is not None and (isinstance(fields, str | Field) or not isinstance(fields, Sequence)):
        raise ConfigError(f"fields must be a list of Field objects, not {fields!r}")
    chosen = list(fields) if fields is not None else default_fields(dataset)
    if not chosen:
        raise ConfigError("fields is empty: name at least one Field (or pass None for all)")
    for f in chosen:
        if not isinstance(f, Field):
            raise ConfigError(
                f"fields must be Field objects, got {f!r} (write Field({f!r}) for a column)"
            )
    by_key = {f.out_key: f for f in chosen}
    if len(by_key) != len(chosen):
        raise ConfigError("two fields have the same output key")
    if delta_timestamps is not None and not isinstance(delta_timestamps, Mapping):
        raise ConfigError(
            "delta_timestamps must map keys to lists of seconds, such as "
            f"{{'action': [0.0, 1 / 30]}}, not {delta_timestamps!r}"
        )
    deltas = dict(delta_timestamps or {})
    unknown = [k for k in deltas if k not in by_key]
    if unknown:
        raise ConfigError(
            f"delta_timestamps names {unknown}, which are not fields of this dataset; "
            f"fields are: {list(by_key)}"
        )
    planned = []
    for f in chosen:
        window = f.resolved_window()
        if f.out_key in deltas:
            if window is not None:
                raise ConfigError(f"field {f.out_key!r} has a window and a delta_timestamps entry")
            seconds: Any = deltas[f.out_key]
            try:
                window = Window(seconds=seconds, tolerance_s=tolerance_s)
            except ConfigError as exc:
                raise ConfigError(f"delta_timestamps[{f.out_key!r}]: {exc}") from None
        column = dataset.columns.get(f.path)
        if column is None and f.decode is None:
            raise ConfigError(
                f"field {f.out_key!r}: the dataset has no column {f.path!r} "
                f"(columns: {list(dataset.columns)})"
            )
        decoder = f.decode if f.decode is not None else default_decoder(column)  # type: ignore[arg-type]
        check_decoder(decoder, column, f.out_key)
        if window is not None and isinstance(decoder, TaskDecoder):
            raise ConfigError(
                f"field {f.out_key!r}: a task is one string per sample; windows do not apply "
                "(remove its window or delta_timestamps entry)"
            )
        if grid is None:
            if f.select is not None and column is None:
                raise ConfigError(
                    f"field {f.out_key!r}: select needs a column, and the dataset has no column "
                    f"{f.path!r} (columns: {list(dataset.columns)})"
                )
            if f.select is not None and column is not None:
                select_column(column, f.select, f.out_key)  # every error now, not at a batch
            if f.max_staleness is not None:
                raise ConfigError(
                    f"field {f.out_key!r}: max_staleness applies to recordings, whose columns "
                    f"have rows of their own; every column of {dataset.root} has a row per frame"
                )
            offsets = window.offsets(dataset.fps, f.out_key) if window is not None else None
            planned.append(
                PlannedField(
                    key=f.out_key, column=column, decoder=decoder, offsets=offsets, select=f.select
                )
            )
            continue
        if column is not None and column.kind is ColumnKind.VIDEO:
            raise ConfigError(f"field {f.out_key!r}: container video in recordings is not served")
        offsets = _grid_offsets(window, grid, f.out_key) if window is not None else None
        stale = None
        if f.max_staleness is not None:
            stale = _grid_units(f.max_staleness, grid, f"field {f.out_key!r}: max_staleness")
        planned.append(
            PlannedField(
                key=f.out_key,
                column=column,
                decoder=decoder,
                offsets=offsets,
                max_staleness=stale,
                drop_stale=stale is not None and f.on_stale == "drop",
                select=f.select if column is not None else None,
            )
        )
    return planned


def build_index(
    dataset: Dataset,
    base: SampleIndex,
    fields: Sequence[PlannedField],
    grid: Grid | None,
    window_mode: str,
) -> tuple[SampleIndex, RecordingStore | None]:
    """The sample index after window trimming (``window_mode="trim"``) and stale drops.

    Trimming keeps only samples whose every window lies inside the segment; ``drop`` fields
    remove samples whose own value is older than ``max_staleness``. That reads those columns
    into a `RecordingStore`, returned so that the planner can serve from it instead of reading
    them again (None when nothing was read).
    """
    index = base
    windowed = [f for f in fields if f.offsets is not None]
    if window_mode == "trim" and windowed:
        lo = min(int(f.offsets.min()) for f in windowed if f.offsets is not None)
        hi = max(int(f.offsets.max()) for f in windowed if f.offsets is not None)
        step = grid.step if grid is not None else 1
        before = -(-max(0, -lo) // step)  # positions lost at the start (ceil)
        if grid is not None:
            last = (grid.end - grid.start - max(0, hi)) // step
        else:
            last = dataset.lengths - 1 - max(0, hi)
        counts = np.maximum(last - before + 1, 0)
        widest = max(windowed, key=lambda f: int(np.ptp(f.offsets)) if f.offsets is not None else 0)
        span = _describe_span(lo, hi, grid)
        longest = int(base.segments[np.argmax(base.lengths)]) if base.num_segments else 0
        index = base.restricted(
            counts,
            np.full(dataset.num_segments, before, dtype=np.int64),
            f"window_mode='trim' and the windows span {span} (widest: field {widest.key!r}); "
            f"no selected segment is that long (longest: segment "
            f"{int(dataset.segment_ids[longest]) if dataset.num_segments else '-'}, "
            f"{_describe_span(0, int(base.lengths.max(initial=1)) * step - step, grid)})",
        )
    drops = [f for f in fields if f.drop_stale]
    store = None
    if drops and grid is not None:
        store = RecordingStore(dataset, np.sort(index.segments), grid.timeline)
        keep = np.ones(len(index), dtype=bool)
        every = np.arange(len(index), dtype=np.int64)
        segs, steps = index.locate(every)
        t = grid.values(segs, steps)
        for f in drops:
            assert f.column is not None and f.max_staleness is not None
            rows = store.latest_at(f.column.path, segs, t)
            age = t - store.index_values(f.column.path)[np.maximum(rows, 0)]
            keep &= (rows >= 0) & (age <= f.max_staleness)
        names = ", ".join(repr(f.key) for f in drops)
        index = index.filtered(keep, f"every sample has a stale value of {names}")
    return index, store


def _describe_span(lo: int, hi: int, grid: Grid | None) -> str:
    if grid is not None and grid.kind is TimelineKind.TIME:
        return f"[{lo / NS_PER_S:g} s, {hi / NS_PER_S:g} s]"
    unit = "frames" if grid is None else "steps"
    return f"[{lo}, {hi}] {unit}"


def _grid_units(value: float, grid: Grid, what: str) -> int:
    """Seconds (time timelines) or steps (sequence timelines) in index units."""
    if grid.kind is TimelineKind.TIME:
        return round(float(value) * NS_PER_S)
    if float(value) != int(value):
        raise ConfigError(f"{what}: {value!r} is not a whole number of steps of {grid.timeline!r}")
    return int(value)


def _grid_offsets(window: Window, grid: Grid, key: str) -> np.ndarray:
    """A window as offsets on the index timeline.

    On a time timeline ``seconds`` are exact and ``steps`` count sampling periods; on a
    sequence timeline only ``steps`` apply.
    """
    if window.seconds is not None:
        if grid.kind is not TimelineKind.TIME:
            raise ConfigError(
                f"field {key!r}: timeline {grid.timeline!r} counts steps; give the window "
                "as Window(steps=...)"
            )
        offsets = [
            round(s * NS_PER_S) if math.isfinite(s) else MAX_OFFSET + 1 for s in window.seconds
        ]
    else:
        assert window.steps is not None  # a Window has one of the two
        offsets = [int(s) * grid.step for s in window.steps]
    if any(abs(o) > MAX_OFFSET for o in offsets):
        raise ConfigError(
            f"field {key!r}: a window offset of {window.seconds or window.steps} is beyond the "
            f"range of timeline {grid.timeline!r} (+-2**62 index units); use offsets within "
            "the recordings' length"
        )
    return np.asarray(offsets, dtype=np.int64)


class BatchPlanner:
    """Serves batches of samples of one `SampleIndex` with a fixed list of fields."""

    def __init__(
        self,
        dataset: Dataset,
        index: SampleIndex,
        fields: Sequence[PlannedField],
        engine: VideoEngine,
        tolerance_s: float,
        grid: Grid | None = None,
        store: RecordingStore | None = None,
    ) -> None:
        """``store`` (recordings): a store that already holds some columns (`build_index`
        returns one); used when it covers exactly the index's segments."""
        self.dataset = dataset
        self.index = index
        self.fields = list(fields)
        self.engine = engine
        self.tolerance_s = tolerance_s
        self.grid = grid
        self.store: ColumnStore | RecordingStore
        if grid is not None:
            positions = np.sort(index.segments)
            if store is None or not np.array_equal(store.positions, positions):
                store = RecordingStore(dataset, positions, grid.timeline)
            self.store = store
        else:
            self.store = ColumnStore(dataset, np.sort(index.segments))
        # A field's select reads a column derived from its own, made (and cached) by the store.
        self.fields = [
            replace(f, column=self.store.derive(f.column, f.select))
            if f.select is not None and f.column is not None
            else f
            for f in self.fields
        ]

    def store_columns(self) -> list[str]:
        cols: list[str] = []
        for f in self.fields:
            cols.extend(f.decoder.columns(f.column))
        return list(dict.fromkeys(cols))

    def run(self, indices: Iterable[int] | np.ndarray) -> dict[str, Any]:
        """Values for a batch: tensors (B, ...) or lists of B values, then the pad masks."""
        with tracing_scope("framefeed.plan"):
            if self.grid is not None:
                idx = indices if isinstance(indices, np.ndarray) else list(indices)
                return self._run_recording(np.asarray(idx, dtype=np.int64))
            return self._run_frames(indices)

    def _run_frames(self, indices: Iterable[int] | np.ndarray) -> dict[str, Any]:
        segs, frames = self.index.locate(indices)
        assert isinstance(self.store, ColumnStore)
        self.store.load(self.store_columns())
        lengths = self.dataset.lengths[segs][:, None]
        placed: list[_Placed] = []
        for f in self.fields:
            pad = None
            if f.offsets is None:
                wanted = frames[:, None]
            else:
                wanted = frames[:, None] + f.offsets[None, :]
                pad = (wanted < 0) | (wanted >= lengths)
                wanted = np.clip(wanted, 0, lengths - 1)
            placed.append(_Placed(f, wanted, self.store.rows(segs[:, None], wanted), pad))
        return self._decode(segs, placed)

    def _run_recording(self, indices: np.ndarray) -> dict[str, Any]:
        grid = self.grid
        store = self.store
        assert grid is not None and isinstance(store, RecordingStore)
        segs, steps = self.index.locate(indices)
        store.load(self.store_columns())
        t0 = grid.values(segs, steps)
        lo = grid.start[segs][:, None]
        hi = grid.end[segs][:, None]
        placed: list[_Placed] = []
        for f in self.fields:
            offsets = f.offsets if f.offsets is not None else np.zeros(1, dtype=np.int64)
            t = t0[:, None] + offsets[None, :]
            clamped = np.clip(t, lo, hi)
            pad = (t < lo) | (t > hi)
            rows = np.zeros_like(t)
            if f.column is not None:
                rows, missing = _aligned_rows(store, f, segs, clamped)
                pad |= missing
                if f.max_staleness is not None:
                    age = clamped - store.index_values(f.column.path)[rows]
                    pad |= age > f.max_staleness
            # Every recording field has a mask: any value may be missing or stale.
            placed.append(_Placed(f, clamped, rows, pad if f.offsets is not None else pad[:, 0]))
        values = self._decode(segs, placed)
        values["episode_index"] = torch.from_numpy(self.dataset.segment_ids[segs])
        values[grid.timeline] = torch.from_numpy(t0)
        values["index"] = torch.from_numpy(indices.copy())
        return values

    def _decode(self, segs: np.ndarray, placed: list[_Placed]) -> dict[str, Any]:
        """Run every field's decoder on its rows, then the batch's video decode; add masks."""
        io = BatchIO(executor=self.engine.executor(), threads=self.engine.threads)
        values: dict[str, Any] = {}
        pads: dict[str, torch.Tensor] = {}
        for p in placed:
            f = p.field
            request = FieldRequest(
                dataset=self.dataset,
                column=f.column,
                key=f.key,
                segments=segs,
                frames=p.positions,
                rows=p.rows,
                windowed=f.offsets is not None,
                store=self.store,  # type: ignore[arg-type]
                tolerance_s=self.tolerance_s,
            )
            values[f.key] = f.decoder.decode(request, io)
            if p.pad is not None:
                pads[f.pad_key] = torch.from_numpy(p.pad)
        if io.frames:
            self.engine.decode(io.frames, tolerance_s=self.tolerance_s)
        _fill_missing(values, pads, self.fields)
        values.update(pads)
        return values


@dataclass(frozen=True, eq=False)
class _Placed:
    """Where one field of a batch reads: positions, store rows and the pad mask (if any)."""

    field: PlannedField
    positions: np.ndarray
    rows: np.ndarray
    pad: np.ndarray | None


def _aligned_rows(
    store: RecordingStore, f: PlannedField, segs: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Latest-at rows of ``f``'s column; rows before the first value point at the first one.

    Returns the rows and a mask of the values that do not exist yet at ``t``.
    """
    assert f.column is not None
    path = f.column.path
    rows = store.latest_at(path, segs[:, None], t)
    missing = rows < 0
    if missing.any():
        first, end = store.segment_rows(path, segs)
        empty = first == end
        if empty.any():
            seg = int(store.dataset.segment_ids[segs[np.flatnonzero(empty)[0]]])
            expr = f.column.info.get("select")
            if expr is not None:
                base = f.column.info.get("select_base")
                raise FormatError(
                    f"{store.dataset.root}: field {f.key!r}: select {expr!r} of column {base!r} "
                    f"gives no value in any row of segment {seg} (an index past the end of "
                    "every row?); check the expression against the column's values"
                )
            raise FormatError(
                f"{store.dataset.root}: segment {seg} has no rows of column {path!r}; "
                f"select segments that have it (or drop field {f.key!r})"
            )
        rows = np.where(missing, first[:, None], rows)
    return rows, missing


def _fill_missing(
    values: dict[str, Any], pads: dict[str, torch.Tensor], fields: Sequence[PlannedField]
) -> None:
    """Lists from decoders that hold ``None`` become zero-filled tensors plus a pad mask.

    Only lists whose other entries are tensors are filled; lists of strings stay as they are.
    """
    for f in fields:
        vals = values[f.key]
        if not isinstance(vals, list) or all(v is not None for v in vals):
            continue
        proto = next((v for v in vals if v is not None), None)
        if not isinstance(proto, torch.Tensor):
            continue
        missing = torch.tensor([v is None for v in vals])
        values[f.key] = torch.stack([v if v is not None else torch.zeros_like(proto) for v in vals])
        if f.pad_key in pads:
            pads[f.pad_key] |= missing[:, None]
        else:
            pads[f.pad_key] = missing
