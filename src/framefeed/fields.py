"""Fields: what one sample holds, declared as data.

A `Field` names a column (``path``), how to decode it (``decode``) and, optionally, a `Window`
of frames around the sample's own frame. Windows follow LeRobot's semantics exactly: positions
outside the episode are clamped to its first or last frame, the value there is repeated, and a
``<key>_is_pad`` mask marks them.

Decoders work on whole batches. The planner hands each one a `FieldRequest` (which frames of
which segments, already clamped) and the decoder returns either a tensor whose first dimension
is the batch, or a list with one value per sample (``None`` for missing data). Decoders for
video add their frame requests to the batch's `BatchIO` and return the tensor that the engine
fills before the batch is handed out, so all cameras of a batch decode together.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from .catalog import Column, ColumnKind, Dataset
from .errors import ConfigError, FormatError
from .image import ImageBackend, decode_images, image_blobs
from .tracing import tracing_scope
from .video.engine import FrameRequest

if TYPE_CHECKING:
    from .table import ColumnStore

__all__ = [
    "BatchIO",
    "Decoder",
    "Field",
    "FieldRequest",
    "ImageDecoder",
    "NumericDecoder",
    "TaskDecoder",
    "TextDecoder",
    "VideoFrameDecoder",
    "Window",
    "check_decoder",
]

MAX_OFFSET = 1 << 62
"""Largest window offset (frames, steps or nanoseconds) that index arithmetic holds exactly."""


@dataclass(frozen=True, kw_only=True)
class Window:
    """Frames around the sample, as integer ``steps`` or LeRobot-style ``seconds``.

    ``Window(steps=(-1, 0))`` asks for the previous and the current frame.
    ``Window(seconds=(-1/30, 0.0))`` does the same at 30 fps; every delta must be a multiple of
    ``1/fps`` within ``tolerance_s`` (LeRobot's check), else `ConfigError`.
    """

    steps: tuple[int, ...] | None = None
    """Frame offsets relative to the sample's frame."""
    seconds: tuple[float, ...] | None = None
    """Time offsets in seconds, converted with the dataset's fps."""
    tolerance_s: float = 1e-4
    """How far a ``seconds`` delta may be from a whole frame."""

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise ConfigError("a Window needs exactly one of steps= or seconds=")
        name = "steps" if self.steps is not None else "seconds"
        values: Any = self.steps if self.steps is not None else self.seconds
        if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
            raise ConfigError(
                f"Window {name}= must be a sequence of numbers such as (-1, 0), not {values!r}"
            )
        if not len(values):
            raise ConfigError("a Window needs at least one offset")
        if self.steps is not None:
            bad = [v for v in values if not _is_int(v) or abs(int(v)) > MAX_OFFSET]
            if bad:
                raise ConfigError(
                    f"Window steps= must be whole numbers of frames within +-2**62, got {bad[0]!r}"
                    " (give times in seconds as Window(seconds=...))"
                )
        else:
            bad = [v for v in values if not isinstance(v, numbers.Real)]
            if bad:
                raise ConfigError(f"Window seconds= must be numbers, got {bad[0]!r}")
        object.__setattr__(self, name, tuple(values))
        tolerance: Any = self.tolerance_s
        if not (isinstance(tolerance, numbers.Real) and float(tolerance) > 0):
            raise ConfigError(
                f"Window tolerance_s must be a positive number, not {self.tolerance_s!r}"
            )

    def offsets(self, fps: float, key: str = "") -> np.ndarray:
        """The window as int64 frame offsets."""
        if self.steps is not None:
            return np.asarray([int(s) for s in self.steps], dtype=np.int64)
        assert self.seconds is not None
        out = []
        for delta in self.seconds:
            frames = float(delta) * fps
            if not math.isfinite(frames) or abs(frames) > MAX_OFFSET:
                raise ConfigError(
                    f"delta_timestamps[{key!r}]: {delta!r} is not a finite number of seconds "
                    "within the range of a frame offset"
                )
            if abs(frames - round(frames)) / fps > self.tolerance_s:
                raise ConfigError(
                    f"delta_timestamps[{key!r}]: {delta!r} s is not a multiple of 1/fps "
                    f"(fps={fps:g}) within tolerance_s={self.tolerance_s:g}; use multiples of "
                    f"{1 / fps:.6g} s"
                )
            out.append(round(frames))
        return np.asarray(out, dtype=np.int64)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class FieldRequest:
    """What a decoder must produce for one field and one batch."""

    dataset: Dataset
    column: Column | None
    """The column (``None`` for fields that are not backed by one, such as ``task``)."""
    key: str
    """Output key."""
    segments: np.ndarray
    """(B,) segment positions."""
    frames: np.ndarray
    """(B, T) clamped frame numbers inside each segment (T = 1 without a window)."""
    rows: np.ndarray
    """(B, T) rows of those frames in the `ColumnStore`."""
    windowed: bool
    """Whether the field has a window (keep the T axis) or not (drop it)."""
    store: ColumnStore
    tolerance_s: float


@dataclass(eq=False)
class BatchIO:
    """Shared I/O of one batch: video frame requests decoded together at the end, and the
    dataset's decode threads for decoders that work in parallel."""

    frames: list[FrameRequest] = field(default_factory=list)
    executor: Executor | None = None
    """The dataset's decode threads (``None``: decode in the calling thread)."""
    threads: int = 1
    """How many decodes may run at once (the size of ``executor``)."""


@runtime_checkable
class Decoder(Protocol):
    """Turns a `FieldRequest` into a batch tensor or a list of per-sample values."""

    def columns(self, request_column: Column | None) -> Sequence[str]:
        """Store columns this decoder reads (loaded before the first batch)."""
        ...

    def decode(self, request: FieldRequest, io: BatchIO) -> torch.Tensor | list[Any]:
        """Values for the batch: a tensor shaped (B, [T,] ...) or a list of B values."""
        ...


class NumericDecoder:
    """Numeric columns, gathered for the whole batch with one indexing operation."""

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return [request_column.path] if request_column is not None else []

    def decode(self, request: FieldRequest, io: BatchIO) -> torch.Tensor:
        assert request.column is not None
        values = request.store.get(request.column.path)
        rows = request.rows if request.windowed else request.rows[:, 0]
        return torch.from_numpy(values[rows])


class TaskDecoder:
    """The task string of each sample (from ``task_index``), as a list of ``str``."""

    def __init__(self, index_column: str = "task_index") -> None:
        self.index_column = index_column

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return [self.index_column]

    def decode(self, request: FieldRequest, io: BatchIO) -> list[Any]:
        tasks = request.dataset.tasks
        idx = request.store.get(self.index_column)[request.rows[:, 0]]
        out: list[Any] = []
        for b, i in enumerate(idx.tolist()):
            if not 0 <= i < len(tasks):
                ds = request.dataset
                raise FormatError(
                    f"{ds.root}: episode {int(ds.segment_ids[request.segments[b]])}, frame "
                    f"{int(request.frames[b, 0])}: {self.index_column} {i} has no task in the "
                    f"tasks table (meta/tasks.parquet holds {len(tasks)}); the tasks table does "
                    "not match the data files"
                )
            out.append(tasks[i])
        return out


class TextDecoder:
    """A string column, as a list of ``str`` (``None`` where the row is null)."""

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return [request_column.path] if request_column is not None else []

    def decode(self, request: FieldRequest, io: BatchIO) -> list[Any]:
        assert request.column is not None
        arr = request.store.get(request.column.path)
        rows = request.rows if request.windowed else request.rows[:, 0]
        picked = arr.take(rows.reshape(-1)).to_pylist()
        if not request.windowed:
            return list(picked)
        t = rows.shape[1]
        return [picked[i * t : (i + 1) * t] for i in range(rows.shape[0])]


class VideoFrameDecoder:
    """Frames of a video column as uint8 (B, [T,] 3, H, W), decoded by the batch engine.

    ``size=(H, W)`` resizes inside FFmpeg's scaler. A window of length 1 is squeezed to
    (B, 3, H, W), as LeRobot does for cameras.
    """

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        given: Any = size
        if given is not None and not (
            isinstance(given, Sequence)
            and len(given) == 2
            and all(_is_int(v) and int(v) > 0 for v in given)
        ):
            raise ConfigError(
                f"VideoFrameDecoder size must be (height, width) in positive pixels, not {size!r}"
            )
        self.size = (int(size[0]), int(size[1])) if size is not None else None

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return ["timestamp"]

    def decode(self, request: FieldRequest, io: BatchIO) -> torch.Tensor:
        col = request.column
        assert col is not None
        ds = request.dataset
        height, width = self.size if self.size is not None else (col.shape[0], col.shape[1])
        b, t = request.rows.shape
        out = torch.empty((b, t, 3, height, width), dtype=torch.uint8)
        flat = out.numpy().reshape(b * t, 3, height, width)
        segs = np.repeat(request.segments, t)
        # LeRobot queries the parquet timestamp of the (clamped) row, shifted into the file.
        times = ds.video_from[col.path][segs] + request.store.get("timestamp")[
            request.rows.reshape(-1)
        ].astype(np.float64)
        paths = ds.video_paths[col.path][segs]
        for path in np.unique(paths).tolist():
            sel = np.flatnonzero(paths == path)
            io.frames.append(
                FrameRequest(
                    path=path,
                    times=times[sel],
                    out=flat,
                    slots=sel,
                    describe=_describer(ds, col.path, segs[sel], request.frames.reshape(-1)[sel]),
                    declared=None if self.size is not None else f"meta/info.json ({col.path!r})",
                    segments=np.stack(
                        [ds.video_from[col.path][segs[sel]], ds.video_to[col.path][segs[sel]]],
                        axis=1,
                    ),
                )
            )
        if not request.windowed or t == 1:
            return out[:, 0]
        return out


def _describer(ds: Dataset, key: str, segs: np.ndarray, frames: np.ndarray) -> Any:
    def describe(i: int) -> str:
        return f"episode {int(ds.segment_ids[segs[i]])}, frame {int(frames[i])}, camera {key!r}"

    return describe


class ImageDecoder:
    """Encoded images (PNG/JPEG bytes, one per row) as uint8 (B, [T,] 3, H, W).

    A batch's images decode in parallel on ``threads`` of the dataset's decode threads
    (default: all of them, ``decode_threads``), JPEG through simplejpeg when installed
    (see `framefeed.image`; ``backend`` picks the library).
    """

    def __init__(
        self, *, threads: int | None = None, backend: ImageBackend = ImageBackend.AUTO
    ) -> None:
        if threads is not None and threads < 1:
            raise ConfigError(f"ImageDecoder threads must be at least 1, got {threads!r}")
        chosen: Any = backend
        if not isinstance(chosen, ImageBackend):
            choices = [b.value for b in ImageBackend]
            raise ConfigError(
                f"ImageDecoder backend must be an ImageBackend ({choices}), not {backend!r}"
            )
        self.threads = threads
        self.backend = backend

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return [request_column.path] if request_column is not None else []

    def decode(self, request: FieldRequest, io: BatchIO) -> torch.Tensor:
        col = request.column
        assert col is not None
        b, t = request.rows.shape
        height, width = col.shape[0], col.shape[1]
        out = torch.empty((b, t, 3, height, width), dtype=torch.uint8)
        rows = request.rows.reshape(-1)
        threads = self.threads if self.threads is not None else io.threads
        with tracing_scope("framefeed.decode", column=col.path, images=len(rows)):
            blobs = image_blobs(request.store.get(col.path), rows)
            decode_images(
                blobs,
                out.numpy().reshape(b * t, 3, height, width),
                describe=lambda i: f"{col.path} row {int(rows[i])}",
                threads=threads,
                backend=self.backend,
                pool=io.executor,
            )
        return out if request.windowed else out[:, 0]


def check_decoder(decoder: object, column: Column | None, key: str) -> None:
    """Refuse a decoder that is not one, or a built-in decoder given a column it cannot read."""
    if not isinstance(decoder, Decoder):
        raise ConfigError(
            f"field {key!r}: decode= must be a decoder (an object with columns() and decode(), "
            f"such as NumericDecoder()), not {decoder!r}"
        )
    kinds = {
        NumericDecoder: ColumnKind.NUMERIC,
        VideoFrameDecoder: ColumnKind.VIDEO,
        ImageDecoder: ColumnKind.IMAGE,
        TextDecoder: ColumnKind.TEXT,
    }
    kind = next((k for cls, k in kinds.items() if isinstance(decoder, cls)), None)
    if kind is None:
        return
    name = type(decoder).__name__
    if column is None:
        raise ConfigError(
            f"field {key!r}: {name} reads a {kind.value} column; the dataset has none"
        )
    if column.kind is not kind:
        raise ConfigError(
            f"field {key!r}: {name} reads {kind.value} columns, and {column.path!r} is a "
            f"{column.kind.value} column; leave decode= unset for the default decoder of its kind"
        )
    if kind in (ColumnKind.VIDEO, ColumnKind.IMAGE) and len(column.shape) != 3:
        raise ConfigError(
            f"field {key!r}: {name} needs the frame shape (H, W, C) of column {column.path!r}, "
            f"which has shape {list(column.shape)} (in-memory streams: give "
            "Stream(info={'shape': (H, W, 3)}))"
        )


def default_decoder(column: Column) -> Decoder:
    """The decoder framefeed uses for a column kind when a field names none."""
    if column.kind is ColumnKind.VIDEO:
        return VideoFrameDecoder()
    if column.kind is ColumnKind.IMAGE:
        return ImageDecoder()
    if column.kind is ColumnKind.NUMERIC:
        return NumericDecoder()
    if column.kind is ColumnKind.PACKETS:
        from .packet_field import PacketVideoDecoder  # it builds on this module's protocol

        return PacketVideoDecoder()
    return TextDecoder()


@dataclass(frozen=True)
class Field:
    """One output key of a sample.

    ``Field("action", window=Window(steps=tuple(range(16))))`` gives ``action`` of shape
    (16, D) plus ``action_is_pad``. ``decode`` defaults to the decoder of the column's kind;
    ``key`` defaults to ``path``.
    """

    path: str
    """Column the field reads (or a name, for decoders that need no column)."""
    decode: Decoder | None = None
    """Batch decoder; ``None`` picks the default for the column kind."""
    window: Window | Sequence[int] | None = None
    """Frames around the sample (a `Window`, or a sequence of integer steps)."""
    key: str | None = None
    """Output key; defaults to ``path``."""
    select: str | None = None
    """Path into nested values applied when the column is loaded (``"[0]"``, ``"pose.x"``): see
    `framefeed.select`. On LeRobot datasets it picks items of numeric vector and tensor features
    (``"[0:7]"``, ``"[-1]"``, ``"[::2]"``); windows and pad masks work as without it."""
    max_staleness: float | None = None
    """Recordings: how old the latest value may be (seconds on a time timeline, steps on a
    sequence timeline); older values are masked in ``<key>_is_pad`` or, with
    ``on_stale="drop"``, their samples leave the index."""
    on_stale: Literal["mask", "drop"] = "mask"
    """What a stale value does to its sample (see ``max_staleness``)."""

    def __post_init__(self) -> None:
        if self.on_stale not in ("mask", "drop"):
            raise ConfigError(f"field {self.out_key!r}: on_stale must be 'mask' or 'drop'")
        staleness: Any = self.max_staleness
        if staleness is not None and not (
            isinstance(staleness, numbers.Real) and float(staleness) >= 0
        ):
            raise ConfigError(
                f"field {self.out_key!r}: max_staleness must be a number >= 0, "
                f"not {self.max_staleness!r}"
            )

    @property
    def out_key(self) -> str:
        return self.key if self.key is not None else self.path

    def resolved_window(self) -> Window | None:
        if self.window is None or isinstance(self.window, Window):
            return self.window
        try:
            return Window(steps=self.window)  # type: ignore[arg-type]  # any sequence of ints
        except ConfigError as exc:
            raise ConfigError(f"field {self.out_key!r}: {exc}") from None
