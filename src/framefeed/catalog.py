"""The format-agnostic data model: a dataset is segments, timelines and columns.

Format readers (``framefeed.formats``) build these objects from metadata alone; everything above
the format layer (index, fields, plans, datasets) works with this model and never with file
layouts. Per-segment facts are kept as numpy arrays so that a million segments cost megabytes,
not a million Python objects; `Dataset.segment` builds a `Segment` view on demand.
"""

from __future__ import annotations

import copy
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from .storage import Storage
    from .streams import SegmentSource
    from .views import ViewSelection

__all__ = [
    "Column",
    "ColumnKind",
    "Dataset",
    "Segment",
    "Timeline",
    "TimelineKind",
    "VideoSpan",
]


class ColumnKind(enum.Enum):
    """What one column holds."""

    NUMERIC = "numeric"
    """Scalars, fixed-size vectors or small tensors, one per row."""
    IMAGE = "image"
    """Encoded image bytes (PNG/JPEG), one per row."""
    VIDEO = "video"
    """Frames inside container files (MP4), located through the segment's `VideoSpan`."""
    PACKETS = "packets"
    """Video as one compressed packet per row (H.264, HEVC, AV1); ``info["codec"]`` names it."""
    TEXT = "text"
    """Strings, one per row."""


class TimelineKind(enum.Enum):
    """How a timeline counts."""

    SEQUENCE = "sequence"
    """Integer steps (``frame_index``)."""
    TIME = "time"
    """Time in int64 nanoseconds (``timestamp``)."""


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """One index axis of a dataset."""

    name: str
    """Name of the timeline (also the column holding its values)."""
    kind: TimelineKind
    """Sequence (integer steps) or time (nanoseconds)."""
    rate_hz: float | None = None
    """Nominal rate when the timeline is regular (a LeRobot dataset's ``fps``)."""


@dataclass(frozen=True, kw_only=True)
class Column:
    """One stream of a dataset, addressed by its path."""

    path: str
    """Name of the stream, e.g. ``action`` or ``observation.images.top``."""
    kind: ColumnKind
    """What the column holds."""
    dtype: str
    """Stored dtype (a numpy dtype name; ``uint8`` for images and video)."""
    shape: tuple[int, ...]
    """Shape of one row's value as stored (``(H, W, C)`` for images and video)."""
    names: Any = None
    """Axis or element names from the metadata, as given."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """Format-specific extras (codec, pixel format, ...)."""


@dataclass(frozen=True, kw_only=True)
class VideoSpan:
    """Where one segment's frames of one camera live."""

    path: str
    """Container file, relative to the dataset root."""
    from_timestamp: float
    """Time inside the file (seconds) of the segment's first frame."""
    to_timestamp: float
    """Exclusive end of the segment inside the file (seconds)."""


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One episode or recording, as a read-only view of the dataset's per-segment arrays."""

    position: int
    """Position of the segment in the dataset (0-based)."""
    id: int
    """The format's identifier (LeRobot ``episode_index``)."""
    length: int
    """Number of rows (frames) on the primary timeline."""
    start_row: int
    """Global row of the segment's first frame (LeRobot ``dataset_from_index``)."""
    tasks: tuple[str, ...]
    """Task strings of the segment."""
    data_path: str
    """Data file holding the segment's rows, relative to the root."""
    videos: Mapping[str, VideoSpan]
    """Per video column, where the frames live."""
    meta: Mapping[str, Any]
    """Every other per-segment metadata value."""


class Dataset:
    """An opened dataset: columns, timelines and segments, plus the storage they live in.

    Built by a format reader; users get one from `framefeed.open_dataset`.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        format_name: str,
        version: str,
        fps: float,
        columns: Mapping[str, Column],
        timelines: Sequence[Timeline],
        tasks: Sequence[str],
        segments: pa.Table,
        info: Mapping[str, Any],
        source: SegmentSource | None = None,
    ) -> None:
        self.storage = storage
        self.format_name = format_name
        self.version = version
        self.fps = float(fps)
        self.columns: dict[str, Column] = dict(columns)
        self.timelines: tuple[Timeline, ...] = tuple(timelines)
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.info: dict[str, Any] = dict(info)
        self._table = segments
        self.source = source
        self.selection: ViewSelection | None = None
        """The segments (and frame ranges) a view keeps; ``None``: the whole dataset."""
        self.segment_ids = _int_column(segments, "episode_index")
        self.lengths = _int_column(segments, "length")
        names = segments.column_names
        if "dataset_from_index" in names:
            self.start_rows = _int_column(segments, "dataset_from_index")
        else:
            self.start_rows = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        paths = segments.column("_data_path").to_pylist() if "_data_path" in names else None
        self.data_paths = np.asarray(paths or [""] * len(self.lengths), dtype=object)
        self.ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {
            t.name: (
                _int_column(segments, f"{t.name}/start"),
                _int_column(segments, f"{t.name}/end"),
            )
            for t in self.timelines
            if f"{t.name}/start" in names
        }
        self.video_paths: dict[str, np.ndarray] = {}
        self.video_from: dict[str, np.ndarray] = {}
        self.video_to: dict[str, np.ndarray] = {}
        for key in self.video_keys:
            self.video_paths[key] = np.asarray(
                segments.column(f"_video_path/{key}").to_pylist(), dtype=object
            )
            self.video_from[key] = segments.column(f"videos/{key}/from_timestamp").to_numpy()
            self.video_to[key] = segments.column(f"videos/{key}/to_timestamp").to_numpy()

    def __repr__(self) -> str:
        if self.selection is not None:
            from .views import describe

            return describe(self)
        return (
            f"Dataset({self.storage.root!r}, format={self.format_name} {self.version}, "
            f"segments={self.num_segments}, frames={self.num_frames}, fps={self.fps:g})"
        )

    @property
    def is_recording(self) -> bool:
        """Whether columns have rows of their own (a multi-rate `SegmentSource`), not frames."""
        return self.source is not None

    def timeline(self, name: str) -> Timeline:
        """The timeline called ``name``; a `ConfigError` lists the known ones otherwise."""
        for t in self.timelines:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.timelines)
        raise ConfigError(f"{self.root}: no timeline {name!r}; timelines are: {known}")

    @property
    def root(self) -> str:
        return self.storage.root

    @property
    def num_segments(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())

    @property
    def selected_positions(self) -> np.ndarray:
        """Positions of the segments this dataset (or view) serves, ascending."""
        if self.selection is None:
            return np.arange(self.num_segments, dtype=np.int64)
        return self.selection.positions

    def segments_table(self) -> pa.Table:
        """Per-segment metadata of every segment (not only a view's): id, length, duration,
        tasks, file locations, every per-segment column the format stores and joined columns.
        """
        from .views import segments_table

        return segments_table(self)

    def filter(self, expression: Any = None, *, sql: str | None = None) -> Dataset:
        """A view of the segments whose metadata matches a ``pyarrow.compute`` expression
        (``pc.field("length") > 100``) or, with DuckDB installed, an SQL condition
        (``sql="length > 100 AND list_contains(tasks, 'pick')"``)."""
        from .views import filter_view

        return filter_view(self, expression, sql)

    def select(
        self,
        episodes: Sequence[int] | None = None,
        frames: Mapping[int, tuple[int, int]] | None = None,
    ) -> Dataset:
        """A view of the listed episode ids; ``frames`` keeps ``[start, stop)`` of some."""
        from .views import select_view

        return select_view(self, episodes, frames)

    def with_metadata(self, table: pa.Table, on: str = "episode_index") -> Dataset:
        """This dataset with the columns of ``table`` joined by segment id (``on``).

        Segments that ``table`` does not list get nulls. The new columns can be filtered on.
        """
        import pyarrow as pa

        if not isinstance(table, pa.Table):
            raise ConfigError(
                "with_metadata takes a pyarrow.Table (pa.table({...})), "
                f"not {type(table).__name__}"
            )
        if on not in table.column_names:
            raise ConfigError(f"with_metadata: the table has no column {on!r} to join on")
        if not pa.types.is_integer(table.schema.field(on).type):
            raise ConfigError(
                f"with_metadata: column {on!r} must hold integer segment ids, "
                f"not {table.schema.field(on).type}"
            )
        ids = np.asarray(table.column(on).to_numpy(zero_copy_only=False), dtype=np.int64)
        if np.unique(ids).size != ids.size:
            raise ConfigError(f"with_metadata: column {on!r} repeats segment ids")
        clash = [c for c in table.column_names if c != on and c in self._table.column_names]
        if clash:
            raise ConfigError(f"with_metadata: columns {clash} already exist")
        order = np.argsort(ids)
        where = np.searchsorted(ids, self.segment_ids, sorter=order).clip(0, max(len(ids) - 1, 0))
        rows = order[where] if len(ids) else where
        found = ids[rows] == self.segment_ids if len(ids) else np.zeros(len(rows), dtype=bool)
        take = pa.array(rows, mask=~found)
        joined = self._table
        for name in table.column_names:
            if name != on:
                joined = joined.append_column(name, table.column(name).take(take))
        out = copy.copy(self)
        out._table = joined
        return out

    def save_view(self, name: str, folder: str | os.PathLike[str] | None = None) -> str:
        """Save this view (or the whole dataset) under ``name``; see `framefeed.open_view`."""
        from .views import save_view

        return save_view(self, name, folder)

    @property
    def video_keys(self) -> list[str]:
        """Video columns, in feature order."""
        return [c.path for c in self.columns.values() if c.kind is ColumnKind.VIDEO]

    @property
    def image_keys(self) -> list[str]:
        return [c.path for c in self.columns.values() if c.kind is ColumnKind.IMAGE]

    @property
    def metadata(self) -> pa.Table:
        """Per-segment metadata as an Arrow table (one row per segment)."""
        return self._table

    def column(self, path: str) -> Column:
        """The column called ``path``; a `ConfigError` lists the known ones otherwise."""
        try:
            return self.columns[path]
        except KeyError:
            known = ", ".join(self.columns)
            raise ConfigError(f"{self.root}: no column {path!r}; columns are: {known}") from None

    def position_of(self, segment_id: int) -> int:
        """Position of the segment whose id is ``segment_id``."""
        hits = np.flatnonzero(self.segment_ids == segment_id)
        if hits.size == 0:
            raise ConfigError(
                f"{self.root}: no episode {segment_id} (the dataset has {self.num_segments} "
                f"episodes with ids {int(self.segment_ids.min())}..{int(self.segment_ids.max())})"
            )
        return int(hits[0])

    def segment_range(self, timeline: str, position: int) -> tuple[int, int]:
        """First and last index value (inclusive) of a segment on ``timeline``."""
        if timeline not in self.ranges:
            raise ConfigError(f"{self.root}: no per-segment range for timeline {timeline!r}")
        start, end = self.ranges[timeline]
        return int(start[position]), int(end[position])

    def segment(self, position: int) -> Segment:
        """A `Segment` view of the segment at ``position``."""
        if not 0 <= position < self.num_segments:
            raise IndexError(f"segment position {position} out of range [0, {self.num_segments})")
        row = self._table.slice(position, 1).to_pylist()[0]
        videos = {
            key: VideoSpan(
                path=str(self.video_paths[key][position]),
                from_timestamp=float(self.video_from[key][position]),
                to_timestamp=float(self.video_to[key][position]),
            )
            for key in self.video_keys
        }
        return Segment(
            position=position,
            id=int(self.segment_ids[position]),
            length=int(self.lengths[position]),
            start_row=int(self.start_rows[position]),
            tasks=tuple(row.get("tasks") or ()),
            data_path=str(self.data_paths[position]),
            videos=videos,
            meta={k: v for k, v in row.items() if not k.startswith("_")},
        )


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(), dtype=np.int64)
