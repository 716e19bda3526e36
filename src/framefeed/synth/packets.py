"""Synthetic packet video: one compressed sample per row, as a camera driver would log it.

`encode_packets` encodes marked frames (`draw_frame`) with an encoder context (no container), so
the samples are Annex B for H.264/HEVC, with their parameter sets in band on every keyframe, and
low-overhead OBUs with a sequence header on every keyframe for AV1. Rows are in decode order;
``frames[r]`` is the frame index (the marker) of the picture that row ``r`` codes, which differs
from ``r`` when B-frames reorder pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from av.video.codeccontext import VideoCodecContext

from framefeed.errors import FramefeedError
from framefeed.synth.frames import FramePainter

__all__ = ["ENCODERS", "PacketClip", "encode_packets"]

ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1"}
"""The FFmpeg encoder used per codec."""


@dataclass(frozen=True)
class PacketClip:
    """Encoded samples of one episode, in decode order."""

    episode: int
    packets: list[bytes]
    keyframes: list[bool]
    """The encoder's keyframe flag per row."""
    frames: list[int]
    """Frame index (marker) of the picture coded in each row."""


def _options(
    codec: str, gop: int, bframes: int, open_gop: bool, crf: int | None, repeat_headers: bool
) -> dict[str, str]:
    if codec == "h264":
        options = {
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
            "bf": str(bframes),
            "crf": str(20 if crf is None else crf),
            "preset": "veryfast",
        }
        if repeat_headers:
            options["x264-params"] = "repeat-headers=1"
        return options
    if crf is not None or repeat_headers:
        raise FramefeedError("crf= and repeat_headers= apply to the h264 encoder only")
    if codec == "hevc":
        params = (
            f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:"
            f"open-gop={int(open_gop)}:radl=0:log-level=none"
        )
        return {"crf": "22", "preset": "ultrafast", "x265-params": params}
    if codec == "av1":
        return {"g": str(gop), "crf": "24", "preset": "12", "svtav1-params": "scd=0"}
    raise FramefeedError(f"no synthetic encoder for codec {codec!r}; use one of {list(ENCODERS)}")


def encode_packets(
    codec: str,
    *,
    episode: int,
    num_frames: int,
    height: int = 48,
    width: int = 64,
    gop: int = 10,
    bframes: int = 2,
    open_gop: bool = False,
    texture: bool = True,
    seed: int = 0,
    camera: int = 0,
    rate: Fraction = Fraction(30),
    crf: int | None = None,
    repeat_headers: bool = False,
) -> PacketClip:
    """Encode ``num_frames`` marked frames of ``episode`` into one packet per row.

    ``camera`` picks the marker's camera number, ``rate`` the frame rate; for H.264, ``crf``
    overrides the quality and ``repeat_headers`` writes SPS/PPS before every keyframe.
    """
    ctx = av.CodecContext.create(ENCODERS[codec], "w")
    if not isinstance(ctx, VideoCodecContext):
        raise FramefeedError(f"{ENCODERS[codec]} is not a video encoder")
    ctx.width, ctx.height = width, height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = 1 / rate
    ctx.framerate = rate
    ctx.options = _options(codec, gop, bframes, open_gop, crf, repeat_headers)
    ctx.open()
    painter = FramePainter(
        episode=episode, camera=camera, height=height, width=width, texture=texture, seed=seed
    )
    packets: list[Any] = []
    for index in range(num_frames):
        frame = av.VideoFrame.from_ndarray(painter.draw(index), format="rgb24")
        frame.pts = index
        packets.extend(ctx.encode(frame))
    packets.extend(ctx.encode(None))
    if len(packets) != num_frames:
        raise FramefeedError(f"{ENCODERS[codec]} gave {len(packets)} packets for {num_frames}")
    return PacketClip(
        episode=episode,
        packets=[bytes(p) for p in packets],
        keyframes=[bool(p.is_keyframe) for p in packets],
        frames=[int(p.pts) for p in packets if p.pts is not None],
    )
