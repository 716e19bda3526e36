"""Packet video: frames of a column that holds one compressed video sample per row.

`PacketDecoder.decode` serves a batch of target rows. For each distinct target it finds an
*anchor*, the nearest row at or before it, inside its segment, where decoding can start:

1. a keyframe known from the sibling keyframe array (``True``/``False`` per row; unknown rows
   fall through to the next source),
2. else a keyframe known from the packet itself (`bitstream.packet_keyframe`),
3. else, when rows say nothing, a window of ``keyframe_interval`` rows ending at the target
   (``max(segment start, target - interval + 1)``: with a keyframe at least every ``interval``
   rows, such a window holds one), or the segment start without an interval.

Anchors of kind 3 are *guarded*: decoding starts on a row that is probably not a keyframe, so
the decoder's errors before its first key frame are expected and ignored, and a frame is accepted
only when it was produced at or after (in rows) the first frame the decoder itself flagged as a
key frame. FFmpeg's H.264, HEVC and dav1d decoders refuse pictures whose references they do not
have (they raise, or hold the picture back), so "produced after a key frame" is what makes a
frame trustworthy; a target with no key frame in its window is ``None``. Anchors of kinds 1 and
2 are exact: any decoder error there is a `DecodeError` naming the row.

Targets are sorted and merged into *runs*: a run starts at an anchor and continues through
later targets whose anchor it has already fed, so the targets of one GOP cost one forward pass.
Each packet is sent with ``pts = row``; FFmpeg hands a picture's packet pts to its frame, so a
frame is matched to its row exactly, whatever the B-frame reordering. Frames before a target are
decoded but not converted (H.264 non-reference pictures before a target are not even sent);
targets are converted by one FFmpeg scaler per output size and thread
to planar RGB and copied into uint8 CHW arrays. A target the run did not produce (an HEVC RASL
picture decoded from its own CRA) is retried from the keyframe before its anchor. A null or
empty row is a gap that no anchor may cross: targets after a gap and before the next keyframe
are ``None``. Runs are independent and may go to a bounded thread pool (PyAV releases the GIL
while decoding and scaling).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.reformatter import Interpolation, VideoReformatter

from ..errors import ConfigError, DecodeError
from .bitstream import (
    ANNEX_B,
    config_to_annexb,
    h264_disposable,
    nal_units,
    packet_keyframe,
    to_annexb,
)

__all__ = ["PacketDecodeConfig", "PacketDecoder", "PacketRows"]

# FFmpeg's native AV1 decoder only drives hardware; dav1d is the software one.
_DECODERS = {"h264": "h264", "hevc": "hevc", "h265": "hevc", "av1": "libdav1d"}
# gbrp stores planes as G, B, R; these are the plane numbers of R, G and B.
_RGB_PLANES = (2, 0, 1)
_MAX_RETRIES = 3
# Objects inherited through fork are parked here so their finalizers never run in the child.
_INHERITED: list[object] = []


@dataclass(frozen=True, eq=False)
class PacketRows:
    """The packets of a column: row ``r`` is ``data[offsets[r]:offsets[r + 1]]``.

    This is the layout of an Arrow Binary/LargeBinary array (``data`` its value buffer, zero
    copy); ``valid`` is ``None`` when no row is null.
    """

    data: bytes | memoryview
    offsets: np.ndarray
    """int64 (N + 1,) byte offsets into ``data``."""
    valid: np.ndarray | None = None
    """bool (N,): False for a null row."""

    @classmethod
    def from_list(cls, packets: Sequence[bytes | None]) -> PacketRows:
        sizes = np.array([len(p) if p is not None else 0 for p in packets], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        valid = np.array([p is not None for p in packets], dtype=bool)
        data = b"".join(p for p in packets if p is not None)
        return cls(data=data, offsets=offsets, valid=None if valid.all() else valid)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> memoryview | None:
        """The bytes of ``row`` (a view), or ``None`` for a null or empty row."""
        if self.valid is not None and not self.valid[row]:
            return None
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return memoryview(self.data)[start:stop] if stop > start else None


@dataclass(frozen=True, kw_only=True)
class PacketDecodeConfig:
    """How a packet column is decoded."""

    codec: str
    """``"h264"``, ``"hevc"`` or ``"av1"`` (FFmpeg decoder names are accepted too)."""
    size: tuple[int, int] | None = None
    """Output (H, W), resized inside FFmpeg; ``None`` keeps the coded size."""
    keyframe_interval: int | None = None
    """Fallback window (rows) when neither the keyframe array nor the packets tell."""
    inspect_packets: bool = True
    """Look inside packets for keyframes (`bitstream.packet_keyframe`)."""
    extradata: bytes | None = None
    """Out-of-band parameter sets (``avcC``/``hvcC`` record or Annex B; AV1 ``av1C``). With
    them, keyframe rows need not carry their own."""
    threads: int = 1
    """Runs decoded at once (1 decodes in the caller's thread)."""

    def __post_init__(self) -> None:
        if self.codec not in _DECODERS and self.codec not in _DECODERS.values():
            raise ConfigError(
                f"packet video codec {self.codec!r} is not supported; use one of "
                f"{sorted(_DECODERS)}"
            )
        if self.keyframe_interval is not None and self.keyframe_interval < 1:
            raise ConfigError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ConfigError(f"size must be (height, width) > 0, got {self.size!r}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def decoder_name(self) -> str:
        return _DECODERS.get(self.codec, self.codec)

    @property
    def bitstream_codec(self) -> str:
        """The codec name `bitstream` understands."""
        return {"libdav1d": "av1", "h265": "hevc"}.get(self.codec, self.codec)


@dataclass(eq=False)
class _Run:
    start: int
    end: int
    targets: list[int]
    guarded: bool
    segment: int


@dataclass(eq=False)
class _Batch:
    """One `PacketDecoder.decode` call: inputs, per-row keyframe cache, results."""

    rows: PacketRows
    keyframes: np.ndarray | None
    column: str
    starts: dict[int, int]
    """First row of each target's segment, by target row."""
    segments: dict[int, int]
    """Segment label of each target row (for messages)."""
    known: dict[int, bool | None] = field(default_factory=dict)
    frames: dict[int, np.ndarray] = field(default_factory=dict)


class PacketDecoder:
    """Decodes target rows of packet columns with GOP-planned, keyframe-anchored runs."""

    def __init__(self, config: PacketDecodeConfig) -> None:
        self.config = config
        self._extradata = _extradata(config)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self.frames_decoded = 0
        """Frames the codec produced (targets and the frames before them), all calls."""
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for name in ("_local", "_pool", "_lock"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._pool = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        """Stop the thread pool (idempotent); codecs are released with their threads."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        self._local = threading.local()

    def __enter__(self) -> PacketDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # inherited through fork: never touch the parent's codecs
            _INHERITED.extend([self._local, self._pool])
            self._local = threading.local()
            self._pool = None
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def decode(
        self,
        rows: PacketRows,
        targets: np.ndarray,
        segment_starts: np.ndarray,
        *,
        keyframes: np.ndarray | None = None,
        segments: np.ndarray | None = None,
        column: str = "",
        executor: Executor | None = None,
        threads: int | None = None,
    ) -> list[np.ndarray | None]:
        """uint8 CHW RGB frames of ``targets`` (rows), ``None`` where no keyframe precedes one.

        ``segment_starts[i]`` is the first row of the segment of ``targets[i]``; anchors never
        cross it. ``keyframes`` is per row: bool, or int8 with -1 for unknown. ``segments``
        labels each target's segment in error messages. A target before its segment start (or
        negative) has no value: ``None``. ``executor`` (with ``threads``, its size) runs the
        GOP runs on threads the caller owns (a dataset's decode threads) instead of this
        decoder's own ``config.threads``.
        """
        threads = threads if threads is not None else self.config.threads
        self._check_fork()
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        segment_starts = np.asarray(segment_starts, dtype=np.int64).reshape(-1)
        if segment_starts.shape != targets.shape:
            raise ConfigError("targets and segment_starts must have the same length")
        if len(targets) and int(targets.max()) >= len(rows):
            raise ConfigError(
                f"column {column!r}: row {int(targets.max())} is past the column's {len(rows)} rows"
            )
        if keyframes is not None and len(keyframes) != len(rows):
            raise ConfigError(
                f"column {column!r}: the keyframe array has {len(keyframes)} rows, the packets "
                f"{len(rows)}"
            )
        labels = segments if segments is not None else np.full(len(targets), -1)
        ok = (targets >= 0) & (targets >= segment_starts)
        batch = _Batch(
            rows=rows,
            keyframes=keyframes,
            column=column,
            starts={int(t): int(s) for t, s in zip(targets[ok], segment_starts[ok], strict=True)},
            segments={int(t): int(g) for t, g in zip(targets[ok], labels[ok], strict=True)},
        )
        pending = {t: None for t in sorted(batch.starts)}
        bound: dict[int, int] = {}  # retry: the anchor must be before this row
        for _ in range(_MAX_RETRIES + 1):
            anchors = {}
            for t in pending:
                anchor = self._anchor(batch, t, bound.get(t))
                if anchor is not None:
                    anchors[t] = anchor
            runs = _plan_runs(anchors, batch, reach=1 if threads == 1 else 0)
            if not runs:
                break
            self._execute(runs, batch, threads, executor)
            pending = {t: None for t in anchors if t not in batch.frames and not anchors[t][1]}
            bound = {t: anchors[t][0] for t in pending}
        return [
            batch.frames.get(int(t)) if keep else None for t, keep in zip(targets, ok, strict=True)
        ]

    # -- anchors -----------------------------------------------------------------------------

    def _is_keyframe(self, batch: _Batch, row: int, data: memoryview) -> bool | None:
        if row in batch.known:
            return batch.known[row]
        answer: bool | None = None
        if batch.keyframes is not None:
            value = int(batch.keyframes[row])
            answer = None if value < 0 else bool(value)
        if answer is None and self.config.inspect_packets:
            answer = packet_keyframe(
                data,
                self.config.bitstream_codec,
                need_parameter_sets=self._extradata is None,
            )
        batch.known[row] = answer
        return answer

    def _anchor(self, batch: _Batch, target: int, before: int | None) -> tuple[int, bool] | None:
        """``(anchor row, guarded)`` for ``target``, or ``None`` when it has no keyframe."""
        start = batch.starts[target]
        interval = self.config.keyframe_interval
        unknown = False
        row = target if before is None else before - 1
        if before is not None and before <= start:
            return None
        while row >= start:
            data = batch.rows.get(row)
            if data is None:  # a gap: nothing before it reaches the target
                return (row + 1, True) if unknown and row < target else None
            answer = self._is_keyframe(batch, row, data)
            if answer:
                return row, False
            unknown = unknown or answer is None
            if unknown and interval is not None and target - row + 1 >= interval:
                return row, True
            row -= 1
        return (start, True) if unknown else None

    # -- decoding ----------------------------------------------------------------------------

    def _execute(
        self, runs: list[_Run], batch: _Batch, threads: int, executor: Executor | None
    ) -> None:
        runs.sort(key=lambda r: r.start - r.end)  # longest first
        if threads == 1 or len(runs) == 1:
            for run in runs:
                self._decode_run(run, batch)
            return
        pool: Executor
        if executor is not None:
            pool = executor
        else:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.config.threads, thread_name_prefix="framefeed-packets"
                    )
                pool = self._pool
        futures = [pool.submit(self._decode_run, run, batch) for run in runs]
        errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                raise exc

    def _context(self) -> VideoCodecContext:
        ctx: VideoCodecContext | None = getattr(self._local, "ctx", None)
        if ctx is None:
            created = av.CodecContext.create(self.config.decoder_name, "r")
            if not isinstance(created, VideoCodecContext):
                raise ConfigError(f"{self.config.decoder_name!r} is not a video decoder")
            if self._extradata is not None:
                created.extradata = self._extradata
            created.thread_count = 1  # errors at the packet that caused them; runs are parallel
            # Report damaged slices instead of concealing them: corrupt data must be loud.
            created.options = {"err_detect": "explode"}
            created.open()
            ctx = created
            self._local.ctx = ctx
        return ctx

    def _scaler(self) -> VideoReformatter:
        scaler: VideoReformatter | None = getattr(self._local, "scaler", None)
        if scaler is None:
            scaler = VideoReformatter()
            self._local.scaler = scaler
        return scaler

    def _decode_run(self, run: _Run, batch: _Batch) -> None:
        ctx = self._context()
        wanted = set(run.targets)
        first_key: int | None = None if run.guarded else run.start
        errors: list[tuple[int, av.FFmpegError]] = []
        produced = 0
        nal = self.config.bitstream_codec in ("h264", "hevc")
        h264 = self.config.bitstream_codec == "h264"
        found: dict[int, np.ndarray] = {}

        def take(frames: list[av.VideoFrame]) -> None:
            nonlocal first_key, produced
            for frame in frames:
                produced += 1
                pts = frame.pts
                if pts is None:
                    continue
                if first_key is None and frame.key_frame:
                    first_key = pts
                if (
                    pts in wanted
                    and pts not in found
                    and first_key is not None
                    and pts >= first_key
                ):
                    found[pts] = self._convert(frame)

        try:
            for row in range(run.start, run.end + 1):
                data = batch.rows.get(row)
                if data is None:  # cannot happen inside a planned run; be loud if it does
                    raise self._error(batch, run, row, "the row is null or empty inside a GOP")
                try:
                    payload = to_annexb(data, self.config.bitstream_codec) if nal else data
                    if h264 and row not in wanted and _disposable(payload):
                        continue  # a non-reference picture that is not wanted: skip it
                except DecodeError as exc:
                    raise self._error(batch, run, row, str(exc)) from exc
                packet = av.Packet(payload)  # type: ignore[arg-type, unused-ignore]  # PyAV < 18 typed it bytes-only
                packet.pts = row
                packet.dts = row
                try:
                    take(ctx.decode(packet))
                except av.FFmpegError as exc:
                    if not run.guarded:
                        raise self._error(batch, run, row, f"the decoder failed ({exc})") from exc
                    errors.append((row, exc))
            try:
                take(ctx.decode(None))
            except av.FFmpegError as exc:
                if not run.guarded:
                    raise self._error(batch, run, run.end, f"draining failed ({exc})") from exc
                errors.append((run.end, exc))
        except BaseException:
            self._local.ctx = None  # its state is unknown: the next run gets a fresh codec
            raise
        if errors:
            self._local.ctx = None
        else:
            ctx.flush_buffers()
        for row, error in errors:
            if first_key is not None and row >= first_key:
                raise self._error(batch, run, row, f"the decoder failed ({error})") from error
        with self._lock:
            self.frames_decoded += produced
            batch.frames.update(found)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        height, width = self.config.size or (frame.height, frame.width)
        rgb = self._scaler().reformat(
            frame,
            width=width,
            height=height,
            format="gbrp",
            interpolation=Interpolation.AREA if self.config.size is not None else None,
            threads=1,  # PyAV's default (0) gives every scaler a pool of one thread per core
        )
        out = np.empty((3, height, width), dtype=np.uint8)
        for channel, plane_no in enumerate(_RGB_PLANES):
            plane = rgb.planes[plane_no]
            lines = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(height, -1)
            out[channel] = lines[:, :width]
        return out

    def _error(self, batch: _Batch, run: _Run, row: int, what: str) -> DecodeError:
        start = batch.starts[run.targets[0]]
        return DecodeError(
            f"column {batch.column!r}, segment {run.segment}, row {row} (packet {row - start} "
            f"of the segment): {what}; the packet is corrupt or truncated, or a keyframe flag "
            "is wrong"
        )


def _plan_runs(anchors: dict[int, tuple[int, bool]], batch: _Batch, reach: int) -> list[_Run]:
    """Merge sorted targets into runs that share their forward pass.

    A target joins the previous run when its anchor is at most ``reach`` rows past the run's
    end: 0 joins only runs that already fed the anchor; 1 also joins a run that ends just
    before it (no extra packet, one pass instead of two, and the open-GOP pictures after a CRA
    decode with their references), at the cost of fewer runs to spread over threads.
    """
    runs: list[_Run] = []
    for target in sorted(anchors):
        anchor, guarded = anchors[target]
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.start <= anchor <= last.end + reach
            and batch.starts[last.targets[0]] == batch.starts[target]
        ):
            # The run's own start serves this target: its guard is the run's.
            last.end = target
            last.targets.append(target)
        else:
            runs.append(_Run(anchor, target, [target], guarded, batch.segments[target]))
    return runs


def _disposable(annexb: bytes | memoryview) -> bool:
    return h264_disposable(nal_units(annexb, "h264", ANNEX_B))


def _extradata(config: PacketDecodeConfig) -> bytes | None:
    if config.extradata is None:
        return None
    if config.bitstream_codec in ("h264", "hevc"):
        return config_to_annexb(config.extradata, config.bitstream_codec)
    return config.extradata
