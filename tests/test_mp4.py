"""The MP4 ``moov`` parser: equal to PyAV's demuxer, reads only box headers and ``moov``, and
turns any malformed input into `DecodeError`.

Small MP4s (64x48, 30 fps) are encoded once per module with PyAV. Edit-list, ``ctts`` and box
layout variants are made by rewriting the ``moov`` of a moov-at-end file (so that no sample
moves) and are checked against PyAV on the rewritten bytes.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from av.video.codeccontext import VideoCodecContext
from av.video.stream import VideoStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framefeed.errors import DecodeError
from framefeed.video.index import VideoIndex
from framefeed.video.mp4 import index_from_fileobj, parse_mp4_index

pytestmark = pytest.mark.timeout(120)

_FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_X264 = {"bf": "2", "g": "12"}
# name: (encoder, frames, encoder options, faststart, audio track before/after the video)
_SPECS: dict[str, tuple[str, int, dict[str, str], bool, str | None]] = {
    "av1": ("libsvtav1", 48, {"crf": "30", "preset": "12", "g": "2"}, True, None),
    "h264": ("libx264", 60, _X264, True, None),
    "h264_moov_end": ("libx264", 50, _X264, False, None),
    "h264_audio_before": ("libx264", 45, _X264, False, "before"),
    "h264_audio_after": ("libx264", 45, _X264, True, "after"),
    "hevc": ("libx265", 45, {"x265-params": "log-level=none:bframes=2:keyint=12"}, False, None),
    "vp9": ("libvpx-vp9", 40, {"g": "10", "deadline": "realtime", "cpu-used": "8"}, True, None),
}
NAMES = tuple(_SPECS)

# A box tree: (type, payload bytes or children).
_Tree = list[list[Any]]
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"}


def _image(i: int) -> np.ndarray:
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :, 0] = (i * 4) % 256
    img[i % 48, :, 1] = 255
    img[:, (i * 3) % 64, 2] = 200
    return img


def _encode(path: Path, spec: tuple[str, int, dict[str, str], bool, str | None]) -> bytes:
    codec, frames, options, faststart, audio = spec
    with av.open(
        str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}
    ) as out:
        sound = out.add_stream("aac", rate=8000) if audio == "before" else None
        video = out.add_stream(codec, rate=30, options=options)
        assert isinstance(video, VideoStream)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        if audio == "after":
            sound = out.add_stream("aac", rate=8000)
        for i in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(_image(i), format="rgb24")):
                out.mux(packet)
            if sound is not None and i % 4 == 0:
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
                chunk.sample_rate, chunk.pts = 8000, i // 4 * 1024
                for packet in sound.encode(chunk):
                    out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        for packet in sound.encode() if sound is not None else ():
            out.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes | None]:
    folder = tmp_path_factory.mktemp("mp4")
    return {
        name: _encode(folder / f"{name}.mp4", spec) if spec[0] in av.codecs_available else None
        for name, spec in _SPECS.items()
    }


def _video(videos: dict[str, bytes | None], name: str) -> bytes:
    data = videos[name]
    if data is None:
        pytest.skip(f"PyAV has no {_SPECS[name][0]} encoder")
    return data


@dataclass(frozen=True)
class _Box:
    kind: bytes
    offset: int
    header: int
    size: int


def _top_boxes(data: bytes) -> list[_Box]:
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[offset + 8 : offset + 16])[0], 16
        boxes.append(_Box(kind, offset, header, size or len(data) - offset))
        offset += boxes[-1].size
    return boxes


def _parse(data: bytes) -> _Tree:
    tree, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + size]
        tree.append([kind, _parse(body) if kind in _CONTAINERS else body])
        offset += size
    return tree


def _serialize(tree: _Tree) -> bytes:
    out = b""
    for kind, body in tree:
        payload = _serialize(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", len(payload) + 8, kind) + payload
    return out


def _find(tree: _Tree, *path: bytes) -> list[Any]:
    for box in tree:
        if box[0] == path[0]:
            return box if len(path) == 1 else _find(box[1], *path[1:])
    raise KeyError(path)


def _video_trak(moov: _Tree) -> _Tree:
    for kind, body in moov:
        if kind == b"trak" and _find(body, b"mdia", b"hdlr")[1][8:12] == b"vide":
            return body  # type: ignore[no-any-return]
    raise KeyError("vide")


def _rewrite_moov(data: bytes, mutate: Callable[[_Tree], None]) -> bytes:
    """Apply ``mutate`` to the ``moov`` children of a moov-at-end file: no sample moves."""
    tree = _parse(data)
    assert tree[-1][0] == b"moov", "rewrite needs moov at the end"
    mutate(tree[-1][1])
    return _serialize(tree)


class _Reader:
    """A ``read`` callback over bytes that records what it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset : offset + length]

    @property
    def bytes_read(self) -> int:
        return sum(len(self.data[o : o + n]) for o, n in self.calls)


def _assert_same(got: VideoIndex, want: VideoIndex) -> None:
    for field in ("codec", "extradata", "width", "height", "time_base"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("pts", "dts", "pos", "size", "keyframe"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)


def _check_against_pyav(data: bytes, name: str = "variant.mp4") -> VideoIndex:
    got = parse_mp4_index(_Reader(data), len(data), name)
    _assert_same(got, VideoIndex.from_file(io.BytesIO(data), name))
    return got


# --- agreement with PyAV, and what is read ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matches_pyav_reading_only_headers_and_moov(
    videos: dict[str, bytes | None], name: str
) -> None:
    data = _video(videos, name)
    reader = _Reader(data)
    got = parse_mp4_index(reader, len(data), f"{name}.mp4")
    _assert_same(got, VideoIndex.from_file(io.BytesIO(data), f"{name}.mp4"))
    assert got.time_base == Fraction(1, 15360) and (got.width, got.height) == (64, 48)
    boxes = _top_boxes(data)
    kinds = [box.kind for box in boxes]
    assert (kinds.index(b"moov") < kinds.index(b"mdat")) == _SPECS[name][3]
    moov = boxes[kinds.index(b"moov")]
    headers = {box.offset for box in boxes[: kinds.index(b"moov") + 1]}
    for offset, length in reader.calls:  # a header read, or inside the moov box
        inside = moov.offset <= offset and offset + length <= moov.offset + moov.size
        assert (offset in headers and length <= 16) or inside, (offset, length)
    assert reader.bytes_read <= moov.size + 16 * len(headers)


@pytest.mark.parametrize("name", NAMES)
def test_indexed_packets_decode_to_one_frame_each(
    videos: dict[str, bytes | None], name: str
) -> None:
    data = _video(videos, name)
    index = index_from_fileobj(io.BytesIO(data), name)
    ctx = av.CodecContext.create(index.codec, "r")
    assert isinstance(ctx, VideoCodecContext)
    if index.extradata:
        ctx.extradata = index.extradata
    frames = []
    for pos, size in zip(index.pos.tolist(), index.size.tolist(), strict=True):
        frames += ctx.decode(av.Packet(data[pos : pos + size]))
    frames += ctx.decode(None)
    assert len(frames) == index.num_frames
    assert {(f.width, f.height) for f in frames} == {(index.width, index.height)}


def test_index_from_a_real_file(videos: dict[str, bytes | None], tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(_video(videos, "h264_moov_end"))
    with path.open("rb") as f:
        got = index_from_fileobj(f, str(path))
    with path.open("rb") as f:
        _assert_same(got, VideoIndex.from_file(f, str(path)))


# --- edit lists and timing tables, as FFmpeg applies them ----------------------------------


def _elst(entries: list[tuple[int, int]], version: int = 0) -> Callable[[_Tree], None]:
    """Replace the video track's edit list with (duration in movie units, media time) rows."""

    def mutate(moov: _Tree) -> None:
        row = ">QqI" if version else ">IiI"
        body = struct.pack(">II", version << 24, len(entries))
        body += b"".join(struct.pack(row, d, t, 0x10000) for d, t in entries)
        trak = _video_trak(moov)
        trak[:] = [box for box in trak if box[0] != b"edts"]
        trak.insert(1, [b"edts", [[b"elst", body]]])

    return mutate


def _no_edts(moov: _Tree) -> None:
    trak = _video_trak(moov)
    trak[:] = [box for box in trak if box[0] != b"edts"]


def _table(box: list[Any], rows: list[tuple[int, ...]], version: int = 0) -> None:
    fmt = ">" + "I" * len(rows[0])
    box[1] = struct.pack(">II", version << 24, len(rows)) + b"".join(
        struct.pack(fmt, *(v & 0xFFFFFFFF for v in row)) for row in rows
    )


def _rows(box: list[Any], width: int) -> list[tuple[int, ...]]:
    count = struct.unpack(">I", box[1][4:8])[0]
    return [
        struct.unpack(f">{width}I", box[1][8 + 4 * width * i : 8 + 4 * width * (i + 1)])
        for i in range(count)
    ]


def _stbl(moov: _Tree, kind: bytes) -> list[Any]:
    return _find(_video_trak(moov), b"mdia", b"minf", b"stbl", kind)


def _ctts_negative(moov: _Tree) -> None:  # ctts v1 with negative offsets
    box = _stbl(moov, b"ctts")
    _table(box, [(n, off - 1024) for n, off in _rows(box, 2)], version=1)


def _stts(rows: list[tuple[int, ...]]) -> Callable[[_Tree], None]:
    def mutate(moov: _Tree) -> None:
        _table(_stbl(moov, b"stts"), rows)

    return mutate


def _chain(*steps: Callable[[_Tree], None]) -> Callable[[_Tree], None]:
    def mutate(moov: _Tree) -> None:
        for step in steps:
            step(moov)

    return mutate


# Movie timescale 1000: the files span about 1667 units, one frame (512 of 15360) is ~33.
FULL, FRAME = 1667, 33
VARIANTS: dict[str, Callable[[_Tree], None]] = {
    "as written": _chain(),
    "no edit list": _no_edts,
    "empty edit first": _elst([(500, -1), (FULL, 1024)]),
    "two empty edits": _elst([(100, -1), (233, -1), (FULL, 1024)]),
    "starts mid-GOP": _elst([(FULL - 5 * FRAME, 1024 + 5 * 512)]),
    "ends early": _elst([(800, 1024)]),
    "two edits": _elst([(10 * FRAME, 1024), (10 * FRAME, 1024 + 20 * 512)]),
    "media time 0": _elst([(FULL, 0)]),
    "zero duration": _elst([(0, 1024)]),
    "past the end": _elst([(FULL, 1024 + 512 * 1000)]),
    "elst version 1": _elst([(300, -1), (FULL, 1024)], version=1),
    "ctts v1 negative": _ctts_negative,
    "ctts v1 negative, no edits": _chain(_ctts_negative, _no_edts),
    "variable frame rate": _stts([(10, 512), (10, 1024), (30, 256)]),
    "stts short of samples": _stts([(20, 512), (10, 700)]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["h264_moov_end", "h264_audio_before", "hevc"])
def test_edit_lists_and_timing_tables_match_pyav(
    videos: dict[str, bytes | None], name: str, variant: str
) -> None:
    _check_against_pyav(_rewrite_moov(_video(videos, name), VARIANTS[variant]))


def test_edit_list_shifts_pts_like_pyav(videos: dict[str, bytes | None]) -> None:
    """FFmpeg's elst (media time 1024 = the first ctts offset) makes the first pts 0."""
    data = _video(videos, "h264_moov_end")
    got = _check_against_pyav(data)
    assert got.pts.min() == 0 and got.dts[0] == -1024
    plain = _check_against_pyav(_rewrite_moov(data, _no_edts))
    np.testing.assert_array_equal(plain.pts - 1024, got.pts)


def test_large_tables_are_vectorised(videos: dict[str, bytes | None]) -> None:
    """300k samples (IPIP... with reordering, edit list, 10-sample chunks) parse in a blink."""
    n, size, moov_at = 300_000, 100, 48 + 300_000 * 100
    tree = _parse(_video(videos, "h264_moov_end"))
    moov = tree[-1][1]

    def table(rows: np.ndarray) -> bytes:
        return struct.pack(">II", 0, len(rows)) + rows.astype(">u4").tobytes()

    tables = {
        b"stts": table(np.array([[n, 512]])),
        b"ctts": table(np.stack([np.ones(n), np.arange(n) % 2 == 0], axis=1) * [1, 1024]),
        b"stss": table(np.arange(0, n, 12) + 1),
        b"stsz": struct.pack(">III", 0, 0, n) + np.full(n, size, ">u4").tobytes(),
        b"stsc": table(np.array([[1, 10, 1]])),
        b"stco": table(48 + np.arange(n // 10) * 10 * size),
    }
    for box in _find(_video_trak(moov), b"mdia", b"minf", b"stbl")[1]:
        box[1] = tables.get(box[0], box[1])
    _elst([(n * 1000 // 30 + 1, 512)])(moov)
    head = struct.pack(">I4s24xI4sI4s", 32, b"ftyp", 8, b"free", n * size + 8, b"mdat")
    body = _serialize([tree[-1]])

    def read(offset: int, length: int) -> bytes:
        assert offset < len(head) or offset >= moov_at, "read inside mdat"
        return (head if offset < len(head) else body)[offset % moov_at : offset % moov_at + length]

    # Speed is the benchmark's business; the per-test timeout catches a pathological parse.
    index = parse_mp4_index(read, moov_at + len(body), "big.mp4")
    assert index.num_frames == n and index.keyframe.sum() == n // 12
    np.testing.assert_array_equal(np.diff(index.dts), 512)
    np.testing.assert_array_equal(np.sort(index.pts), np.arange(n) * 512)
    np.testing.assert_array_equal(index.pos, 48 + np.arange(n) * size)


# --- box layouts: 64-bit sizes, size 0, co64 ----------------------------------------------


def test_largesize_moov_and_size_zero(videos: dict[str, bytes | None]) -> None:
    data = _video(videos, "h264_moov_end")
    want = parse_mp4_index(_Reader(data), len(data), "x")
    moov = _top_boxes(data)[-1]
    assert moov.kind == b"moov"
    body = data[moov.offset + 8 :]
    large = data[: moov.offset] + struct.pack(">I4sQ", 1, b"moov", len(body) + 16) + body
    _assert_same(_check_against_pyav(large), want)
    to_end = data[: moov.offset] + struct.pack(">I4s", 0, b"moov") + body
    _assert_same(_check_against_pyav(to_end), want)


def test_largesize_mdat(videos: dict[str, bytes | None]) -> None:
    """FFmpeg leaves an 8-byte ``free`` before ``mdat`` so that it can grow a 64-bit header."""
    data = _video(videos, "h264_moov_end")
    want = parse_mp4_index(_Reader(data), len(data), "x")
    free, mdat = _top_boxes(data)[1:3]
    assert (free.kind, free.size, mdat.kind) == (b"free", 8, b"mdat")
    large = (
        data[: free.offset]
        + struct.pack(">I4sQ", 1, b"mdat", mdat.size + 8)
        + data[mdat.offset + 8 :]
    )
    _assert_same(_check_against_pyav(large), want)


@pytest.mark.parametrize("name", ["h264_moov_end", "h264_audio_before"])
def test_co64_offsets_equal_stco(videos: dict[str, bytes | None], name: str) -> None:
    data = _video(videos, name)
    want = parse_mp4_index(_Reader(data), len(data), "x")

    def to_co64(moov: _Tree) -> None:
        for kind, trak in moov:
            if kind == b"trak":
                stbl = _find(trak, b"mdia", b"minf", b"stbl")[1]
                box = _find(stbl, b"stco")
                offsets = [row[0] for row in _rows(box, 1)]
                box[0] = b"co64"
                box[1] = box[1][:8] + struct.pack(f">{len(offsets)}Q", *offsets)

    wide = _rewrite_moov(data, to_co64)
    assert b"co64" in wide and len(wide) > len(data)
    _assert_same(_check_against_pyav(wide), want)


# --- errors --------------------------------------------------------------------------------


def _expect_error(data: bytes, *words: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_mp4_index(_Reader(data), len(data), "bad.mp4")
    assert info.value.__cause__ is None
    for word in ("bad.mp4", *words):
        assert word in str(info.value)


def test_named_errors(videos: dict[str, bytes | None]) -> None:
    data = _video(videos, "h264_moov_end")
    moov = _top_boxes(data)[-1]
    _expect_error(data[: moov.offset], "no 'moov' box")
    _expect_error(data[: moov.offset + 100], "truncated 'moov' box")
    _expect_error(b"", "no 'moov' box")

    def not_video(moov_tree: _Tree) -> None:
        hdlr = _find(_video_trak(moov_tree), b"mdia", b"hdlr")
        hdlr[1] = hdlr[1][:8] + b"meta" + hdlr[1][12:]

    _expect_error(_rewrite_moov(data, not_video), "no video track")

    def cut_stsz(moov_tree: _Tree) -> None:
        box = _stbl(moov_tree, b"stsz")
        box[1] = box[1][:40]

    _expect_error(_rewrite_moov(data, cut_stsz), "truncated 'stsz' box")
    head = data[: moov.offset] + struct.pack(">I4s", 0xFFFFFF, b"moov") + data[moov.offset + 8 :]
    _expect_error(head, "truncated 'moov' box")


def _set_u32(kind: bytes, at: int, value: int) -> Callable[[_Tree], None]:
    def mutate(moov: _Tree) -> None:
        box = _stbl(moov, kind)
        box[1] = box[1][:at] + struct.pack(">I", value) + box[1][at + 4 :]

    return mutate


LIES: dict[str, Callable[[_Tree], None]] = {
    "stsz uniform size, 2^32-1 samples": _chain(
        _set_u32(b"stsz", 4, 1), _set_u32(b"stsz", 8, 0xFFFFFFFF)
    ),
    "stsz table of 2^32-1 entries": _set_u32(b"stsz", 8, 0xFFFFFFFF),
    "stsc 2^32-1 samples per chunk": _set_u32(b"stsc", 12, 0xFFFFFFFF),
    "stsc 2^32-1 entries": _set_u32(b"stsc", 4, 0xFFFFFFFF),
    "stts 2^32-1 samples": _set_u32(b"stts", 8, 0xFFFFFFFF),
    "ctts 2^32-1 samples": _set_u32(b"ctts", 8, 0xFFFFFFFF),
    "stco offset past the file": _set_u32(b"stco", 8, 0xFFFFFF00),
    "stss 2^32-1 entries": _set_u32(b"stss", 4, 0xFFFFFFFF),
    "elst of 10000 edits": _elst([(1, 0)] * 10000),
}


@pytest.mark.parametrize("lie", LIES)
def test_lying_counts_fail_fast_and_small(videos: dict[str, bytes | None], lie: str) -> None:
    data = _rewrite_moov(_video(videos, "h264_moov_end"), LIES[lie])
    tracemalloc.start()
    try:
        parse_mp4_index(_Reader(data), len(data), "lie.mp4")
    except DecodeError as exc:
        assert exc.__cause__ is None and "lie.mp4" in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20  # a lying count never turns into a huge allocation


# --- fuzzing: only DecodeError, raised on purpose, and quickly -----------------------------


def _parse_or_decode_error(data: bytes) -> None:
    try:
        parse_mp4_index(_Reader(data), len(data), "fuzz.mp4")
    except DecodeError as exc:
        assert exc.__cause__ is None, f"only the safety net caught {exc.__cause__!r}"
        assert "fuzz.mp4" in str(exc)


_FILES = st.sampled_from(["av1", "h264", "h264_moov_end", "h264_audio_before"])


@_FUZZ
@given(name=_FILES, cut=st.integers(0, 1 << 20))
def test_fuzz_truncated_files(videos: dict[str, bytes | None], name: str, cut: int) -> None:
    data = _video(videos, name)
    _parse_or_decode_error(data[: cut % (len(data) + 1)])


@_FUZZ
@given(
    name=_FILES,
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_fuzz_byte_flips_in_moov(
    videos: dict[str, bytes | None], name: str, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(_video(videos, name))
    moov = next(box for box in _top_boxes(bytes(data)) if box.kind == b"moov")
    for at, xor in flips:
        data[moov.offset + at % moov.size] ^= xor
    _parse_or_decode_error(bytes(data))


_GARBAGE = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=2048).map(lambda b: struct.pack(">I4s", len(b) + 8, b"moov") + b),
    st.binary(max_size=2048).map(lambda b: b"\0\0\0\x10ftypisom\0\0\0\0" + b),
)


@_FUZZ
@given(garbage=_GARBAGE)
def test_fuzz_garbage(garbage: bytes) -> None:
    _parse_or_decode_error(garbage)


_PATHS = {b"elst": (b"edts", b"elst"), b"mdhd": (b"mdia", b"mdhd"), b"hdlr": (b"mdia", b"hdlr")}
_BOXES = (b"stsd", b"stts", b"ctts", b"stss", b"stsz", b"stsc", b"stco", *_PATHS)


@_FUZZ
@given(
    name=_FILES,
    kind=st.sampled_from(_BOXES),
    head=st.binary(min_size=1, max_size=24),
    keep=st.integers(0, 64),
)
def test_fuzz_box_payloads(
    videos: dict[str, bytes | None], name: str, kind: bytes, head: bytes, keep: int
) -> None:
    """A box whose version, flags and counts are random, and whose payload may be cut."""
    tree = _parse(_video(videos, name))
    moov = next(box for box in tree if box[0] == b"moov")
    try:
        box = _find(_video_trak(moov[1]), *_PATHS.get(kind, (b"mdia", b"minf", b"stbl", kind)))
    except KeyError:  # no such box in this file (no ctts without B-frames)
        return
    payload = head + box[1][len(head) :]
    box[1] = payload[: max(keep, len(head))] if keep < 64 else payload
    _parse_or_decode_error(_serialize(tree))
