"""Encoded images: JPEG/PNG to uint8 CHW RGB with both backends, batches in parallel threads."""

from __future__ import annotations

import multiprocessing
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from av.video.codeccontext import VideoCodecContext
from conftest import IMAGE, copy_dataset, data_files

from framefeed import ConfigError, DecodeError, ImageDecoder, MapDataset
from framefeed import image as image_module
from framefeed.image import (
    ImageBackend,
    decode_image,
    decode_images,
    image_blobs,
    shutdown_image_pool,
)
from framefeed.synth import read_marker
from framefeed.synth.frames import draw_frame

pytestmark = pytest.mark.timeout(120)

BACKENDS = [ImageBackend.AUTO, ImageBackend.FFMPEG, ImageBackend.SIMPLEJPEG]


def _frame(height: int = 48, width: int = 64, frame: int = 3) -> np.ndarray:
    """A synthetic HWC RGB frame carrying the marker (episode 1, ``frame``); camera 1 is in
    colour (camera 0 would be grey, blind to channel order)."""
    return draw_frame(1, frame, 1, height, width, texture=False, seed=0)


def _encode(image: np.ndarray, codec: str, pix_fmt: str) -> bytes:
    """One image encoded by FFmpeg (``mjpeg`` or ``png``) from an HWC (or HW grey) array."""
    height, width = image.shape[:2]
    ctx = av.CodecContext.create(codec, "w")
    assert isinstance(ctx, VideoCodecContext)
    ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
    ctx.time_base = Fraction(1, 30)
    src_format = "gray" if image.ndim == 2 else {3: "rgb24", 4: "rgba"}[image.shape[2]]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=src_format)
    frame = frame.reformat(format=pix_fmt)
    frame.pts = 0
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def jpeg(image: np.ndarray, pix_fmt: str = "yuvj420p") -> bytes:
    """A JPEG, by default 4:2:0 as most cameras write them."""
    return _encode(image, "mjpeg", pix_fmt)


def png(image: np.ndarray, pix_fmt: str = "rgb24") -> bytes:
    return _encode(image, "png", pix_fmt)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# --- single images -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("size", [(48, 64), (240, 320), (37, 51)], ids=str)
def test_jpeg_to_chw_rgb(backend: ImageBackend, size: tuple[int, int]) -> None:
    height, width = size
    src = _frame(max(height, 32), max(width, 48))[:height, :width]
    out = decode_image(jpeg(np.ascontiguousarray(src)), backend=backend)
    assert out.dtype == np.uint8 and out.shape == (3, height, width)
    assert out.flags["C_CONTIGUOUS"]
    assert _psnr(out.transpose(1, 2, 0), src) > 30
    if min(size) >= 48:
        assert read_marker(out) == (1, 3)


def test_backends_agree_within_rounding() -> None:
    data = jpeg(_frame(240, 320))
    ffmpeg = decode_image(data, backend=ImageBackend.FFMPEG).astype(np.int16)
    fast = decode_image(data, backend=ImageBackend.SIMPLEJPEG).astype(np.int16)
    # Different IDCT and chroma upsampling: under one level on average, 99% of values within
    # two levels; only pixels at sharp colour edges differ more.
    diff = np.abs(ffmpeg - fast)
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99) <= 3
    assert diff.max() <= 32
    assert not np.array_equal(ffmpeg, fast)  # two libraries, really


def test_auto_routes_444_jpegs_to_simplejpeg_and_the_rest_to_ffmpeg() -> None:
    simplejpeg = pytest.importorskip("simplejpeg")
    src = _frame(240, 320)
    for data, fast in (
        (jpeg(src), False),
        (jpeg(src, "yuvj422p"), False),
        (jpeg(src, "yuvj444p"), True),
    ):
        expected = decode_image(
            data, backend=ImageBackend.SIMPLEJPEG if fast else ImageBackend.FFMPEG
        )
        np.testing.assert_array_equal(decode_image(data), expected)
    grey = simplejpeg.encode_jpeg(np.ascontiguousarray(src[:, :, :1]), colorspace="GRAY")
    np.testing.assert_array_equal(
        decode_image(grey), decode_image(grey, backend=ImageBackend.FFMPEG)
    )


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("encode", [jpeg, png])
def test_channel_order_is_rgb(backend: ImageBackend, encode: Any) -> None:
    src = np.zeros((48, 64, 3), np.uint8)
    src[:16, :, 0] = 250  # red band on top, green in the middle, blue at the bottom
    src[16:32, :, 1] = 250
    src[32:, :, 2] = 250
    out = decode_image(encode(src), backend=backend).astype(int)
    for channel, band in enumerate((slice(2, 14), slice(18, 30), slice(34, 46))):
        assert out[channel, band].mean() > 200, channel
        others = [c for c in range(3) if c != channel]
        assert out[others][:, band].mean() < 50, channel


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_png_rgb_is_lossless(backend: ImageBackend) -> None:
    src = _frame()
    out = decode_image(png(src), backend=backend)
    np.testing.assert_array_equal(out, src.transpose(2, 0, 1))


def test_png_grey_rgba_and_16_bit_become_rgb() -> None:
    src = _frame()
    grey = np.ascontiguousarray(src[:, :, 1])
    out = decode_image(png(grey, "gray"))
    for channel in out:
        np.testing.assert_array_equal(channel, grey)

    rgba = np.concatenate([src, np.full((*src.shape[:2], 1), 7, np.uint8)], axis=2)
    out = decode_image(png(rgba, "rgba"))
    np.testing.assert_array_equal(out, src.transpose(2, 0, 1))  # alpha dropped, not blended

    deep = png(src, "rgb48be")
    np.testing.assert_array_equal(decode_image(deep), src.transpose(2, 0, 1))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_grey_and_444_jpegs(backend: ImageBackend) -> None:
    simplejpeg = pytest.importorskip("simplejpeg")
    src = _frame()
    grey = np.ascontiguousarray(src[:, :, :1])
    out = decode_image(simplejpeg.encode_jpeg(grey, quality=95, colorspace="GRAY"), backend=backend)
    assert out.shape == (3, 48, 64)
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    assert np.abs(out[0].astype(int) - grey[:, :, 0]).max() <= 8
    full = simplejpeg.encode_jpeg(src, quality=95, colorsubsampling="444")
    assert _psnr(decode_image(full, backend=backend).transpose(1, 2, 0), src) > 35


def test_decodes_into_out_and_checks_its_size() -> None:
    data = jpeg(_frame())
    for backend in BACKENDS:
        out = np.zeros((3, 48, 64), np.uint8)
        assert decode_image(data, backend=backend, out=out) is out
        assert read_marker(out) == (1, 3)
        with pytest.raises(DecodeError, match=r"cam row 4: the image is 64x48, but this column's"):
            decode_image(data, "cam row 4", backend=backend, out=np.zeros((3, 32, 64), np.uint8))
    with pytest.raises(DecodeError, match="the image is 64x48"):
        decode_image(png(_frame()), out=np.zeros((3, 48, 48), np.uint8))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_bad_bytes_are_decode_errors(backend: ImageBackend) -> None:
    with pytest.raises(DecodeError, match=r"cam row 2: not a PNG or JPEG image \(it starts with"):
        decode_image(b"GIF89a\x01\x00", "cam row 2", backend=backend)
    with pytest.raises(DecodeError, match="cam row 2: cannot decode the JPEG image"):
        decode_image(b"\xff\xd8\xff" + b"garbage" * 10, "cam row 2", backend=backend)
    with pytest.raises(DecodeError, match="cam row 2: cannot decode the PNG image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"x" * 20, "cam row 2", backend=backend)


def test_jpeg_simplejpeg_refuses_falls_back_to_ffmpeg() -> None:
    """A truncated JPEG: simplejpeg (strict) refuses it, FFmpeg decodes what is there."""
    data = jpeg(_frame(240, 320))
    cut = data[: len(data) // 2]
    expected = decode_image(cut, backend=ImageBackend.FFMPEG)
    np.testing.assert_array_equal(decode_image(cut, backend=ImageBackend.AUTO), expected)
    np.testing.assert_array_equal(decode_image(cut, backend=ImageBackend.SIMPLEJPEG), expected)


def test_without_simplejpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg(_frame(), "yuvj444p")  # AUTO would pick simplejpeg for it
    expected = decode_image(data, backend=ImageBackend.FFMPEG)
    monkeypatch.setattr(image_module, "_simplejpeg", None)
    np.testing.assert_array_equal(decode_image(data), expected)  # AUTO falls back to FFmpeg
    with pytest.raises(ImportError, match=r"pip install 'framefeed\[jpeg\]'"):
        decode_image(data, backend=ImageBackend.SIMPLEJPEG)
    with pytest.raises(ImportError, match="simplejpeg"):
        decode_images(
            [data],
            np.empty((1, 3, 48, 64), np.uint8),
            describe=str,
            threads=1,
            backend=ImageBackend.SIMPLEJPEG,
        )


# --- batches -----------------------------------------------------------------------------------


def _image_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("framefeed-image")]


def test_batch_in_threads_equals_serial() -> None:
    blobs: list[bytes | None] = [
        jpeg(_frame(frame=i)) if i % 3 else png(_frame(frame=i)) for i in range(11)
    ]
    serial = np.empty((11, 3, 48, 64), np.uint8)
    decode_images(blobs, serial, describe=str, threads=1)
    for threads in (2, 3, 16):
        out = np.zeros_like(serial)
        decode_images(blobs, out, describe=str, threads=threads)
        np.testing.assert_array_equal(out, serial)
    assert [read_marker(x) for x in serial] == [(1, i) for i in range(11)]
    assert 0 < len(_image_threads()) <= 8  # the process's pool, bounded
    shutdown_image_pool()
    assert _image_threads() == []
    shutdown_image_pool()  # idempotent


def test_batch_errors_name_the_image_from_any_thread() -> None:
    good = jpeg(_frame())
    for bad_at in (0, 9):  # decoded by the calling thread, then by a pool thread
        blobs: list[bytes | None] = [good] * 10
        blobs[bad_at] = b"nonsense"
        with pytest.raises(DecodeError, match=rf"^cam row {bad_at}: not a PNG or JPEG"):
            decode_images(
                blobs,
                np.empty((10, 3, 48, 64), np.uint8),
                describe=lambda i: f"cam row {i}",
                threads=3,
            )
    blobs = [good, None, good]
    with pytest.raises(DecodeError, match=r"cam row 1: no image \(the value is null\)"):
        decode_images(
            blobs, np.empty((3, 3, 48, 64), np.uint8), describe=lambda i: f"cam row {i}", threads=2
        )
    shutdown_image_pool()


def _decode_in_child(queue: Any, blobs: list[bytes | None]) -> None:
    out = np.empty((len(blobs), 3, 48, 64), np.uint8)
    decode_images(blobs, out, describe=str, threads=2)
    queue.put([read_marker(x) for x in out])


def test_pool_works_in_a_forked_child() -> None:
    blobs: list[bytes | None] = [jpeg(_frame(frame=i)) for i in range(6)]
    decode_images(blobs, np.empty((6, 3, 48, 64), np.uint8), describe=str, threads=2)
    assert _image_threads()  # the parent's pool is running when it forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(queue, blobs))
    child.start()
    try:
        assert queue.get(timeout=60) == [(1, i) for i in range(6)]
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    shutdown_image_pool()


# --- column values -----------------------------------------------------------------------------


def test_image_blobs_from_every_layout() -> None:
    a, b = jpeg(_frame(frame=1)), png(_frame(frame=2))
    rows = np.array([1, 0, 1])
    expected = [b, a, b]
    binary = pa.array([a, b])
    assert image_blobs(binary, rows) == expected
    assert image_blobs(binary.cast(pa.large_binary()), rows) == expected
    assert image_blobs(pa.chunked_array([[a], [b]]), rows) == expected
    lerobot = pa.array([{"bytes": a, "path": "x.jpg"}, {"bytes": b, "path": None}])
    assert image_blobs(lerobot, rows) == expected
    as_list = pa.array([list(a), list(b)], type=pa.list_(pa.uint8()))
    assert image_blobs(as_list, rows) == expected
    assert image_blobs(as_list.slice(1), np.array([0])) == [b]
    assert image_blobs(pa.array([a, None]), np.array([1, 0])) == [None, a]
    with pytest.raises(DecodeError, match=r"type struct<path: string> has no 'bytes' field"):
        image_blobs(pa.array([{"path": "x"}]), np.array([0]))
    with pytest.raises(DecodeError, match="expected encoded bytes"):
        image_blobs(pa.array([1, 2]), np.array([0]))


# --- the decoder in a dataset ------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_root(plain_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plain_root`` with its PNG image feature re-encoded as JPEG (same frames, same marker)."""
    root = copy_dataset(plain_root, tmp_path_factory.mktemp("jpeg") / "ds")
    for path in data_files(root):
        parquet = pq.ParquetFile(path)
        tables = []
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            column = table.column(IMAGE).combine_chunks()
            pngs = pc.struct_field(column, "bytes").to_pylist()
            jpegs = [jpeg(decode_image(p).transpose(1, 2, 0)) for p in pngs]
            new = pa.StructArray.from_arrays(
                [pa.array(jpegs, pa.binary()), pa.array([None] * len(jpegs), pa.string())],
                fields=list(column.type),
            )
            tables.append(table.set_column(table.schema.get_field_index(IMAGE), IMAGE, new))
        with pq.ParquetWriter(path, tables[0].schema) as writer:
            for table in tables:  # one row group per episode, as the writer made them
                writer.write_table(table)
    return root


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("threads", [1, 2])
def test_image_decoder_in_a_dataset(
    plain_root: Path, jpeg_root: Path, backend: ImageBackend, threads: int
) -> None:
    from framefeed import Field

    decoder = ImageDecoder(threads=threads, backend=backend)
    fields = [Field(IMAGE, decode=decoder), Field(IMAGE, decode=decoder, key="w", window=[-1, 0])]
    with MapDataset(jpeg_root, fields=fields) as ds, MapDataset(plain_root, fields=fields) as ref:
        picks = list(range(0, len(ds), 3))
        batch, exact = ds.get_batch(picks), ref.get_batch(picks)
        assert batch[IMAGE].dtype == torch.uint8 and batch[IMAGE].shape == (len(picks), 3, 48, 64)
        assert batch["w"].shape == (len(picks), 2, 3, 48, 64)
        for i, sample in enumerate(picks):
            episode, frame = read_marker(exact[IMAGE][i].numpy())
            assert read_marker(batch[IMAGE][i].numpy()) == (episode, frame), sample
            assert _psnr(batch[IMAGE][i].numpy(), exact[IMAGE][i].numpy()) > 30
        assert torch.equal(batch["w"][:, 1], batch[IMAGE])
    shutdown_image_pool()


def test_image_decoder_arguments() -> None:
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        ImageDecoder(threads=0)
    assert ImageDecoder().backend is ImageBackend.AUTO
