"""Packet video: framing detection, keyframes from the bitstream, GOP-planned exact decoding.

Clips are encoded with PyAV (libx264 with B-frames, libx265 with an open GOP, SVT-AV1) into one
packet per row. Every frame carries a marker (`framefeed.synth.read_marker`), so each test checks
that the frame returned for a row is the picture that row codes, whatever B-frames reorder.
"""

from __future__ import annotations

import io
import pickle
import threading
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from framefeed import ConfigError, DecodeError, PacketVideoDecoder
from framefeed.catalog import Column, ColumnKind
from framefeed.fields import BatchIO, Decoder, FieldRequest
from framefeed.packet_field import packet_rows
from framefeed.synth import draw_frame, read_marker
from framefeed.synth.packets import PacketClip, encode_packets
from framefeed.video.bitstream import (
    ANNEX_B,
    config_to_annexb,
    h264_disposable,
    nal_framing,
    nal_units,
    packet_keyframe,
    to_annexb,
)
from framefeed.video.packets import PacketDecodeConfig, PacketDecoder, PacketRows

pytestmark = pytest.mark.timeout(180)

H, W = 48, 64
CAM = "cam"


# -- clips ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h264() -> list[PacketClip]:
    """Three episodes of libx264 with a GOP of 10 and B-frames."""
    return [encode_packets("h264", episode=e, num_frames=35, gop=10, bframes=3) for e in range(3)]


@pytest.fixture(scope="module")
def hevc_open() -> PacketClip:
    """libx265 with an open GOP: the CRAs after the first IDR have RASL pictures."""
    return encode_packets("hevc", episode=5, num_frames=40, gop=12, bframes=4, open_gop=True)


@pytest.fixture(scope="module")
def av1() -> PacketClip:
    return encode_packets("av1", episode=7, num_frames=30, gop=10, texture=False)


def _concat(clips: list[PacketClip]) -> tuple[list[bytes], np.ndarray, list[tuple[int, int]]]:
    """Packets of several episodes in one column, the first row of each row's episode, and the
    expected marker of every row."""
    packets: list[bytes] = []
    starts: list[int] = []
    expected: list[tuple[int, int]] = []
    for clip in clips:
        starts.extend([len(packets)] * len(clip.packets))
        packets.extend(clip.packets)
        expected.extend((clip.episode, f) for f in clip.frames)
    return packets, np.asarray(starts, dtype=np.int64), expected


def _tail(clip: PacketClip, skip: int) -> PacketClip:
    """The clip without its first ``skip`` rows: it starts mid-GOP."""
    return PacketClip(clip.episode, clip.packets[skip:], clip.keyframes[skip:], clip.frames[skip:])


def _markers(frames: list[np.ndarray | None]) -> list[tuple[int, int] | None]:
    return [read_marker(f) if f is not None else None for f in frames]


def _mp4_avcc(
    episode: int, num_frames: int = 30
) -> tuple[list[bytes], list[bool], list[int], bytes]:
    """libx264 muxed into MP4 and demuxed again: length-prefixed samples, keyframes without
    in-band SPS/PPS, and the ``avcC`` record."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream: Any = container.add_stream(
            "libx264",
            rate=30,
            options={"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "2"},
        )
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(
                draw_frame(episode, i, 0, H, W, texture=True, seed=0), format="rgb24"
            )
            frame.pts, frame.time_base = i, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        vstream = container.streams.video[0]
        record = bytes(vstream.codec_context.extradata)
        demuxed = [p for p in container.demux(vstream) if p.size]
        pts = [float(p.pts * p.time_base) for p in demuxed]
        packets = [bytes(p) for p in demuxed]
        keys = [bool(p.is_keyframe) for p in demuxed]
    first = min(pts)
    return packets, keys, [round((t - first) * 30) for t in pts], record


# -- framing and keyframes --------------------------------------------------------------------


def test_length_prefix_that_looks_like_a_start_code_is_length_prefixed() -> None:
    # A 300-byte IDR unit: its 4-byte length is 00 00 01 2c, which starts like a start code.
    unit = b"\x65" + bytes(range(1, 256)) + bytes(range(1, 45))
    assert len(unit) == 300
    avcc = len(unit).to_bytes(4, "big") + unit
    assert avcc[:3] == b"\x00\x00\x01"
    assert nal_framing(avcc, "h264") == 4
    assert bytes(to_annexb(avcc, "h264")) == b"\x00\x00\x00\x01" + unit
    annexb = b"\x00\x00\x01" + unit
    assert nal_framing(annexb, "h264") == ANNEX_B
    assert to_annexb(annexb, "h264") is annexb  # no copy
    assert nal_framing(len(unit).to_bytes(2, "big") + unit, "h264") == 2
    small = b"\x41\x9a\x10"
    assert nal_framing(bytes([len(small)]) + small, "h264") == 1
    assert nal_framing(b"\x12\x34\x56\x78", "h264") is None
    with pytest.raises(DecodeError, match="neither Annex B nor length-prefixed"):
        to_annexb(b"\x12\x34\x56\x78", "h264")


def test_keyframes_from_the_bitstream_match_the_encoder(
    h264: list[PacketClip], hevc_open: PacketClip, av1: PacketClip
) -> None:
    for codec, clip in (("h264", h264[0]), ("hevc", hevc_open), ("av1", av1)):
        detected = [packet_keyframe(p, codec) for p in clip.packets]
        assert detected == clip.keyframes, codec
        assert sum(clip.keyframes) >= 3, codec
    assert packet_keyframe(b"\x00\x00\x01\x06\x05\x01\x80", "h264") is None  # SEI only
    assert packet_keyframe(b"\x12\x00", "av1") is None  # temporal delimiter only
    assert packet_keyframe(b"anything", "mjpeg") is None


def test_an_idr_without_parameter_sets_is_not_a_place_to_start(h264: list[PacketClip]) -> None:
    key = h264[0].packets[10]
    idr_only = b"".join(
        b"\x00\x00\x00\x01" + bytes(u) for u in nal_units(key, "h264") if u[0] & 0x1F == 5
    )
    assert packet_keyframe(key, "h264") is True
    assert packet_keyframe(idr_only, "h264") is False
    assert packet_keyframe(idr_only, "h264", need_parameter_sets=False) is True


def test_avcc_record_to_annexb_parameter_sets() -> None:
    _, _, _, record = _mp4_avcc(0, num_frames=3)
    sets = config_to_annexb(record, "h264")
    types = [u[0] & 0x1F for u in nal_units(sets, "h264")]
    assert types == [7, 8]
    assert config_to_annexb(sets, "h264") == sets
    with pytest.raises(DecodeError, match="malformed h264 configuration record"):
        config_to_annexb(b"\x01\x64", "h264")


# -- exact frames -----------------------------------------------------------------------------


def _decode(
    packets: list[bytes] | PacketRows,
    targets: Any,
    starts: Any,
    codec: str = "h264",
    keyframes: np.ndarray | None = None,
    **config: Any,
) -> tuple[list[np.ndarray | None], int]:
    rows = packets if isinstance(packets, PacketRows) else PacketRows.from_list(packets)
    targets = np.asarray(targets, dtype=np.int64)
    with PacketDecoder(PacketDecodeConfig(codec=codec, **config)) as decoder:
        out = decoder.decode(
            rows,
            targets,
            np.asarray(starts, dtype=np.int64)[targets] if len(targets) else targets,
            keyframes=keyframes,
            column=CAM,
        )
        return out, decoder.frames_decoded


@pytest.mark.parametrize("codec", ["h264", "hevc", "av1"])
def test_random_targets_are_exactly_their_rows(
    codec: str, h264: list[PacketClip], hevc_open: PacketClip, av1: PacketClip
) -> None:
    clips = h264 if codec == "h264" else [hevc_open] if codec == "hevc" else [av1]
    packets, starts, expected = _concat(clips)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, len(packets), size=24)
    frames, _ = _decode(packets, targets, starts, codec)
    assert _markers(frames) == [expected[t] for t in targets]
    if codec == "h264":  # B-frames: some rows code a picture other than their own number
        assert any(expected[t][1] != t - starts[t] for t in targets)


def test_a_sorted_batch_equals_per_sample_decoding_with_fewer_frames(
    h264: list[PacketClip],
) -> None:
    packets, starts, expected = _concat(h264)
    rng = np.random.default_rng(1)
    targets = rng.integers(0, len(packets), size=20)
    targets[3] = targets[7]  # a duplicate
    batch, batch_cost = _decode(packets, targets, starts)
    single_cost = 0
    for t, frame in zip(targets, batch, strict=True):
        alone, cost = _decode(packets, [t], starts)
        single_cost += cost
        assert frame is not None and alone[0] is not None
        np.testing.assert_array_equal(frame, alone[0])
    assert batch_cost < single_cost
    assert _markers(batch) == [expected[t] for t in targets]


def test_one_gop_is_one_forward_pass(h264: list[PacketClip]) -> None:
    packets, starts, _ = _concat(h264[:1])
    # Keyframes at 0, 10, 20, 30: rows 12, 15 and 19 share the GOP of row 10.
    # Rows 10..19 are decoded once each, except unwanted non-reference pictures (skipped).
    skipped = [r for r in range(10, 20) if h264_disposable(nal_units(packets[r], "h264"))]
    assert skipped and not set(skipped) & {12, 15, 19}
    _, cost = _decode(packets, [19, 12, 15], starts)
    assert cost == 10 - len(skipped)
    _, cost = _decode(packets, [12], starts)
    assert cost == 3 - len([r for r in skipped if r < 12])


def test_targets_before_the_first_keyframe_are_none_and_segments_are_not_crossed(
    h264: list[PacketClip],
) -> None:
    # Episode 1 starts mid-GOP (its rows 4..9 have no keyframe before them in the segment);
    # episode 0's keyframes sit just before it in the column and must not be used.
    tail = _tail(h264[1], 4)
    packets = h264[0].packets + tail.packets
    starts = np.array([0] * 35 + [35] * len(tail.packets))
    targets = [36, 35, 40, 41, 5, 48]
    frames, _ = _decode(packets, targets, starts)
    assert frames[0] is None and frames[1] is None and frames[2] is None
    assert read_marker(frames[3]) == (1, tail.frames[6])  # row 41: segment row 6 = keyframe 10
    assert read_marker(frames[4]) == (0, h264[0].frames[5])
    assert read_marker(frames[5]) == (1, tail.frames[13])


def test_keyframe_column_bitstream_and_interval_fallback_agree(h264: list[PacketClip]) -> None:
    packets, starts, expected = _concat(h264)
    flags = np.array([k for c in h264 for k in c.keyframes])
    targets = np.random.default_rng(2).integers(0, len(packets), size=24)
    from_column, _ = _decode(packets, targets, starts, keyframes=flags, inspect_packets=False)
    from_bits, _ = _decode(packets, targets, starts)
    from_interval, _ = _decode(
        packets, targets, starts, keyframe_interval=10, inspect_packets=False
    )
    unknown = np.full(len(packets), -1, dtype=np.int8)
    from_unknown_column, _ = _decode(packets, targets, starts, keyframes=unknown)
    for a, b, c, d in zip(from_column, from_bits, from_interval, from_unknown_column, strict=True):
        assert a is not None and b is not None and c is not None and d is not None
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, d)
    assert _markers(from_column) == [expected[t] for t in targets]


def test_too_short_an_interval_gives_none_never_a_wrong_frame(h264: list[PacketClip]) -> None:
    packets = h264[0].packets
    frames = h264[0].frames
    starts = np.zeros(len(packets), dtype=np.int64)
    # GOP 10, interval 4: row 15's window 12..15 holds no keyframe, row 12's (9..12) holds 10.
    alone, _ = _decode(packets, [15], starts, keyframe_interval=4, inspect_packets=False)
    assert alone == [None]
    got, _ = _decode(packets, [12, 23], starts, keyframe_interval=4, inspect_packets=False)
    assert _markers(got) == [(0, frames[12]), (0, frames[23])]
    # In a batch, row 15 rides on the pass that row 12 started at row 9: the decoder met
    # keyframe 10 on the way, so the frame is exact.
    got, _ = _decode(packets, [12, 15], starts, keyframe_interval=4, inspect_packets=False)
    assert _markers(got) == [(0, frames[12]), (0, frames[15])]
    # Without an interval, unknown keyframes mean decoding from the segment start.
    got, cost = _decode(packets, [15], starts, inspect_packets=False)
    assert read_marker(got[0]) == (0, frames[15]) and cost == 16


def test_open_gop_rasl_pictures_decode_from_the_keyframe_before(hevc_open: PacketClip) -> None:
    clip = hevc_open
    cras = [i for i, k in enumerate(clip.keyframes) if k][1:]
    packets = clip.packets
    starts = np.zeros(len(packets), dtype=np.int64)
    # The pictures right after a CRA that show before it are RASL: they need the GOP before.
    rasl = [
        r
        for c in cras
        for r in range(c + 1, min(c + 5, len(packets)))
        if clip.frames[r] < clip.frames[c]
    ]
    assert rasl, "libx265 wrote no RASL pictures"
    frames, _ = _decode(packets, rasl, starts, codec="hevc", threads=2)
    assert _markers(frames) == [(5, clip.frames[r]) for r in rasl]
    # A segment that starts at a CRA cannot decode its RASL pictures: None, not garbage.
    c = cras[0]
    seg = packets[c:]
    local = [r - c for r in rasl if r > c and r - c < 5]
    frames, _ = _decode(seg, local, np.zeros(len(seg), dtype=np.int64), codec="hevc")
    assert frames == [None] * len(local)


def test_avcc_annexb_and_mixed_framings_give_the_same_frames() -> None:
    packets, keys, shown, record = _mp4_avcc(2)
    sets = config_to_annexb(record, "h264")
    set_units = [bytes(u) for u in nal_units(sets, "h264")]
    prefix4 = b"".join(len(u).to_bytes(4, "big") + u for u in set_units)
    avcc = [prefix4 + p if k else p for p, k in zip(packets, keys, strict=True)]
    annexb = [bytes(to_annexb(p, "h264")) for p in avcc]
    two_byte = [
        b"".join(len(u).to_bytes(2, "big") + bytes(u) for u in nal_units(p, "h264")) for p in avcc
    ]
    mixed = [a if i % 2 else b for i, (a, b) in enumerate(zip(annexb, two_byte, strict=True))]
    assert nal_framing(avcc[1], "h264") == 4 and nal_framing(two_byte[1], "h264") == 2
    assert [packet_keyframe(p, "h264") for p in avcc] == keys
    starts = np.zeros(len(packets), dtype=np.int64)
    targets = [29, 3, 14, 0, 21, 22]
    reference, _ = _decode(annexb, targets, starts)
    assert _markers(reference) == [(2, shown[t]) for t in targets]
    for variant in (avcc, two_byte, mixed):
        frames, _ = _decode(variant, targets, starts)
        for a, b in zip(reference, frames, strict=True):
            np.testing.assert_array_equal(a, b)
    # Samples as muxed (no in-band SPS/PPS): undecodable alone, decodable with the avcC record.
    frames, _ = _decode(packets, targets, starts, extradata=record)
    for a, b in zip(reference, frames, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _decode(packets, targets, starts)[0] == [None] * len(targets)


def test_output_size_is_resized_inside_ffmpeg(h264: list[PacketClip]) -> None:
    packets, starts, expected = _concat(h264[:1])
    frames, _ = _decode(packets, [4, 17], starts, size=(24, 40))
    assert all(f is not None and f.shape == (3, 24, 40) and f.dtype == np.uint8 for f in frames)
    assert _markers(frames) == [expected[4], expected[17]]


def test_null_rows_are_gaps_no_anchor_crosses(h264: list[PacketClip]) -> None:
    packets: list[bytes | None] = list(h264[0].packets)
    packets[13] = None
    rows = PacketRows.from_list(packets)
    starts = np.zeros(len(packets), dtype=np.int64)
    frames, _ = _decode(rows, [12, 13, 14, 19, 20], starts)
    assert read_marker(frames[0]) == (0, h264[0].frames[12])
    assert frames[1:4] == [None, None, None]
    assert read_marker(frames[4]) == (0, h264[0].frames[20])


# -- corrupt data -----------------------------------------------------------------------------


def test_corrupt_packets_raise_decode_error_naming_the_row(h264: list[PacketClip]) -> None:
    packets, starts, _ = _concat(h264)
    segments = np.repeat(np.arange(3), 35)

    def decode(broken: list[bytes], target: int) -> None:
        with PacketDecoder(PacketDecodeConfig(codec="h264")) as decoder:
            decoder.decode(
                PacketRows.from_list(broken),
                np.array([target]),
                starts[[target]],
                segments=segments[[target]],
                column=CAM,
            )

    junk = list(packets)
    junk[47] = b"\x12\x34" * 40  # neither framing
    with pytest.raises(DecodeError, match=r"column 'cam', segment 1, row 47 \(packet 12"):
        decode(junk, 49)
    flipped = list(packets)
    data = bytearray(packets[46])
    data[8:] = bytes(b ^ 0x5A for b in data[8:])
    flipped[46] = bytes(data)
    with pytest.raises(DecodeError, match=r"segment 1, row 46 .*decoder failed"):
        decode(flipped, 48)
    truncated = list(packets)
    assert h264[1].keyframes[10]
    truncated[45] = packets[45][: len(packets[45]) // 3]  # segment 1's keyframe at its row 10
    with pytest.raises(DecodeError, match=r"segment 1, row 45 "):
        decode(truncated, 47)


def test_corruption_after_the_first_key_frame_is_loud_in_fallback_mode(
    h264: list[PacketClip],
) -> None:
    packets = list(h264[0].packets)
    data = bytearray(packets[14])
    data[8:] = bytes(b ^ 0x5A for b in data[8:])
    packets[14] = bytes(data)
    starts = np.zeros(len(packets), dtype=np.int64)
    with pytest.raises(DecodeError, match="row 14 "):
        _decode(packets, [16], starts, keyframe_interval=10, inspect_packets=False)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        PacketDecodeConfig(codec="mpeg2video")
    with pytest.raises(ConfigError, match="keyframe_interval"):
        PacketDecodeConfig(codec="h264", keyframe_interval=0)
    with pytest.raises(ConfigError, match="not supported"):
        PacketVideoDecoder(codec="vp9")


# -- the batch decoder ------------------------------------------------------------------------


class FakeStore:
    """The store methods `PacketVideoDecoder` uses: ``get`` and ``segment_rows`` (and
    ``index_values`` for a keyframe column with rows of its own)."""

    def __init__(self, columns: dict[str, Any], first: np.ndarray, end: np.ndarray) -> None:
        self.columns, self.first, self.end = columns, first, end
        self.bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.index: dict[str, np.ndarray] = {}

    def get(self, path: str) -> Any:
        return self.columns[path]

    def segment_rows(self, path: str, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first, end = self.bounds.get(path, (self.first, self.end))
        return first[segments], end[segments]

    def index_values(self, path: str) -> np.ndarray:
        return self.index[path]


def _request(
    store: FakeStore, segments: list[int], rows: Any, *, windowed: bool, **info: Any
) -> FieldRequest:
    rows = np.asarray(rows, dtype=np.int64).reshape(len(segments), -1)
    column = Column(
        path=CAM,
        kind=ColumnKind.PACKETS,
        dtype="uint8",
        shape=(H, W, 3),
        info={"codec": "h264", **info},
    )
    return FieldRequest(
        dataset=SimpleNamespace(segment_ids=np.array([10, 11, 12]), num_segments=3),  # type: ignore[arg-type]
        column=column,
        key=CAM,
        segments=np.asarray(segments),
        frames=rows - store.first[np.asarray(segments)][:, None],
        rows=rows,
        windowed=windowed,
        store=store,  # type: ignore[arg-type]
        tolerance_s=1e-4,
    )


@pytest.fixture(scope="module")
def store(h264: list[PacketClip]) -> tuple[FakeStore, list[tuple[int, int]]]:
    tail = _tail(h264[2], 3)
    packets, _, expected = _concat([h264[0], h264[1], tail])
    column = pa.array(packets, type=pa.large_binary())
    keyframes = pa.array([k for c in (h264[0], h264[1], tail) for k in c.keyframes])
    first = np.array([0, 35, 70])
    end = np.array([35, 70, 70 + len(tail.packets)])
    return FakeStore({CAM: column, "is_keyframe": keyframes}, first, end), expected


def test_packet_video_decoder_returns_a_batch_tensor(
    store: tuple[FakeStore, list[tuple[int, int]]],
) -> None:
    fake, expected = store
    decoder = PacketVideoDecoder()
    assert isinstance(decoder, Decoder)
    assert decoder.columns(None) == []
    rows = [[50], [3], [69], [34], [12]]
    out = decoder.decode(_request(fake, [1, 0, 1, 0, 0], rows, windowed=False), BatchIO())
    assert isinstance(out, torch.Tensor) and out.shape == (5, 3, H, W) and out.dtype == torch.uint8
    assert [read_marker(f.numpy()) for f in out] == [expected[r[0]] for r in rows]
    windowed = decoder.decode(
        _request(fake, [0, 1], [[10, 11, 12], [40, 41, 42]], windowed=True), BatchIO()
    )
    assert isinstance(windowed, torch.Tensor) and windowed.shape == (2, 3, 3, H, W)
    assert read_marker(windowed[1, 2].numpy()) == expected[42]
    decoder.close()


def test_packet_video_decoder_marks_undecodable_samples_none(
    store: tuple[FakeStore, list[tuple[int, int]]],
) -> None:
    fake, expected = store
    kf = PacketVideoDecoder(codec="h264", keyframe_column="is_keyframe", size=(24, 32), threads=2)
    assert kf.columns(Column(path=CAM, kind=ColumnKind.PACKETS, dtype="uint8", shape=(1,))) == [
        CAM,
        "is_keyframe",
    ]
    # Segment 2 starts at its row 3 (mid-GOP): rows 70..76 have no keyframe before them.
    out = kf.decode(_request(fake, [2, 2, 0], [[72], [80], [20]], windowed=False), BatchIO())
    assert isinstance(out, list) and out[0] is None
    assert out[1].shape == (3, 24, 32) and read_marker(out[1].numpy()) == expected[80]
    assert read_marker(out[2].numpy()) == expected[20]
    windowed = kf.decode(_request(fake, [2, 2], [[75, 77], [78, 79]], windowed=True), BatchIO())
    assert windowed[0] is None and windowed[1].shape == (2, 3, 24, 32)
    clone = pickle.loads(pickle.dumps(kf))  # pool and codecs are not pickled
    kf.close()
    kf.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("framefeed-packets")]
    again = clone.decode(_request(fake, [2], [[80]], windowed=False), BatchIO())
    assert read_marker(again[0].numpy()) == expected[80]
    clone.close()


def test_a_sparse_keyframe_column_is_matched_by_index_value(
    store: tuple[FakeStore, list[tuple[int, int]]], h264: list[PacketClip]
) -> None:
    dense, expected = store
    n = len(expected)
    flags = np.array(dense.get("is_keyframe").to_pylist())
    keys = np.flatnonzero(flags)
    # Index values: 100 per row inside each segment; the marker has rows on keyframes only.
    seg_of = np.searchsorted(dense.end, np.arange(n), side="right")
    at = (np.arange(n) - dense.first[seg_of]) * 100
    sparse = FakeStore(
        {CAM: dense.get(CAM), "marks": pa.array([True] * len(keys))}, dense.first, dense.end
    )
    kf_seg = seg_of[keys]
    kf_first = np.searchsorted(kf_seg, np.arange(3))
    kf_end = np.searchsorted(kf_seg, np.arange(3), side="right")
    sparse.bounds["marks"] = (kf_first, kf_end)
    sparse.index = {CAM: at, "marks": at[keys]}
    decoder = PacketVideoDecoder(codec="h264")
    rows = [[12], [50], [80], [69]]
    info = {"keyframe_column": "marks"}
    assert decoder.columns(_request(sparse, [0], [[0]], windowed=False, **info).column) == [
        CAM,
        "marks",
    ]
    out = decoder.decode(_request(sparse, [0, 1, 2, 1], rows, windowed=False, **info), BatchIO())
    assert [read_marker(f.numpy()) for f in out] == [expected[r[0]] for r in rows]
    aligned = next(v for k, v in decoder._arrays if len(k) == 2)
    want = np.full(n, -1, dtype=np.int8)
    want[keys] = 1
    np.testing.assert_array_equal(aligned, want)
    decoder.close()


def test_packet_rows_from_arrow_is_zero_copy_and_keeps_nulls() -> None:
    values = [b"\x00\x00\x01\x65ab", None, b"", b"\x00\x00\x01\x41c"]
    for kind in (pa.binary(), pa.large_binary()):
        arr = pa.array(values, type=kind).slice(1)
        rows = packet_rows(arr)
        assert len(rows) == 3
        assert rows.get(0) is None and rows.get(1) is None
        assert bytes(rows.get(2) or b"") == values[3]
    chunked = pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])])
    assert bytes(packet_rows(chunked).get(3) or b"") == values[3]
    with pytest.raises(DecodeError, match="binary values"):
        packet_rows(pa.array([1, 2]))


@pytest.mark.rerun
def test_rerun_recordings_through_a_map_dataset(tmp_path: Any) -> None:
    """End to end: a Rerun ``VideoStream`` column (keyframe column named by the reader), sampled
    on the ``step`` timeline with a window, latest-at rows, every frame checked by its marker."""
    pytest.importorskip("rerun")
    import framefeed
    from framefeed.synth.rerun import H264, RerunSynthConfig, write_rerun_recordings

    config = RerunSynthConfig(
        num_recordings=2,
        min_duration_s=1.0,
        max_duration_s=1.2,
        jpeg_rate_hz=0,
        h264_size=(48, 64),
        h264_gop=10,
        seed=3,
    )
    root = write_rerun_recordings(tmp_path, config)
    fields = [framefeed.Field(H264, decode=PacketVideoDecoder(size=(24, 32)), window=[-7, 0])]
    spec = framefeed.IndexSpec(timeline="step")
    with framefeed.MapDataset(root, fields=fields, index=spec) as ds:
        picks = np.random.default_rng(0).permutation(len(ds))[:24]
        batch = ds.get_batch(picks)
    frames, pads = batch[H264], batch[f"{H264}_is_pad"]
    assert frames.shape == (24, 2, 3, 24, 32)
    camera_steps = np.array([round(i * 100 / 30) for i in range(200)])
    for i in range(len(picks)):
        episode, step = int(batch["episode_index"][i]), int(batch["step"][i])
        for k, offset in enumerate((-7, 0)):
            if bool(pads[i, k]):
                continue
            row = int(np.searchsorted(camera_steps, step + offset, side="right")) - 1
            assert read_marker(frames[i, k].numpy()) == (episode, row)


def test_dataset_close_stops_the_threads_of_its_packet_decoders(tmp_path: Any) -> None:
    pytest.importorskip("rerun")
    import framefeed
    from framefeed.synth.rerun import H264, RerunSynthConfig, write_rerun_recordings

    config = RerunSynthConfig(
        num_recordings=1, min_duration_s=1.0, max_duration_s=1.0, jpeg_rate_hz=0, h264_gop=10
    )
    root = write_rerun_recordings(tmp_path, config)

    def packet_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("framefeed-packets")}

    before = packet_threads()
    decoder = PacketVideoDecoder(threads=2)  # threads of its own, not the dataset's
    with framefeed.MapDataset(root, fields=[framefeed.Field(H264, decode=decoder)]) as ds:
        first = ds.get_batch(list(range(0, len(ds), 3)))
        assert packet_threads() - before
    assert not packet_threads() - before
    again = ds.get_batch(list(range(0, len(ds), 3)))  # still usable after close
    assert torch.equal(first[H264], again[H264])
    ds.close()
    assert not packet_threads() - before
