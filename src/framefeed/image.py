"""Encoded images: JPEG and PNG bytes to uint8 CHW RGB, one image or a batch in parallel.

FFmpeg (PyAV, always there) decodes PNG and JPEG and converts to planar RGB in its scaler (one
thread). That path is 1.4-2.0x faster than framefeed's first one, whose cost was mostly a scaler
thread pool made per image and an HWC->CHW transpose. With `simplejpeg` installed
(libjpeg-turbo, statically linked in a ~1 MB wheel; ``pip install 'framefeed[jpeg]'``), 4:4:4
YCbCr JPEGs go through it instead, 1.35-1.55x faster than FFmpeg there; on 4:2:0 (most cameras)
and 4:2:2 JPEGs FFmpeg is as fast or faster at 640x480, so they stay with FFmpeg
(``python benchmarks/image_decode.py`` measures every library on each). A JPEG simplejpeg refuses
(12-bit, damaged) falls back to FFmpeg. The two libraries' pixels differ slightly (IDCT and
chroma upsampling: about 0.5 levels on average, 99% of values within 2 levels, up to ~20 at
sharp colour edges); ``backend=ImageBackend.FFMPEG`` gives FFmpeg's pixels everywhere.

Colour: greyscale becomes three equal channels, palette images are expanded, and an alpha
channel is dropped (not composited), as FFmpeg's RGB conversion does. Both decoders release the
GIL, so `decode_images` spreads a batch over a small thread pool owned by the process (created
on first use, rebuilt after ``fork``, bounded to 8 threads; `shutdown_image_pool` stops it).
"""

from __future__ import annotations

import enum
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from av.video.codeccontext import VideoCodecContext

from .errors import DecodeError

__all__ = [
    "ImageBackend",
    "decode_image",
    "decode_images",
    "image_blobs",
    "shutdown_image_pool",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_RGB_PLANES = (2, 0, 1)  # gbrp stores G, B, R
_POOL_LIMIT = 8
_LABEL = {"png": "PNG", "mjpeg": "JPEG"}

try:  # the fast JPEG path is optional
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None


class ImageBackend(enum.Enum):
    """Which library decodes JPEG (PNG is always decoded by FFmpeg)."""

    AUTO = "auto"
    """FFmpeg, or simplejpeg (when installed) for 4:4:4 YCbCr JPEGs."""
    FFMPEG = "ffmpeg"
    """FFmpeg (PyAV) for every image."""
    SIMPLEJPEG = "simplejpeg"
    """simplejpeg for every JPEG (``ImportError`` naming the pip line if it is missing); FFmpeg
    for PNG and for JPEGs simplejpeg refuses."""


def _require_simplejpeg() -> Any:
    if _simplejpeg is None:
        raise ImportError(
            "ImageBackend.SIMPLEJPEG needs simplejpeg: pip install 'framefeed[jpeg]' "
            "(or pip install simplejpeg)"
        )
    return _simplejpeg


def decode_image(
    data: bytes | bytearray | memoryview,
    what: str = "image",
    *,
    out: np.ndarray | None = None,
    backend: ImageBackend = ImageBackend.AUTO,
) -> np.ndarray:
    """One PNG or JPEG as uint8 (3, H, W) RGB, written into ``out`` when given.

    ``what`` names the image in errors (``"camera row 12"``). A `DecodeError` says what went
    wrong: not an image, a damaged one, or one whose size differs from ``out``'s.
    """
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        return _ffmpeg(data, "png", what, out)
    if not head.startswith(JPEG_SIGNATURE):
        raise DecodeError(
            f"{what}: not a PNG or JPEG image (it starts with {head!r}; {len(data)} bytes)"
        )
    if backend is ImageBackend.FFMPEG or (backend is ImageBackend.AUTO and _simplejpeg is None):
        return _ffmpeg(data, "mjpeg", what, out)
    sj = _require_simplejpeg()
    try:
        if backend is ImageBackend.AUTO and sj.decode_jpeg_header(data)[2:] != ("YCbCr", "444"):
            return _ffmpeg(data, "mjpeg", what, out)  # as fast or faster there (see above)
        hwc = sj.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        # Formats libjpeg-turbo will not convert to RGB, or damage it is strict about: FFmpeg
        # decodes what it can, exactly as ImageBackend.FFMPEG would.
        return _ffmpeg(data, "mjpeg", what, out)
    chw = hwc.transpose(2, 0, 1)
    if out is None:
        return np.ascontiguousarray(chw)
    _check_size(out, chw.shape[1], chw.shape[2], what)
    out[...] = chw
    return out


def _check_size(out: np.ndarray, height: int, width: int, what: str) -> None:
    if out.shape != (3, height, width):
        raise DecodeError(
            f"{what}: the image is {width}x{height}, but this column's images are "
            f"{out.shape[-1]}x{out.shape[-2]} (width x height); every row must have one size"
        )


def _ffmpeg(data: bytes | bytearray | memoryview, codec: str, what: str, out: Any) -> np.ndarray:
    try:
        ctx = av.CodecContext.create(codec, "r")
        if not isinstance(ctx, VideoCodecContext):
            raise DecodeError(f"{what}: {codec} is not an image codec")
        frames = ctx.decode(av.Packet(data))  # type: ignore[arg-type, unused-ignore]  # PyAV < 18 typed it bytes-only
        frames += ctx.decode(None)
    except av.FFmpegError as exc:
        raise DecodeError(
            f"{what}: cannot decode the {_LABEL[codec]} image ({exc}); the bytes are damaged "
            "or in a variant FFmpeg does not read"
        ) from exc
    if not frames:
        raise DecodeError(f"{what}: the {_LABEL[codec]} image holds no picture")
    frame = frames[0]
    height, width = frame.height, frame.width
    if out is None:
        out = np.empty((3, height, width), dtype=np.uint8)
    else:
        _check_size(out, height, width, what)
    # Planar GBR straight from the scaler: three plane copies instead of an HWC transpose.
    # One scaler thread: PyAV's default starts a pool per scaler (see video/decoder.py).
    planes = frame.reformat(format="gbrp", threads=1).planes
    for channel, plane_no in enumerate(_RGB_PLANES):
        plane = planes[plane_no]
        rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(height, plane.line_size)
        out[channel] = rows[:, :width]
    result: np.ndarray = out
    return result


def image_blobs(column: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> list[bytes | None]:
    """The encoded bytes of ``rows`` of an image column, with one vectorised gather.

    Accepts ``binary`` / ``large_binary`` (Rerun blobs), a struct with a ``bytes`` field
    (LeRobot / Hugging Face images) and ``list<uint8>``; null rows give ``None``.
    """
    picked = column.take(pa.array(np.asarray(rows, dtype=np.int64)))
    if isinstance(picked, pa.ChunkedArray):
        picked = picked.combine_chunks()
    t = picked.type
    if isinstance(t, pa.ExtensionType):
        picked, t = picked.storage, t.storage_type
    if pa.types.is_struct(t):
        if t.get_field_index("bytes") < 0:
            fields = [t.field(i).name for i in range(t.num_fields)]
            raise DecodeError(f"image column of type {t} has no 'bytes' field (fields: {fields})")
        picked = pc.struct_field(picked, "bytes")
        t = picked.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        blobs: list[bytes | None] = picked.to_pylist()
        return blobs
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_uint8(t.value_type):
        lengths = pc.list_value_length(picked).fill_null(0).to_numpy(zero_copy_only=False)
        ends = np.cumsum(lengths)
        flat = picked.flatten().to_numpy(zero_copy_only=False)
        valid = picked.is_valid().to_numpy(zero_copy_only=False)
        return [
            flat[end - n : end].tobytes() if ok else None
            for n, end, ok in zip(lengths.tolist(), ends.tolist(), valid.tolist(), strict=True)
        ]
    raise DecodeError(
        f"image column of type {t}: expected encoded bytes (binary, a struct with 'bytes', or "
        "list<uint8>)"
    )


class _ProcessPool:
    """The process's image decode threads: made on first use, replaced after ``fork``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is not None and self._pid != os.getpid():
                self._executor = None  # the parent's threads do not exist in this child
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    _POOL_LIMIT, thread_name_prefix="framefeed-image"
                )
                self._pid = os.getpid()
            return self._executor

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            if executor is not None and self._pid == os.getpid():
                executor.shutdown(wait=True)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork


_POOL = _ProcessPool()
os.register_at_fork(after_in_child=_POOL.after_fork_in_child)


def shutdown_image_pool() -> None:
    """Stop the process's image decode threads (idempotent; the next batch starts new ones)."""
    _POOL.shutdown()


def decode_images(
    blobs: Sequence[bytes | bytearray | memoryview | None],
    out: np.ndarray,
    *,
    describe: Callable[[int], str],
    threads: int = 1,
    backend: ImageBackend = ImageBackend.AUTO,
    pool: Executor | None = None,
) -> None:
    """Decode ``blobs[i]`` into ``out[i]`` (uint8, shape (N, 3, H, W)) on up to ``threads``.

    The calling thread decodes one share itself; the others run on ``pool`` (a dataset's
    decode threads) or else on the process's pool, so at most ``threads`` images of this call
    decode at once. ``describe(i)`` names image ``i``
    in errors; a ``None`` blob is a `DecodeError` (a missing image).
    """
    n = len(blobs)
    if out.shape[0] != n:
        raise ValueError(f"out holds {out.shape[0]} images, blobs {n}")
    if backend is ImageBackend.SIMPLEJPEG:
        _require_simplejpeg()

    def run(items: range) -> None:
        for i in items:
            blob = blobs[i]
            if blob is None:
                raise DecodeError(f"{describe(i)}: no image (the value is null)")
            decode_image(blob, describe(i), out=out[i], backend=backend)

    parts = max(1, min(threads, n))
    bounds = np.linspace(0, n, parts + 1).astype(int).tolist()
    shares = [range(a, b) for a, b in itertools.pairwise(bounds)]
    if parts == 1:
        run(shares[0])
        return
    executor = pool if pool is not None else _POOL.get()
    futures: list[Future[None]] = [executor.submit(run, share) for share in shares[1:]]
    try:
        run(shares[0])
    finally:
        errors = [f.exception() for f in futures]  # wait for every share before returning
    for error in errors:
        if error is not None:
            raise error
