"""Compressed video samples, one per row: framing (Annex B or length-prefixed) and keyframes.

A packet-video column stores one compressed sample per row, as a camera driver or a muxer
emitted it. H.264 and HEVC samples come in two framings, detected here per sample:

- **Annex B**: NAL units after ``00 00 01`` / ``00 00 00 01`` start codes (elementary streams,
  RTP depayloaders, Rerun's ``VideoStream``);
- **length-prefixed** ("AVCC"/"HVCC", MP4 and Matroska samples): each NAL unit after its size as
  a big-endian integer of 4 bytes (almost always), 2 or 1.

A 4-byte length can look like a start code (a 300-byte NAL unit begins ``00 00 01 2c``), so the
test is structural: a sample is length-prefixed when its lengths tile it exactly and every unit
has a valid NAL header; otherwise it is Annex B if it begins with a start code. Length-prefixed
samples are rewritten to Annex B (`to_annexb`), so one decoder configuration serves both.

**What the decoder expects.** Every keyframe row carries its parameter sets in band (SPS and PPS
for H.264, VPS, SPS and PPS for HEVC, a sequence header for AV1), as encoders write them when
they are not told to put them in a container's header, and as Rerun requires. MP4 samples keep
them in the ``avcC``/``hvcC`` record instead; `config_to_annexb` turns that record into Annex B
parameter sets to prepend to keyframes (or to give the decoder as ``extradata``).

**Keyframes from the packet** (`packet_keyframe`): a row is a keyframe when a decoder can start
there with nothing before it, so it must be a random-access picture *and* carry its parameter
sets. H.264: an IDR slice (NAL type 5) with SPS and PPS; a recovery-point SEI on a non-IDR
I-slice is not enough (open GOP: the B-pictures after it may reference the previous GOP).
HEVC: an IRAP picture (NAL types 16-23) with VPS, SPS and PPS; the RASL pictures of a CRA are
not decodable from it, which the decoder handles by starting one keyframe earlier. AV1: a
temporal unit with a sequence header and a shown ``KEY_FRAME`` (a hidden "forward" keyframe, or
``show_existing_frame``, does not count: the shown picture was decoded in an earlier unit).
AV1 samples must be in the low-overhead OBU format (``obu_has_size_field``) of MP4, Matroska
and IVF; the length-delimited AV1 "Annex B" format is not supported. The answer is ``None``
when the packet does not say (no picture in it, an unknown codec, unparseable bytes).
"""

from __future__ import annotations

from ..errors import DecodeError

__all__ = [
    "ANNEX_B",
    "config_to_annexb",
    "h264_disposable",
    "nal_framing",
    "nal_units",
    "packet_keyframe",
    "to_annexb",
]

ANNEX_B = 0
"""`nal_framing` of a sample in Annex B (start codes)."""

_NAL_CODECS = ("h264", "hevc")
_LENGTH_SIZES = (4, 2, 1)
# H.264 NAL types: 1-5 slices (5 = IDR), 7 SPS, 8 PPS.
_H264_IDR, _H264_SPS, _H264_PPS = 5, 7, 8
# HEVC NAL types: 0-31 VCL (16-23 IRAP), 32 VPS, 33 SPS, 34 PPS.
_HEVC_VPS, _HEVC_SPS, _HEVC_PPS = 32, 33, 34
# AV1 OBU types and frame types.
_OBU_SEQUENCE_HEADER, _OBU_FRAME_HEADER, _OBU_FRAME = 1, 3, 6
_AV1_KEY_FRAME = 0


def _valid_header(codec: str, nal: bytes | memoryview) -> bool:
    """Whether ``nal`` starts with a plausible NAL header of ``codec``."""
    if not len(nal) or nal[0] & 0x80:  # empty, or forbidden_zero_bit set
        return False
    if codec == "hevc":
        # Two header bytes; nuh_temporal_id_plus1 (low 3 bits of byte 2) is never 0.
        return len(nal) >= 2 and (nal[1] & 0x07) != 0
    return (nal[0] & 0x1F) != 0  # type 0 is "unspecified": not written by encoders


def _length_prefixed(data: bytes | memoryview, size: int, codec: str) -> bool:
    """Whether ``size``-byte big-endian lengths tile ``data`` exactly with valid NAL units."""
    pos, end = 0, len(data)
    if end == 0:
        return False
    while pos < end:
        if pos + size > end:
            return False
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
        if length == 0 or pos + length > end or not _valid_header(codec, data[pos : pos + length]):
            return False
        pos += length
    return True


def nal_framing(data: bytes | memoryview, codec: str) -> int | None:
    """How an H.264/HEVC sample is framed: `ANNEX_B` (0), a NAL length size (4, 2 or 1), or
    ``None`` when it is neither (corrupt, or not this codec)."""
    for size in _LENGTH_SIZES:
        if _length_prefixed(data, size, codec):
            return size
    head = bytes(data[:4])
    if head[:3] == b"\x00\x00\x01" or head == b"\x00\x00\x00\x01":
        return ANNEX_B
    return None


def _annexb_units(data: bytes | memoryview) -> list[memoryview]:
    """The NAL units of an Annex B sample (without start codes and trailing zero bytes)."""
    raw = bytes(data)
    view = memoryview(raw)
    units: list[memoryview] = []
    start = raw.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        nxt = raw.find(b"\x00\x00\x01", begin)
        stop = len(raw) if nxt < 0 else nxt
        while stop > begin and raw[stop - 1] == 0:  # zero_byte of the next 4-byte start code
            stop -= 1
        if stop > begin:
            units.append(view[begin:stop])
        start = nxt
    return units


def nal_units(data: bytes | memoryview, codec: str, framing: int | None = None) -> list[memoryview]:
    """The NAL units of a sample in either framing; `DecodeError` when it is neither."""
    if framing is None:
        framing = nal_framing(data, codec)
    if framing is None:
        raise DecodeError(
            f"the {codec} sample ({len(data)} bytes, starting {bytes(data[:8]).hex()}) is "
            "neither Annex B nor length-prefixed NAL units"
        )
    if framing == ANNEX_B:
        return _annexb_units(data)
    view = memoryview(data)
    units: list[memoryview] = []
    pos = 0
    while pos < len(view):
        length = int.from_bytes(view[pos : pos + framing], "big")
        units.append(view[pos + framing : pos + framing + length])
        pos += framing + length
    return units


def to_annexb(data: bytes | memoryview, codec: str) -> bytes | memoryview:
    """The sample in Annex B; an Annex B sample is returned as it is (no copy).

    Raises `DecodeError` when the sample is neither Annex B nor length-prefixed.
    """
    framing = nal_framing(data, codec)
    if framing == ANNEX_B:
        return data
    units = nal_units(data, codec, framing)
    return b"".join(b"\x00\x00\x00\x01" + bytes(u) for u in units)


def h264_disposable(units: list[memoryview]) -> bool:
    """Whether an H.264 access unit is a non-reference picture (``nal_ref_idc`` 0 on every
    slice): no other picture predicts from it, so a decoder may skip it unless it is wanted.
    Skipping one leaves no ``frame_num`` gap (only reference pictures advance it)."""
    slices = [u for u in units if 1 <= u[0] & 0x1F <= 5]
    return bool(slices) and all(u[0] & 0x60 == 0 for u in slices)


def config_to_annexb(record: bytes, codec: str) -> bytes:
    """Parameter sets of an MP4 ``avcC`` (H.264) or ``hvcC`` (HEVC) record, in Annex B.

    A record that already is Annex B is returned as it is. `DecodeError` for a malformed record.
    """
    if record[:3] == b"\x00\x00\x01" or record[:4] == b"\x00\x00\x00\x01":
        return record
    units: list[bytes] = []
    try:
        if codec == "h264":
            if record[0] != 1:
                raise ValueError("configurationVersion is not 1")
            pos = 5
            for mask in (0x1F, 0xFF):  # SPS count (low 5 bits), then PPS count
                count = record[pos] & mask
                pos += 1
                for _ in range(count):
                    n = int.from_bytes(record[pos : pos + 2], "big")
                    units.append(record[pos + 2 : pos + 2 + n])
                    pos += 2 + n
        elif codec == "hevc":
            if record[0] != 1:
                raise ValueError("configurationVersion is not 1")
            arrays, pos = record[22], 23
            for _ in range(arrays):
                count = int.from_bytes(record[pos + 1 : pos + 3], "big")
                pos += 3
                for _ in range(count):
                    n = int.from_bytes(record[pos : pos + 2], "big")
                    units.append(record[pos + 2 : pos + 2 + n])
                    pos += 2 + n
        else:
            raise ValueError(f"no NAL configuration record for codec {codec!r}")
    except (IndexError, ValueError) as exc:
        raise DecodeError(f"malformed {codec} configuration record ({exc})") from exc
    if any(not _valid_header(codec, u) for u in units) or not units:
        raise DecodeError(f"malformed {codec} configuration record (no valid parameter sets)")
    return b"".join(b"\x00\x00\x00\x01" + u for u in units)


def packet_keyframe(
    data: bytes | memoryview, codec: str, *, need_parameter_sets: bool = True
) -> bool | None:
    """Whether a decoder can start at this sample (see the module notes), or ``None`` when the
    sample does not say. ``need_parameter_sets=False`` when the decoder has them as extradata."""
    if codec in _NAL_CODECS:
        framing = nal_framing(data, codec)
        if framing is None:
            return None
        return _nal_keyframe(nal_units(data, codec, framing), codec, need_parameter_sets)
    if codec in ("av1", "libdav1d"):
        return _av1_keyframe(memoryview(data), need_parameter_sets)
    return None


def _nal_keyframe(units: list[memoryview], codec: str, need_parameter_sets: bool) -> bool | None:
    seen: set[int] = set()
    for unit in units:
        if codec == "h264":
            kind = unit[0] & 0x1F
            if 1 <= kind <= 5:  # first slice: parameter sets precede it in an access unit
                if kind != _H264_IDR:
                    return False
                return not need_parameter_sets or {_H264_SPS, _H264_PPS} <= seen
        else:
            kind = (unit[0] >> 1) & 0x3F
            if kind <= 31:
                if not 16 <= kind <= 23:
                    return False
                return not need_parameter_sets or {_HEVC_VPS, _HEVC_SPS, _HEVC_PPS} <= seen
        seen.add(kind)
    return None


def _leb128(data: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for k in range(8):
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, pos + k + 1
    raise ValueError("leb128 longer than 8 bytes")


def _av1_keyframe(data: memoryview, need_parameter_sets: bool) -> bool | None:
    """Walk the OBUs of a temporal unit: sequence header present, first frame header's type."""
    has_sequence = not need_parameter_sets
    reduced_still = False
    pos = 0
    try:
        while pos < len(data):
            header = data[pos]
            if header & 0x80 or not header & 0x02:  # forbidden bit, or no obu_size field
                return None
            kind = (header >> 3) & 0x0F
            pos += 2 if header & 0x04 else 1  # extension byte
            size, pos = _leb128(data, pos)
            if pos + size > len(data):
                return None
            if kind == _OBU_SEQUENCE_HEADER and size:
                has_sequence = True
                reduced_still = bool(data[pos] & 0x08)  # profile(3) still(1) reduced(1)
            elif kind in (_OBU_FRAME_HEADER, _OBU_FRAME) and size:
                if reduced_still:
                    return has_sequence
                bits = data[pos]
                show_existing = bits >> 7
                frame_type = (bits >> 5) & 0x03
                show_frame = (bits >> 4) & 0x01
                if show_existing or frame_type != _AV1_KEY_FRAME or not show_frame:
                    return False
                return has_sequence
            pos += size
    except (IndexError, ValueError):
        return None
    return None
