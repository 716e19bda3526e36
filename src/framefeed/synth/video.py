"""Video side of the synthetic writer: per-episode encoding, per-camera mp4 files, verification.

Like LeRobot, each episode of each camera is first encoded to its own (here in-memory) mp4; its
packets are then copied, without re-encoding, onto the end of the camera's current
``videos/<key>/chunk-XXX/file-YYY.mp4`` with their timestamps shifted so time continues. Each
camera rolls over to a new file on its own, by LeRobot's size rule.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from av.video.stream import VideoStream

from framefeed.errors import FormatError, FramefeedError
from framefeed.synth.config import CODECS, CameraSpec

__all__ = [
    "VIDEO_PATH",
    "EpisodePlacement",
    "VideoFileWriter",
    "encode_episode",
    "next_file_indices",
    "verify_video_file",
]

VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
"""LeRobot's ``DEFAULT_VIDEO_PATH`` template, relative to the dataset root."""

_MB = 1024 * 1024
_ENCODE_ATTEMPTS = 3


def next_file_indices(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """LeRobot's ``update_chunk_file_indices``: the next file, or the next chunk when full."""
    if file_index == chunks_size - 1:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


def _codec_options(camera: CameraSpec) -> dict[str, str]:
    options = {"g": str(camera.gop), "crf": str(camera.crf)}
    if camera.codec == "av1":
        options["preset"] = str(camera.preset)
    else:
        options["bf"] = str(camera.bframes)
    return options


def _frame_step(time_base: Fraction | None, fps: int) -> int:
    """Ticks of ``time_base`` per frame; mp4 picks time bases for which this is an integer."""
    if time_base is None:
        raise FramefeedError("the mp4 video stream has no time base")
    step = Fraction(1, fps) / time_base
    if step.denominator != 1:
        raise FramefeedError(
            f"the mp4 time base {time_base} is not a whole fraction of a frame at {fps} fps"
        )
    return int(step)


def _encode_once(
    draw: Callable[[int], npt.NDArray[np.uint8]], num_frames: int, camera: CameraSpec, fps: int
) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            CODECS[camera.codec], rate=fps, options=_codec_options(camera)
        )
        if not isinstance(stream, VideoStream):
            raise FramefeedError(f"{CODECS[camera.codec]} did not open a video stream")
        stream.width = camera.width
        stream.height = camera.height
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(draw(index), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _check_episode(mp4: bytes, num_frames: int, fps: int) -> str | None:
    """Why the single-episode mp4 is unusable, or None when it is fine."""
    with av.open(io.BytesIO(mp4), "r") as source:
        stream = source.streams.video[0]
        step = _frame_step(stream.time_base, fps)
        packets = [p for p in source.demux(stream) if p.size > 0]
    if len(packets) != num_frames:
        return f"{len(packets)} packets for {num_frames} frames"
    if not packets[0].is_keyframe:
        return "the first packet is not a keyframe"
    pts = sorted(p.pts for p in packets if p.pts is not None)
    if pts != [i * step for i in range(num_frames)]:
        return f"frame timestamps are not 0, {step}, 2*{step}, ... ticks"
    return None


def encode_episode(
    draw: Callable[[int], npt.NDArray[np.uint8]], num_frames: int, camera: CameraSpec, fps: int
) -> bytes:
    """Encode one episode of one camera to a single-episode mp4 (bytes) and check it.

    ``draw(i)`` returns frame ``i`` as HWC uint8 RGB; it may be called again for the same frame
    if the encoder fails and the episode is retried.
    """
    problems: list[str] = []
    for _ in range(_ENCODE_ATTEMPTS):
        try:
            mp4 = _encode_once(draw, num_frames, camera, fps)
        except av.FFmpegError as exc:
            problems.append(f"encoder error: {exc}")
            continue
        problem = _check_episode(mp4, num_frames, fps)
        if problem is None:
            return mp4
        problems.append(problem)
    raise FramefeedError(
        f"encoding {num_frames} frames of camera {camera.key!r} with {CODECS[camera.codec]} "
        f"failed {_ENCODE_ATTEMPTS} times: {'; '.join(problems)}"
    )


@dataclass(frozen=True, kw_only=True)
class EpisodePlacement:
    """Where one episode of one camera landed: its mp4 file and its time span inside it."""

    chunk_index: int
    """Chunk of the mp4 file."""
    file_index: int
    """File index of the mp4 file inside its chunk."""
    from_timestamp: float
    """Start of the episode inside the file, in seconds."""
    to_timestamp: float
    """End (exclusive) of the episode inside the file: ``from_timestamp + length / fps``."""


@dataclass
class _OpenFile:
    path: Path
    chunk_index: int
    file_index: int
    container: Any
    stream: Any = None
    size_bytes: int = 0
    frames: int = 0
    to_timestamp: float = 0.0
    episodes: list[tuple[int, int]] = field(default_factory=list)  # (first frame, length)


class VideoFileWriter:
    """Appends encoded episodes of one camera to its mp4 files, rolling over by size.

    A new file starts when ``current_MB + episode_MB >= video_files_size_in_mb`` (sizes of the
    single-episode mp4s), except for the very first episode. Files are written with
    ``movflags=faststart``. Call :meth:`close` to finish the last file.
    """

    def __init__(
        self, *, root: Path, camera: CameraSpec, fps: int, size_limit_mb: float, chunks_size: int
    ) -> None:
        self._root = root
        self._camera = camera
        self._fps = fps
        self._limit_mb = size_limit_mb
        self._chunks_size = chunks_size
        self._file: _OpenFile | None = None
        self.files: list[tuple[Path, list[tuple[int, int]]]] = []
        """Finished files with their episodes as (first frame in file, length)."""

    def _open(self, chunk_index: int, file_index: int) -> _OpenFile:
        relative = VIDEO_PATH.format(
            video_key=self._camera.key, chunk_index=chunk_index, file_index=file_index
        )
        path = self._root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(path), "w", format="mp4", options={"movflags": "faststart"})
        return _OpenFile(
            path=path, chunk_index=chunk_index, file_index=file_index, container=container
        )

    def _finish(self, current: _OpenFile) -> None:
        current.container.close()
        self.files.append((current.path, current.episodes))

    def append(self, mp4: bytes, num_frames: int) -> EpisodePlacement:
        """Copy the packets of a single-episode mp4 onto the end of the current file."""
        current = self._file
        if current is None:
            current = self._open(0, 0)
        elif (current.size_bytes + len(mp4)) / _MB >= self._limit_mb:
            self._finish(current)
            chunk, file = next_file_indices(
                current.chunk_index, current.file_index, self._chunks_size
            )
            current = self._open(chunk, file)
        self._file = current
        with av.open(io.BytesIO(mp4), "r") as source:
            in_stream = source.streams.video[0]
            if current.stream is None:
                current.stream = current.container.add_stream_from_template(in_stream, opaque=True)
            offset = current.frames * _frame_step(in_stream.time_base, self._fps)
            for packet in source.demux(in_stream):
                if packet.size == 0:
                    continue
                if packet.pts is None or packet.dts is None:
                    raise FormatError(f"a packet of camera {self._camera.key!r} has no timestamp")
                packet.pts = packet.pts + offset
                packet.dts = packet.dts + offset
                packet.stream = current.stream
                current.container.mux(packet)
        placement = EpisodePlacement(
            chunk_index=current.chunk_index,
            file_index=current.file_index,
            from_timestamp=current.to_timestamp,
            to_timestamp=current.to_timestamp + num_frames / self._fps,
        )
        current.episodes.append((current.frames, num_frames))
        current.frames += num_frames
        current.size_bytes += len(mp4)
        current.to_timestamp = placement.to_timestamp
        return placement

    def close(self) -> None:
        """Finish the current file (writes its moov atom); idempotent."""
        if self._file is not None:
            self._finish(self._file)
            self._file = None

    def abort(self) -> None:
        """Close the current file after a failure, ignoring errors from the half-written file."""
        if self._file is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._file.container.close()
            self._file = None


def _top_level_boxes(path: Path) -> list[str]:
    """Types of the top-level mp4 boxes, in file order."""
    boxes: list[str] = []
    size_total = os.path.getsize(path)
    with open(path, "rb") as f:
        position = 0
        while position + 8 <= size_total:
            f.seek(position)
            header = f.read(16)
            size = int.from_bytes(header[:4], "big")
            boxes.append(header[4:8].decode("latin-1"))
            if size == 1:
                size = int.from_bytes(header[8:16], "big")
            elif size == 0:
                break
            position += size
    return boxes


def verify_video_file(path: Path, episodes: list[tuple[int, int]], fps: int) -> None:
    """Check a finished mp4: frame count, timestamps, keyframe at every episode start, faststart.

    ``episodes`` lists (first frame in the file, length). Raises :class:`FormatError`.
    """
    boxes = _top_level_boxes(path)
    if "moov" not in boxes or "mdat" not in boxes or boxes.index("moov") > boxes.index("mdat"):
        raise FormatError(f"{path}: the moov box is not before mdat (boxes {boxes})")
    total = sum(length for _, length in episodes)
    with av.open(str(path), "r") as container:
        stream = container.streams.video[0]
        step = _frame_step(stream.time_base, fps)
        packets = [
            (p.pts, p.is_keyframe)
            for p in container.demux(stream)
            if p.size > 0 and p.pts is not None
        ]
        header_frames = stream.frames
    if len(packets) != total or header_frames != total:
        raise FormatError(
            f"{path}: {len(packets)} packets and {header_frames} frames in the header, "
            f"expected {total} frames"
        )
    pts = sorted(p for p, _ in packets)
    if pts != [i * step for i in range(total)]:
        raise FormatError(f"{path}: frame timestamps are not consecutive multiples of {step}")
    keyframes = {p for p, key in packets if key}
    for first, _ in episodes:
        if first * step not in keyframes:
            raise FormatError(f"{path}: the episode starting at frame {first} is not a keyframe")
