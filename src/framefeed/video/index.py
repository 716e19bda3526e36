"""A container's packet table: per packet its pts, byte offset, size and keyframe flag.

The index is what makes random access cheap: it maps a timestamp to the packet that carries the
frame, finds the keyframe to start decoding from, and gives the byte ranges to read. It is built
once per file by demuxing the container without decoding (PyAV), and is immutable and picklable,
so it can be cached and shared between threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import IO

import av
import numpy as np

from ..errors import DecodeError, FrameTimestampError, StorageError

__all__ = ["VideoIndex"]

# FFmpeg's native AV1 decoder only drives hardware; dav1d is the software one.
_SOFTWARE_DECODERS = {"av1": "libdav1d"}


@dataclass(frozen=True, eq=False)
class VideoIndex:
    """Packet table of one video stream, in decode order."""

    path: str
    """Where the file lives (for messages)."""
    codec: str
    """FFmpeg decoder name (``libdav1d``, ``h264``, ``hevc``, ...)."""
    extradata: bytes | None
    """Codec configuration record from the container (``av1C``, ``avcC``, ``hvcC``)."""
    width: int
    height: int
    time_base: Fraction
    pts: np.ndarray
    """int64 presentation timestamps, in ``time_base`` units, decode order."""
    dts: np.ndarray
    pos: np.ndarray
    """int64 byte offset of each packet in the file."""
    size: np.ndarray
    """int64 size of each packet in bytes."""
    keyframe: np.ndarray
    """bool, True where decoding may start."""

    @classmethod
    def from_file(cls, fileobj: IO[bytes], path: str) -> VideoIndex:
        """Demux ``fileobj`` (no decoding) and record its first video stream's packets."""
        try:
            with av.open(fileobj, mode="r") as container:
                if not container.streams.video:
                    raise DecodeError(f"{path}: no video stream")
                stream = container.streams.video[0]
                ctx = stream.codec_context
                rows: list[tuple[int, int, int, int, bool]] = []
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    if packet.pts is None or packet.pos is None or packet.pos < 0:
                        raise DecodeError(f"{path}: packet without pts or byte position")
                    dts = packet.dts if packet.dts is not None else packet.pts
                    rows.append((packet.pts, dts, packet.pos, packet.size, packet.is_keyframe))
                time_base = stream.time_base
                codec = ctx.codec.name
                extradata = bytes(ctx.extradata) if ctx.extradata else None
                width, height = ctx.width, ctx.height
        except av.FFmpegError as exc:
            raise DecodeError(f"{path}: cannot read the container ({exc})") from exc
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            # PyAV's own I/O on a file that is empty or cut short (seek past the end, ...)
            raise DecodeError(
                f"{path}: cannot read the container ({exc}); the file is empty, truncated or "
                "not a video"
            ) from exc
        if not rows:
            raise DecodeError(f"{path}: the video stream has no packets")
        if time_base is None:
            raise DecodeError(f"{path}: the video stream has no time base")
        table = np.array(rows, dtype=np.int64)
        return cls(
            path=path,
            codec=_SOFTWARE_DECODERS.get(codec, codec),
            extradata=extradata,
            width=int(width),
            height=int(height),
            time_base=Fraction(time_base.numerator, time_base.denominator),
            pts=table[:, 0].copy(),
            dts=table[:, 1].copy(),
            pos=table[:, 2].copy(),
            size=table[:, 3].copy(),
            keyframe=table[:, 4].astype(bool),
        )

    def __post_init__(self) -> None:
        order = np.argsort(self.pts, kind="stable")
        object.__setattr__(self, "_by_pts", order)
        object.__setattr__(self, "_sorted_pts", self.pts[order])
        object.__setattr__(self, "_keys", np.flatnonzero(self.keyframe))
        if not self.keyframe.any():
            raise DecodeError(f"{self.path}: no keyframe in the video stream")

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.pts, self.dts, self.pos, self.size))) * 2

    def seconds(self, pts: np.ndarray) -> np.ndarray:
        return pts.astype(np.float64) * float(self.time_base)

    def locate(
        self,
        times: np.ndarray,
        tolerance_s: float,
        describe: Callable[[int], str] | None = None,
    ) -> np.ndarray:
        """Decode-order packet of the frame nearest to each time (seconds).

        Raises `FrameTimestampError` when the nearest frame is ``tolerance_s`` or further away,
        the same strict test as LeRobot's decoder; ``describe(i)`` names the sample asking for
        time ``i`` in that message.
        """
        sorted_pts: np.ndarray = self._sorted_pts  # type: ignore[attr-defined]
        ticks = np.asarray(times, dtype=np.float64) / float(self.time_base)
        right = np.searchsorted(sorted_pts, ticks, side="left").clip(0, len(sorted_pts) - 1)
        left = (right - 1).clip(0, None)
        pick_left = np.abs(sorted_pts[left] - ticks) <= np.abs(sorted_pts[right] - ticks)
        nearest = np.where(pick_left, left, right)
        gap = np.abs(self.seconds(sorted_pts[nearest]) - np.asarray(times, dtype=np.float64))
        bad = np.flatnonzero(~(gap < tolerance_s))
        if bad.size:
            i = int(bad[0])
            first = float(self.seconds(sorted_pts[:1])[0])
            last = float(self.seconds(sorted_pts[-1:])[0])
            who = f"{describe(i)}: " if describe is not None else ""
            raise FrameTimestampError(
                f"{who}{self.path}: no frame within {tolerance_s:g} s of t={float(times[i]):.6f} s "
                f"(nearest frame at {float(self.seconds(sorted_pts[nearest[i : i + 1]])[0]):.6f} s;"
                f" the video spans {first:.6f}..{last:.6f} s, {self.num_frames} frames)"
            )
        by_pts: np.ndarray = self._by_pts  # type: ignore[attr-defined]
        return np.asarray(by_pts[nearest], dtype=np.int64)

    def packets_between(self, t0: float, t1: float) -> np.ndarray:
        """Decode-order packets whose time lies in ``[t0, t1)`` seconds (binary search)."""
        sorted_pts: np.ndarray = self._sorted_pts  # type: ignore[attr-defined]
        by_pts: np.ndarray = self._by_pts  # type: ignore[attr-defined]
        ticks = np.asarray([t0, t1], dtype=np.float64) / float(self.time_base)
        lo, hi = np.searchsorted(sorted_pts, ticks, side="left")
        return np.asarray(by_pts[lo:hi], dtype=np.int64)

    def anchor(self, packet: int) -> int:
        """Keyframe to start decoding from to reach ``packet``.

        The keyframe must come before the target in decode order *and* have a pts not after
        the target's: with open GOPs (HEVC CRA), frames that follow a keyframe in decode order
        can be shown before it and need the previous GOP.
        """
        keys: np.ndarray = self._keys  # type: ignore[attr-defined]
        target_pts = self.pts[packet]
        j = int(np.searchsorted(keys, packet, side="right")) - 1
        while j >= 0 and self.pts[keys[j]] > target_pts:
            j -= 1
        if j < 0:
            raise DecodeError(
                f"{self.path}: no keyframe before the frame at pts {int(target_pts)} "
                f"(t={float(target_pts * self.time_base):.6f} s)"
            )
        return int(keys[j])
