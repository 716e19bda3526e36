"""One decoder for one file: feeds packet bytes to an FFmpeg codec and emits RGB planes.

A `FrameDecoder` is used by one thread at a time (the cache hands it out and takes it back). It
never seeks the container: it reads the bytes of the packets from the anchor keyframe to the
target straight from the file (one ranged read per run), feeds them to a codec context built
from the container's configuration record, and drains the codec at the end of the run. Frames
are converted by one reused FFmpeg scaler to planar RGB (``gbrp``) at the output size and copied
plane by plane into the caller's uint8 CHW buffers: no HWC->CHW transpose, no float.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Mapping, Sequence

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.reformatter import Interpolation, VideoReformatter

from ..errors import DecodeError
from ..storage import RangeReader
from .index import VideoIndex

__all__ = ["FrameDecoder"]

# gbrp stores planes as G, B, R; these are the plane numbers of R, G and B.
_RGB_PLANES = (2, 0, 1)


class FrameDecoder:
    """Decodes chosen frames of one video file into caller-provided uint8 CHW arrays."""

    def __init__(self, index: VideoIndex, reader: RangeReader, *, threads: int = 1) -> None:
        self.index = index
        self._reader = reader
        # A decoder dropped without `close` (its dataset was never closed, or it failed here)
        # still releases the reader's descriptor, which the reader itself never does.
        self._release = weakref.finalize(self, _close_reader, reader, os.getpid())
        ctx = av.CodecContext.create(index.codec, "r")
        if not isinstance(ctx, VideoCodecContext):
            raise DecodeError(f"{index.path}: codec {index.codec!r} is not a video codec")
        self._ctx = ctx
        if index.extradata:
            self._ctx.extradata = index.extradata
        self._ctx.thread_count = max(1, threads)
        self._ctx.open()
        self._scaler = VideoReformatter()
        self.pid = os.getpid()
        self.packet_bytes = 0
        """Sum of the sizes of the packets fed to the codec (what decoding needed)."""

    @property
    def nbytes(self) -> int:
        """Rough resident cost: a few reference frames plus a converted frame."""
        return int(self.index.width * self.index.height * 1.5 * 8 + self.index.nbytes)

    def close(self) -> None:
        if self.pid != os.getpid():  # inherited through fork: never touch the parent's codec
            return
        self._release()

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def _read(self, start: int, stop: int) -> bytes:
        data = self._reader.read(start, stop)
        if len(data) != stop - start:
            raise DecodeError(
                f"{self.index.path}: truncated file: wanted bytes {start}..{stop}, "
                f"got {len(data)} bytes"
            )
        return data

    def _packets(
        self, first: int, last: int, fetched: bytes | memoryview | None = None
    ) -> Iterator[av.Packet]:  # type: ignore[type-arg]
        """Packets ``first..last`` (decode order), read with one ranged read when contiguous.

        ``fetched`` holds the bytes of `run_span` when they were fetched ahead.
        """
        idx = self.index
        pos = idx.pos[first : last + 1]
        size = idx.size[first : last + 1]
        span = run_span(idx, first, last)
        self.packet_bytes += int(size.sum())
        if span is not None:
            start, stop = span
            if fetched is not None and len(fetched) != stop - start:
                raise DecodeError(
                    f"{self.index.path}: truncated file: wanted bytes {start}..{stop}, "
                    f"got {len(fetched)} bytes"
                )
            blob = memoryview(fetched if fetched is not None else self._read(start, stop))
            chunks = [blob[p - start : p - start + s] for p, s in zip(pos, size, strict=True)]
        else:
            chunks = [
                memoryview(self._read(int(p), int(p + s))) for p, s in zip(pos, size, strict=True)
            ]
        for k, chunk in enumerate(chunks):
            i = first + k
            packet = av.Packet(chunk)  # type: ignore[arg-type, unused-ignore]  # PyAV < 18 typed it bytes-only
            packet.pts = int(idx.pts[i])
            packet.dts = int(idx.dts[i])
            packet.time_base = idx.time_base
            yield packet

    def decode_runs(
        self,
        runs: Sequence[tuple[int, int]],
        wanted: Mapping[int, Sequence[np.ndarray]],
        *,
        size: tuple[int, int] | None = None,
        fetched: Mapping[tuple[int, int], bytes | memoryview] | None = None,
    ) -> tuple[int, set[int]]:
        """Decode each run ``(first_packet, last_packet)`` and fill the wanted frames.

        ``wanted`` maps a frame's pts to the CHW uint8 arrays that must receive it. Returns the
        number of frames the codec produced and the pts it delivered.
        """
        produced = 0
        done: set[int] = set()
        for first, last in runs:
            try:
                blob = fetched.get((first, last)) if fetched is not None else None
                for packet in self._packets(first, last, blob):
                    for frame in self._ctx.decode(packet):
                        produced += 1
                        self._deliver(frame, wanted, done, size)
                for frame in self._ctx.decode(None):
                    produced += 1
                    self._deliver(frame, wanted, done, size)
            except av.FFmpegError as exc:
                raise DecodeError(
                    f"{self.index.path}: decoding packets {first}..{last} failed ({exc}); "
                    "the file is corrupt or truncated"
                ) from exc
            finally:
                self._ctx.flush_buffers()
        return produced, done

    def _deliver(
        self,
        frame: av.VideoFrame,
        wanted: Mapping[int, Sequence[np.ndarray]],
        done: set[int],
        size: tuple[int, int] | None,
    ) -> None:
        pts = frame.pts
        if pts is None or pts not in wanted or pts in done:
            return
        height, width = size if size is not None else (frame.height, frame.width)
        rgb = self._scaler.reformat(
            frame,
            width=width,
            height=height,
            format="gbrp",
            interpolation=Interpolation.AREA if size is not None else None,
            threads=1,  # PyAV's default (0) gives every scaler a pool of one thread per core
        )
        targets = wanted[pts]
        first = targets[0]
        for channel, plane_no in enumerate(_RGB_PLANES):
            plane = rgb.planes[plane_no]
            rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(height, plane.line_size)
            first[channel] = rows[:, :width]
        for other in targets[1:]:
            other[...] = first
        done.add(pts)


def run_span(index: VideoIndex, first: int, last: int) -> tuple[int, int] | None:
    """Byte range covering packets ``first..last``, or None when they are too scattered
    (the span would be more than twice their total size) to read in one request."""
    pos = index.pos[first : last + 1]
    size = index.size[first : last + 1]
    start, stop = int(pos.min()), int((pos + size).max())
    return (start, stop) if stop - start <= 2 * int(size.sum()) else None


def _close_reader(reader: RangeReader, pid: int) -> None:
    """Close ``reader`` in the process that opened it (a forked child leaves it alone)."""
    if os.getpid() == pid:
        reader.close()
