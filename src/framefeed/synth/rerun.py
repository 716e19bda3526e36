"""Synthetic Rerun recordings (``.rrd``) for tests, demos and benchmarks, written with rerun-sdk.

``write_rerun_recordings(root, RerunSynthConfig(...))`` writes one ``.rrd`` file per recording
(a framefeed segment), each holding streams at their own rates, like a real robot log:

================================  ==============================================  ===========
column                            content                                         default rate
================================  ==============================================  ===========
``/camera/jpeg:EncodedImage:blob``   one JPEG per row (``image/jpeg``)               30 Hz
``/camera/h264:VideoStream:sample``  one H.264 Annex B access unit per row, GOP 30   30 Hz
``/camera/h264:VideoStream:is_keyframe``  true on the rows that start a GOP          30 Hz
``/state:Scalars:scalars``        ``state_dim`` float64 values                     100 Hz
``/action:Scalars:scalars``       ``action_dim`` float64 values                    10 Hz
``/task:TextLog:text``            a status string                                  1 Hz
================================  ==============================================  ===========

Every row is stamped on two timelines: ``log_time`` (timestamps: the nominal time of the row plus
a seeded jitter) and ``step`` (a sequence: the nominal time counted in ticks of ``step_rate_hz``).
Every value is a function of (recording ``r``, row ``i``): ``state[j] = r*1000 + i + j/16``,
``action[j] = -(r*1000 + i) - j/16``, text ``"recording r, second i"``, and both cameras draw the
:func:`framefeed.synth.read_marker` marker ``(r, i)`` into row ``i``. `recording_streams` returns
the index values and values that were logged, so a test can compare a reader against them.

Needs the ``rerun`` extra (``pip install 'framefeed[rerun]'``) and Pillow, which rerun-sdk pulls in.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from framefeed.errors import ConfigError, FramefeedError
from framefeed.synth.frames import FRAME_BITS, FramePainter
from framefeed.synth.packets import encode_packets

__all__ = [
    "ACTION",
    "H264",
    "H264_KEYFRAME",
    "JPEG",
    "STATE",
    "TASK",
    "RerunSynthConfig",
    "SynthStream",
    "recording_file",
    "recording_streams",
    "write_rerun_recordings",
]

JPEG_ENTITY = "/camera/jpeg"
H264_ENTITY = "/camera/h264"
STATE_ENTITY = "/state"
ACTION_ENTITY = "/action"
TASK_ENTITY = "/task"

JPEG = f"{JPEG_ENTITY}:EncodedImage:blob"
"""Column path of the JPEG camera."""
H264 = f"{H264_ENTITY}:VideoStream:sample"
"""Column path of the H.264 camera (one Annex B access unit per row)."""
H264_KEYFRAME = f"{H264_ENTITY}:VideoStream:is_keyframe"
"""Column path of the H.264 camera's keyframe markers (written when ``keyframe_column``)."""
STATE = f"{STATE_ENTITY}:Scalars:scalars"
"""Column path of the state vector."""
ACTION = f"{ACTION_ENTITY}:Scalars:scalars"
"""Column path of the action vector."""
TASK = f"{TASK_ENTITY}:TextLog:text"
"""Column path of the text stream."""

_PIP = "pip install 'framefeed[rerun]'"
_NS = 1_000_000_000


@dataclass(frozen=True, kw_only=True)
class RerunSynthConfig:
    """Shape and content of a folder of synthetic recordings. The same config gives the same rows.

    Rates are in Hz, durations in seconds, sizes in pixels (height, width).
    """

    num_recordings: int = 2
    """Number of ``.rrd`` files (segments), 1..1024."""
    min_duration_s: float = 2.0
    """Shortest recording; durations are drawn uniformly in [min, max] from ``seed``."""
    max_duration_s: float = 3.0
    """Longest recording; at most 4095 frames of the fastest camera."""
    jpeg_rate_hz: float = 30.0
    """Rate of the JPEG camera (0 leaves it out)."""
    jpeg_size: tuple[int, int] = (240, 320)
    """JPEG frame height and width (at least 24x48 so the marker stays readable)."""
    jpeg_quality: int = 90
    """JPEG quality (Pillow's 1..95)."""
    h264_rate_hz: float = 30.0
    """Rate of the H.264 camera (0 leaves it out)."""
    h264_size: tuple[int, int] = (240, 320)
    """H.264 frame height and width (even, at least 32x48)."""
    h264_gop: int = 30
    """Keyframe interval of the H.264 camera: row ``i`` is a keyframe when ``i % gop == 0``."""
    h264_crf: int = 23
    """Constant rate factor of libx264."""
    keyframe_column: bool = True
    """Also log ``VideoStream:is_keyframe`` beside the samples."""
    texture: bool = False
    """Draw the seeded moving texture of `framefeed.synth` under the markers."""
    state_rate_hz: float = 100.0
    """Rate of ``/state`` (0 leaves it out)."""
    state_dim: int = 14
    """Size of the state vector."""
    action_rate_hz: float = 10.0
    """Rate of ``/action`` (0 leaves it out)."""
    action_dim: int = 7
    """Size of the action vector."""
    text_rate_hz: float = 1.0
    """Rate of ``/task`` (0 leaves it out)."""
    jitter_ms: float = 2.0
    """Each ``log_time`` stamp is the nominal time plus a uniform integer-ns jitter within
    +-jitter_ms; it must stay under half the period of the fastest stream, so rows stay in order."""
    step_rate_hz: float = 100.0
    """Ticks per second of the ``step`` timeline; no stream may be faster."""
    start_time_ns: int = 1_700_000_000 * _NS
    """Nominal ``log_time`` of recording 0's first row; recording ``r`` starts ``r`` hours later."""
    time_timeline: str = "log_time"
    """Name of the timestamp timeline."""
    sequence_timeline: str = "step"
    """Name of the sequence timeline."""
    rows_per_chunk: int = 64
    """Rows per logged chunk (``send_columns`` call), so each column spans several chunks."""
    seed: int = 0
    """Seed of the durations, the jitter and the texture (>= 0)."""
    application_id: str = "framefeed-synth"
    """Rerun application id of every recording."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_recordings <= 1024:
            raise ConfigError(f"num_recordings must be in 1..1024, got {self.num_recordings}")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            raise ConfigError(
                "durations need 0 < min_duration_s <= max_duration_s, got "
                f"{self.min_duration_s} and {self.max_duration_s}"
            )
        rates = self.rates()
        if not rates:
            raise ConfigError("every stream rate is 0: a recording needs at least one stream")
        if any(r < 0 for r in rates.values()):
            raise ConfigError(f"rates must be >= 0, got {rates}")
        fastest = max(rates.values())
        if fastest > self.step_rate_hz:
            raise ConfigError(
                f"step_rate_hz={self.step_rate_hz} is slower than the fastest stream "
                f"({fastest} Hz); steps would repeat"
            )
        if not 0 <= self.jitter_ms * 1e-3 < 0.5 / fastest:
            raise ConfigError(
                f"jitter_ms={self.jitter_ms} must be >= 0 and under half the period of the "
                f"fastest stream ({500 / fastest:g} ms) so that rows stay in order"
            )
        for name in ("jpeg_rate_hz", "h264_rate_hz"):
            rate = getattr(self, name)
            if rate and math.floor(self.max_duration_s * rate) + 1 >= 1 << FRAME_BITS:
                raise ConfigError(
                    f"{name}={rate} over {self.max_duration_s} s needs more than "
                    f"{(1 << FRAME_BITS) - 1} frames, more than the frame marker holds"
                )
        if self.h264_rate_hz:
            h, w = self.h264_size
            if h < 32 or w < 48 or h % 2 or w % 2:
                raise ConfigError(f"h264_size must be even and at least 32x48, got {h}x{w}")
            if self.h264_gop < 1:
                raise ConfigError(f"h264_gop must be >= 1, got {self.h264_gop}")
        if self.jpeg_rate_hz and (self.jpeg_size[0] < 24 or self.jpeg_size[1] < 48):
            raise ConfigError(f"jpeg_size must be at least 24x48, got {self.jpeg_size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.state_dim < 1 or self.action_dim < 1:
            raise ConfigError("state_dim and action_dim must be >= 1")
        if self.rows_per_chunk < 1:
            raise ConfigError(f"rows_per_chunk must be >= 1, got {self.rows_per_chunk}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.time_timeline == self.sequence_timeline:
            raise ConfigError("time_timeline and sequence_timeline must differ")

    def rates(self) -> dict[str, float]:
        """Rate of every column that is written (the keyframe column shares the camera's)."""
        rates = {
            JPEG: self.jpeg_rate_hz,
            H264: self.h264_rate_hz,
            STATE: self.state_rate_hz,
            ACTION: self.action_rate_hz,
            TASK: self.text_rate_hz,
        }
        if self.keyframe_column:
            rates[H264_KEYFRAME] = self.h264_rate_hz
        return {path: rate for path, rate in rates.items() if rate}

    def duration_s(self, recording: int) -> float:
        """Duration of recording ``recording`` (seeded, in [min_duration_s, max_duration_s])."""
        rng = np.random.default_rng([self.seed, 0xD0])
        durations = rng.uniform(self.min_duration_s, self.max_duration_s, self.num_recordings)
        return float(durations[recording])


@dataclass(frozen=True, kw_only=True)
class SynthStream:
    """The rows of one column of one synthetic recording, as logged."""

    index: dict[str, npt.NDArray[np.int64]]
    """Per timeline name, one int64 index value per row (ns for ``log_time``)."""
    rows: npt.NDArray[np.int64]
    """Row numbers ``0..n-1``: the frame number drawn into a camera row's marker."""
    values: Any = field(default=None)
    """float64 ``(n, dim)`` for state and action, ``list[str]`` for text, bool ``(n,)`` for the
    keyframe column; None for cameras (their rows carry the marker ``(recording, row)``)."""


def recording_file(recording: int) -> str:
    """File name of recording ``recording`` inside the folder."""
    return f"recording-{recording:04d}.rrd"


def _index(config: RerunSynthConfig, recording: int, path: str, rate: float) -> SynthStream:
    n = math.floor(config.duration_s(recording) * rate) + 1
    rows = np.arange(n, dtype=np.int64)
    nominal_ns = np.array([round(i * _NS / rate) for i in range(n)], dtype=np.int64)
    stream_key = sorted(config.rates()).index(path)
    rng = np.random.default_rng([config.seed, recording, stream_key])
    jitter_ns = round(config.jitter_ms * 1e6)
    jitter = rng.integers(-jitter_ns, jitter_ns + 1, size=n, dtype=np.int64)
    start = config.start_time_ns + recording * 3600 * _NS
    steps = np.array([round(i * config.step_rate_hz / rate) for i in range(n)], dtype=np.int64)
    return SynthStream(
        index={config.time_timeline: start + nominal_ns + jitter, config.sequence_timeline: steps},
        rows=rows,
    )


def recording_streams(config: RerunSynthConfig, recording: int) -> dict[str, SynthStream]:
    """What `write_rerun_recordings` logs for ``recording``: column path to `SynthStream`."""
    if not 0 <= recording < config.num_recordings:
        raise ConfigError(f"recording {recording} out of range [0, {config.num_recordings})")
    out: dict[str, SynthStream] = {}
    for path, rate in config.rates().items():
        base = _index(config, recording, path, rate)
        if path == H264_KEYFRAME:
            base = _index(config, recording, H264, rate)  # same rows as the samples
            values: Any = base.rows % config.h264_gop == 0
        elif path in (STATE, ACTION):
            dim = config.state_dim if path == STATE else config.action_dim
            ramp = recording * 1000 + base.rows[:, None] + np.arange(dim)[None, :] / 16.0
            values = ramp.astype(np.float64) if path == STATE else -ramp.astype(np.float64)
        elif path == TASK:
            values = [f"recording {recording}, second {i}" for i in base.rows.tolist()]
        else:
            values = None
        out[path] = SynthStream(index=base.index, rows=base.rows, values=values)
    return out


def _import_rerun() -> Any:
    try:
        import rerun
    except ImportError as exc:
        raise ImportError(f"writing Rerun recordings needs rerun-sdk: {_PIP}") from exc
    return rerun


def _jpeg(image: npt.NDArray[np.uint8], quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _h264_packets(
    config: RerunSynthConfig, recording: int, n: int
) -> tuple[list[bytes], list[bool]]:
    """Encode ``n`` frames with libx264 into Annex B access units (SPS/PPS on every keyframe)."""
    height, width = config.h264_size
    clip = encode_packets(
        "h264",
        episode=recording,
        num_frames=n,
        height=height,
        width=width,
        gop=config.h264_gop,
        bframes=0,
        texture=config.texture,
        seed=config.seed,
        camera=1,
        rate=Fraction(config.h264_rate_hz).limit_denominator(1001),
        crf=config.h264_crf,
        repeat_headers=True,
    )
    if clip.frames != list(range(n)):  # no B-frames: rows in display order
        raise FramefeedError(f"libx264 returned its {n} frames out of order")
    packets, keys = clip.packets, clip.keyframes
    expected = [i % config.h264_gop == 0 for i in range(n)]
    if keys != expected:
        raise FramefeedError(f"libx264 did not put keyframes every {config.h264_gop} frames")
    return packets, keys


def _send(
    rec: Any,
    entity: str,
    stream: SynthStream,
    config: RerunSynthConfig,
    columns: Any,
) -> None:
    """Log ``columns`` (a function of a row slice) in chunks of ``rows_per_chunk`` rows."""
    import rerun as rr

    n = len(stream.rows)
    for lo in range(0, n, config.rows_per_chunk):
        hi = min(n, lo + config.rows_per_chunk)
        times = stream.index[config.time_timeline][lo:hi].astype("datetime64[ns]")
        steps = stream.index[config.sequence_timeline][lo:hi]
        rec.send_columns(
            entity,
            indexes=[
                rr.TimeColumn(config.sequence_timeline, sequence=steps),
                rr.TimeColumn(config.time_timeline, timestamp=times),
            ],
            columns=columns(slice(lo, hi)),
        )


def _write_one(root: Path, config: RerunSynthConfig, recording: int) -> Path:
    rr = _import_rerun()
    streams = recording_streams(config, recording)
    path = root / recording_file(recording)
    rec = rr.RecordingStream(config.application_id, recording_id=f"synth-{recording:04d}")
    rec.save(os.fspath(path))
    try:
        if JPEG in streams:
            s = streams[JPEG]
            h, w = config.jpeg_size
            painter = FramePainter(
                episode=recording,
                camera=0,
                height=h,
                width=w,
                texture=config.texture,
                seed=config.seed,
            )
            blobs = [
                np.frombuffer(_jpeg(painter.draw(i), config.jpeg_quality), dtype=np.uint8)
                for i in s.rows.tolist()
            ]
            rec.log(JPEG_ENTITY, rr.EncodedImage.from_fields(media_type="image/jpeg"), static=True)
            _send(rec, JPEG_ENTITY, s, config, lambda sl: rr.EncodedImage.columns(blob=blobs[sl]))
        if H264 in streams:
            s = streams[H264]
            packets, keys = _h264_packets(config, recording, len(s.rows))
            samples = [np.frombuffer(p, dtype=np.uint8) for p in packets]
            rec.log(H264_ENTITY, rr.VideoStream(codec=rr.VideoCodec.H264), static=True)

            def video(sl: slice) -> Any:
                if config.keyframe_column:
                    return rr.VideoStream.columns(sample=samples[sl], is_keyframe=keys[sl])
                return rr.VideoStream.columns(sample=samples[sl])

            _send(rec, H264_ENTITY, s, config, video)
        for entity, key in ((STATE_ENTITY, STATE), (ACTION_ENTITY, ACTION)):
            if key in streams:
                values = streams[key].values
                _send(
                    rec,
                    entity,
                    streams[key],
                    config,
                    lambda sl, v=values: rr.Scalars.columns(scalars=v[sl]),
                )
        if TASK in streams:
            texts = streams[TASK].values
            _send(
                rec,
                TASK_ENTITY,
                streams[TASK],
                config,
                lambda sl: rr.TextLog.columns(text=texts[sl]),
            )
        rec.flush()
    finally:
        rec.disconnect()
    return path


def write_rerun_recordings(root: str | os.PathLike[str], config: RerunSynthConfig) -> Path:
    """Write ``config.num_recordings`` recordings into the folder ``root`` and return it.

    Recording ``r`` is ``root/recording-rrrr.rrd`` with recording id ``synth-rrrr``.
    """
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    for recording in range(config.num_recordings):
        _write_one(out, config, recording)
    return out
