"""Encoded image decode: JPEG to uint8 CHW RGB with FFmpeg, simplejpeg, PIL and PyTurboJPEG.

JPEGs of textured synthetic frames (FFmpeg's mjpeg encoder at about quality 90, with 4:2:0,
4:2:2 and 4:4:4 chroma) at 320x240 and 640x480 are decoded into a (N, 3, H, W) uint8 batch on 1
and 2 threads. The baseline is the
FFmpeg path framefeed used before (a codec context per image, ``to_ndarray("rgb24")`` and an
HWC->CHW transpose); every record carries its ratio to that baseline at the same size and
thread count. ``framefeed`` is `framefeed.image.decode_images` itself (simplejpeg when installed,
FFmpeg otherwise, the process's thread pool). PIL and PyTurboJPEG run only when installed
(PyTurboJPEG also needs the system libturbojpeg). Warm-up rounds are excluded; each record is
the best of ``--rounds``, taken round-robin over the decoders.

Run: ``flock /tmp/ffbench.lock python benchmarks/image_decode.py [--images N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext

from framefeed.image import ImageBackend, decode_image, decode_images, shutdown_image_pool
from framefeed.synth.frames import draw_frame

Decode = Callable[[bytes, np.ndarray], None]


def encode_jpeg(image: np.ndarray, sampling: str = "420", qscale: int = 3) -> bytes:
    """A JPEG of an HWC RGB frame from FFmpeg's mjpeg encoder (qscale 3 is about quality 90)."""
    height, width = image.shape[:2]
    pix_fmt = f"yuvj{sampling}p"
    ctx = av.CodecContext.create("mjpeg", "w")
    assert isinstance(ctx, VideoCodecContext)
    ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
    ctx.time_base = Fraction(1, 30)
    ctx.qmin = ctx.qmax = qscale
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    frame.pts = 0
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def ffmpeg_before(data: bytes, out: np.ndarray) -> None:
    """framefeed's image decode before the image module (the baseline)."""
    ctx = av.CodecContext.create("mjpeg", "r")
    frames = ctx.decode(av.Packet(data)) + ctx.decode(None)  # type: ignore[attr-defined]
    out[...] = frames[0].to_ndarray(format="rgb24").transpose(2, 0, 1)


def decoders() -> dict[str, Decode]:
    found: dict[str, Decode] = {
        "ffmpeg_before": ffmpeg_before,
        "ffmpeg": lambda d, o: _ignore(decode_image(d, out=o, backend=ImageBackend.FFMPEG)),
    }
    try:
        import simplejpeg  # noqa: F401

        found["simplejpeg"] = lambda d, o: _ignore(
            decode_image(d, out=o, backend=ImageBackend.SIMPLEJPEG)
        )
    except ImportError:
        pass
    try:
        from PIL import Image

        def pil(data: bytes, out: np.ndarray) -> None:
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            out[...] = rgb.transpose(2, 0, 1)

        found["pil"] = pil
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()

        def turbojpeg(data: bytes, out: np.ndarray) -> None:
            out[...] = turbo.decode(data, pixel_format=TJPF_RGB).transpose(2, 0, 1)

        found["turbojpeg"] = turbojpeg
    except (ImportError, RuntimeError, OSError):  # no package, or no libturbojpeg
        pass
    return found


def _ignore(_: Any) -> None:
    return None


def run_harness(decode: Decode, blobs: list[bytes], out: np.ndarray, threads: int) -> None:
    """Decode every blob into ``out``, split into ``threads`` equal shares."""
    bounds = np.linspace(0, len(blobs), threads + 1).astype(int).tolist()

    def share(k: int) -> None:
        for i in range(bounds[k], bounds[k + 1]):
            decode(blobs[i], out[i])

    if threads == 1:
        share(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(share, range(threads)))


def timed(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def best_of(rounds: int, runs: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds of each run's fastest of ``rounds`` calls, after one warm-up call each.

    The rounds go round-robin over the runs, so a burst of load from another process on this
    shared machine slows every decoder alike instead of one of them.
    """
    best = {}
    for name, run in runs.items():
        run()
        best[name] = float("inf")
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="distinct JPEGs per size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--sampling",
        nargs="+",
        default=["420", "422", "444"],
        help="chroma subsampling: 420 (most cameras), 422 (UVC webcams' MJPEG), 444",
    )
    args = parser.parse_args()
    found = decoders()
    for height, width in ((240, 320), (480, 640)):
        frames = [
            draw_frame(1, i, 1, height, width, texture=True, seed=0) for i in range(args.images)
        ]
        out = np.empty((len(frames), 3, height, width), np.uint8)
        for sampling, threads in itertools.product(args.sampling, args.threads):
            blobs = [encode_jpeg(f, sampling) for f in frames]
            runs: dict[str, Callable[[], None]] = {
                name: functools.partial(run_harness, decode, blobs, out, threads)
                for name, decode in found.items()
            }
            runs["framefeed"] = functools.partial(
                decode_images, blobs, out, describe=str, threads=threads
            )
            results = best_of(args.rounds, runs)
            for name, seconds in results.items():
                record = {
                    "bench": "image_decode",
                    "size": f"{width}x{height}",
                    "sampling": sampling,
                    "threads": threads,
                    "decoder": name,
                    "images": len(blobs),
                    "mean_jpeg_bytes": int(np.mean([len(b) for b in blobs])),
                    "ms_per_image": round(seconds / len(blobs) * 1e3, 4),
                    "images_per_s": round(len(blobs) / seconds, 1),
                    "speedup_vs_ffmpeg_before": round(results["ffmpeg_before"] / seconds, 3),
                    "speedup_vs_ffmpeg": round(results["ffmpeg"] / seconds, 3),
                }
                print(json.dumps(record), flush=True)
    shutdown_image_pool()


if __name__ == "__main__":
    main()
