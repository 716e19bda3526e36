"""Build a `VideoIndex` from an MP4's ``moov`` box alone, without demuxing or reading the media.

`parse_mp4_index` walks the top-level box headers through a ``read(offset, length)`` callback
(16 bytes per header), reads the ``moov`` box whole wherever it is (before or after ``mdat``)
and turns the first video track's sample tables into the packet table that
`VideoIndex.from_file` gets by demuxing with PyAV. The two are equal field by field because
the timestamps follow FFmpeg's MOV demuxer (``mov_build_index``, ``mov_fix_index`` and
``mov_read_packet``, FFmpeg 7.1+): dts is the ``stts`` sum minus the dts shift that undoes
negative ``ctts`` offsets, pts adds the offset, and edit lists are applied as FFmpeg applies
them: each edit keeps the samples it shows plus those needed to decode its first frame, and
the timeline moves so that the first frame shown has pts 0 (or the empty edits' duration).

Malformed or truncated input raises `DecodeError` naming the file and the box, never anything
else, and every allocation is bounded by the bytes actually present. Not supported (they raise
`DecodeError`): fragmented MP4, compressed ``cmov``, codecs other than AV1, H.264, HEVC and
VP9, and ``stts`` deltas that FFmpeg reads as negative corrections. Keyframes come from
``stss``; for H.264, AV1 and VP9 FFmpeg flags keyframes from the bitstream instead, which
agrees except for files whose ``stss`` is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import IO

import numpy as np
import numpy.typing as npt

from ..errors import DecodeError
from .index import VideoIndex

__all__ = ["index_from_fileobj", "parse_mp4_index"]

_I64 = npt.NDArray[np.int64]
_Bool = npt.NDArray[np.bool_]
_Span = tuple[int, int]  # a box payload: [start, end) in the moov bytes
_Edit = tuple[int, int]  # media time, duration (media timescale)
_Boxes = dict[bytes, _Span]  # a container's children, the first of each type

_CODECS = {  # sample entry -> the FFmpeg decoder VideoIndex names
    b"av01": "libdav1d",
    b"avc1": "h264",
    b"avc3": "h264",
    b"hvc1": "hevc",
    b"hev1": "hevc",
    b"vp09": "vp9",
}
_CONFIG_BOXES = (b"av1C", b"avcC", b"hvcC")  # FFmpeg's extradata; vpcC gives none
_MAX_TOP_BOXES = 4096
_MAX_MOOV = 1 << 28
_MAX_SAMPLES = 1 << 26
_MAX_EDITS = 64
_MAX_STTS_DELTA = 0xFFFFFFFF - 48000 * 10  # FFmpeg's max_stts_delta
_LIMIT = 1 << 61  # edit times and durations stay far from int64 overflow


def parse_mp4_index(read: Callable[[int, int], bytes], file_size: int, path: str) -> VideoIndex:
    """Index the first video track of the MP4 whose bytes ``read(offset, length)`` returns.

    ``read`` may return fewer bytes at the end of the file; its own errors pass through. Only
    the top-level box headers and the ``moov`` box are read, never ``mdat``.
    """
    moov = _read_moov(read, file_size, path)
    try:
        return _parse_moov(moov, file_size, path)
    except (ArithmeticError, IndexError, ValueError) as exc:  # a safety net, never expected
        raise DecodeError(f"{path}: malformed 'moov' box ({exc})") from exc


def index_from_fileobj(fileobj: IO[bytes], path: str) -> VideoIndex:
    """`parse_mp4_index` over a seekable binary file object."""
    file_size = fileobj.seek(0, os.SEEK_END)

    def read(offset: int, length: int) -> bytes:
        fileobj.seek(offset)
        parts: list[bytes] = []
        while length > 0 and (part := fileobj.read(length)):
            parts.append(part)
            length -= len(part)
        return b"".join(parts)

    return parse_mp4_index(read, file_size, path)


def _name(kind: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 and c != 39 else "?" for c in kind)


def _header(head: bytes, room: int, parent: str, path: str) -> tuple[bytes, int, int]:
    """(type, header length, box size) of the box starting ``head``, ``room`` bytes left."""
    size, kind, header = int.from_bytes(head[:4], "big"), head[4:8], 8
    if size == 1:
        if len(head) < 16:
            raise DecodeError(f"{path}: truncated '{_name(kind)}' box header in {parent}")
        size, header = int.from_bytes(head[8:16], "big"), 16
    elif size == 0:  # to the end of the parent
        size = room
    if size < header or size > room:
        raise DecodeError(
            f"{path}: truncated '{_name(kind)}' box in {parent} ({size} bytes, {room} left)"
        )
    return kind, header, size


def _read_moov(read: Callable[[int, int], bytes], file_size: int, path: str) -> bytes:
    offset = 0
    for _ in range(_MAX_TOP_BOXES):
        if file_size - offset < 8:
            raise DecodeError(f"{path}: no 'moov' box")
        head = bytes(read(offset, min(16, file_size - offset))[:16])
        if len(head) < 8:
            raise DecodeError(f"{path}: truncated file: no box header at offset {offset}")
        kind, header, size = _header(head, file_size - offset, "the file", path)
        if kind == b"moov":
            if size > _MAX_MOOV:
                raise DecodeError(f"{path}: 'moov' box of {size} bytes is implausibly large")
            body = bytes(read(offset + header, size - header)[: size - header])
            if len(body) < size - header:
                raise DecodeError(f"{path}: truncated 'moov' box")
            return body
        offset += size
    raise DecodeError(f"{path}: no 'moov' box in the first {_MAX_TOP_BOXES} boxes")


def _boxes(data: bytes, span: _Span, parent: str, path: str) -> Iterator[tuple[bytes, _Span]]:
    """Children of a container, as (type, payload). Trailing bytes under 8 are ignored."""
    offset, end = span
    while end - offset >= 8:
        kind, header, size = _header(data[offset : offset + 16], end - offset, f"'{parent}'", path)
        yield kind, (offset + header, offset + size)
        offset += size


def _children(data: bytes, span: _Span, parent: str, path: str) -> _Boxes:
    found: _Boxes = {}
    for kind, child in _boxes(data, span, parent, path):
        found.setdefault(kind, child)
    return found


def _uint(data: bytes, span: _Span, at: int, n: int, box: str, path: str) -> int:
    if span[1] - span[0] < at + n:
        raise DecodeError(f"{path}: truncated '{box}' box")
    return int.from_bytes(data[span[0] + at : span[0] + at + n], "big")


def _timescale(data: bytes, span: _Span, box: str, path: str) -> tuple[int, int]:
    """(version, timescale) of an ``mvhd`` or ``mdhd`` box."""
    version = _uint(data, span, 0, 1, box, path)
    return version, _uint(data, span, 20 if version == 1 else 12, 4, box, path)


def _table(
    data: bytes, span: _Span, at: int, dtype: str, box: str, path: str, fields: int = 1
) -> _I64:
    """The ``count`` (u32 at ``at``) rows of ``fields`` x ``dtype`` after it, as int64."""
    count, kind = _uint(data, span, at, 4, box, path), np.dtype(dtype)
    if count * fields * kind.itemsize > span[1] - span[0] - at - 4:
        raise DecodeError(f"{path}: truncated '{box}' box ({count} entries)")
    rows = np.frombuffer(data, kind, count * fields, span[0] + at + 4).astype(np.int64)
    return rows.reshape(count, fields) if fields > 1 else rows


def _parse_moov(data: bytes, file_size: int, path: str) -> VideoIndex:
    movie_scale = 0  # without mvhd, FFmpeg's edit lists keep nothing
    video: _Span | None = None
    for kind, span in _boxes(data, (0, len(data)), "moov", path):
        if kind == b"mvhd":
            scale = _timescale(data, span, "mvhd", path)[1]
            movie_scale = scale if 0 < scale < 1 << 31 else 1
        elif kind == b"trak" and video is None:
            media = _children(data, span, "trak", path).get(b"mdia")
            hdlr = None if media is None else _children(data, media, "mdia", path).get(b"hdlr")
            if hdlr is not None and _uint(data, hdlr, 8, 4, "hdlr", path) == 0x76696465:  # vide
                video = span
        elif kind == b"cmov":
            raise DecodeError(f"{path}: compressed 'moov' boxes are not supported")
    if video is None:
        raise DecodeError(f"{path}: no video track")
    trak = _children(data, video, "trak", path)
    mdia = _children(data, trak[b"mdia"], "mdia", path)
    if b"mdhd" not in mdia:
        raise DecodeError(f"{path}: no 'mdhd' box in the video track")
    version, scale = _timescale(data, mdia[b"mdhd"], "mdhd", path)
    if version > 1 or not 0 < scale < 1 << 31:
        raise DecodeError(f"{path}: bad 'mdhd' box (version {version}, timescale {scale})")
    minf = _children(data, mdia[b"minf"], "minf", path) if b"minf" in mdia else {}
    stbl = _children(data, minf[b"stbl"], "stbl", path) if b"stbl" in minf else {}
    for need in (b"stsd", b"stts", b"stsc", b"stsz"):
        if need not in stbl:
            raise DecodeError(f"{path}: no '{need.decode()}' box in the video track")
    codec, extradata, width, height, single = _sample_entry(data, stbl[b"stsd"], path)
    edts = _children(data, trak[b"edts"], "edts", path) if b"edts" in trak else {}
    edits = _edits(data, edts[b"elst"], scale, movie_scale, path) if b"elst" in edts else []
    pos, size, keyframe, dts, pts = _samples(data, stbl, single, edits, file_size, path)
    keep = size > 0  # VideoIndex.from_file skips empty packets
    if not keep.any():
        raise DecodeError(f"{path}: the video track has no samples")
    # Samples past the end of a truncated file stay in the index: the frames before the cut
    # still decode, and reading a missing one raises a DecodeError naming the file and range.
    return VideoIndex(
        path=path,
        codec=codec,
        extradata=extradata,
        width=width,
        height=height,
        time_base=Fraction(1, scale),
        pts=pts[keep],
        dts=dts[keep],
        pos=pos[keep],
        size=size[keep],
        keyframe=keyframe[keep],
    )


def _sample_entry(data: bytes, stsd: _Span, path: str) -> tuple[str, bytes | None, int, int, bool]:
    """Codec, extradata, width, height, and whether the first entry's format is unique."""
    entries = list(_boxes(data, (min(stsd[0] + 8, stsd[1]), stsd[1]), "stsd", path))
    if not entries:
        raise DecodeError(f"{path}: empty 'stsd' box")
    fourcc, (start, end) = entries[0]
    if fourcc not in _CODECS:
        raise DecodeError(f"{path}: unsupported video sample entry '{_name(fourcc)}'")
    if end - start < 78:
        raise DecodeError(f"{path}: truncated '{_name(fourcc)}' sample entry")
    width = int.from_bytes(data[start + 24 : start + 26], "big")
    height = int.from_bytes(data[start + 26 : start + 28], "big")
    extradata = None
    for kind, (s, e) in _boxes(data, (start + 78, end), _name(fourcc), path):
        if kind in _CONFIG_BOXES:
            if not 7 <= e - s < 1 << 28:
                raise DecodeError(f"{path}: bad '{_name(kind)}' box of {e - s} bytes")
            extradata = data[s:e]
            break
    # FFmpeg: with one entry of this format, only samples of stsc description 1 are packets.
    single = sum(kind == fourcc for kind, _ in entries) == 1
    return _CODECS[fourcc], extradata, width, height, single


def _edits(data: bytes, elst: _Span, scale: int, movie_scale: int, path: str) -> list[_Edit]:
    """(media time, duration in media units) per edit, read as FFmpeg reads them."""
    v1 = _uint(data, elst, 0, 1, "elst", path) == 1
    _uint(data, elst, 4, 4, "elst", path)  # FFmpeg trusts the box size over the entry count
    kind = np.dtype([("d", ">u8" if v1 else ">u4"), ("t", ">i8" if v1 else ">i4"), ("r", ">u4")])
    count = (elst[1] - elst[0] - 8) // kind.itemsize
    if count > _MAX_EDITS:
        raise DecodeError(f"{path}: edit list ('elst') of {count} entries is not supported")
    if count and not movie_scale:
        raise DecodeError(f"{path}: edit list ('elst') without a movie timescale ('mvhd')")
    rows = np.frombuffer(data, kind, count, elst[0] + 8)
    edits = []
    for duration, media_time in zip(rows["d"].tolist(), rows["t"].tolist(), strict=True):
        duration -= (duration >= 1 << 63) << 64  # int64 in FFmpeg
        magnitude = (abs(duration) * scale + movie_scale // 2) // movie_scale  # av_rescale
        duration = -magnitude if duration < 0 else magnitude
        if (duration + media_time) % (1 << 64) >= 1 << 63:
            duration = 0
        if abs(duration) > _LIMIT or abs(media_time) > _LIMIT:
            raise DecodeError(f"{path}: edit list ('elst') out of range")
        edits.append((media_time, duration))
    return edits


def _samples(
    data: bytes, stbl: _Boxes, single: bool, edits: list[_Edit], file_size: int, path: str
) -> tuple[_I64, _I64, _Bool, _I64, _I64]:
    """pos, size, keyframe, dts, pts of the packets PyAV returns, in decode order."""
    sizes = _sizes(data, stbl[b"stsz"], file_size, path)
    n = sizes.size
    if n == 0:
        raise DecodeError(f"{path}: the video track has no samples (fragmented MP4?)")
    if b"stco" in stbl:
        chunks = _table(data, stbl[b"stco"], 4, ">u4", "stco", path)
    elif b"co64" in stbl:
        chunks = _table(data, stbl[b"co64"], 4, ">i8", "co64", path)
    else:
        raise DecodeError(f"{path}: no 'stco' or 'co64' box in the video track")
    if ((chunks < 0) | (chunks > file_size)).any():
        raise DecodeError(f"{path}: chunk offset outside the file in 'stco' or 'co64'")
    stsc = _table(data, stbl[b"stsc"], 4, ">u4", "stsc", path, 3)
    first, per_chunk, desc = stsc[:, 0], stsc[:, 1], stsc[:, 2]
    if not stsc.size or first[0] < 1 or (np.diff(first) <= 0).any() or first[-1] > chunks.size:
        raise DecodeError(f"{path}: inconsistent 'stsc' box")
    run = (np.searchsorted(first, np.arange(1, chunks.size + 1), "right") - 1).clip(0, None)
    counts = per_chunk[run]
    m = int(counts.sum())  # FFmpeg indexes the samples the chunks hold
    if m > n:
        raise DecodeError(f"{path}: 'stsc' holds {m} samples, more than 'stsz' ({n})")
    chunk = np.repeat(np.arange(chunks.size), counts)
    starts = np.cumsum(sizes[:m]) - sizes[:m]
    pos = chunks[chunk] + starts - starts[(np.cumsum(counts) - counts)[chunk]]
    keep = desc[run][chunk] == 1 if single else np.ones(m, bool)
    # Timing, from FFmpeg's merged per-sample stts/ctts table.
    stts = _table(data, stbl[b"stts"], 4, ">u4", "stts", path, 2)
    if not stts.size or (stts[:, 1] > _MAX_STTS_DELTA).any():  # FFmpeg: no packets, or a fix-up
        raise DecodeError(f"{path}: empty 'stts' box, or a negative or huge delta in it")
    dur, stts_n = _expand(stts, n)
    offsets, ctts_n, shift = np.zeros(n, np.int64), 0, 0
    if b"ctts" in stbl:
        ctts = _table(data, stbl[b"ctts"], 4, ">u4", "ctts", path, 2)
        valid = (ctts[:, 0] > 0) & (ctts[:, 0] < 1 << 31)  # int32 counts, <= 0 skipped
        offset = ctts[:, 1] - (ctts[:, 1] >= 1 << 31) * (1 << 32)  # signed in either version
        early = offset[valid[: max(0, len(ctts) - 2)].nonzero()[0]]  # not the last two
        shift = min(max(0, -int(early.min())), (1 << 31) - 1) if early.size else 0
        offsets, ctts_n = _expand(np.stack([ctts[valid, 0], offset[valid]], axis=1), n)
    has_ctts = ctts_n > 0
    if stts_n < n:  # past the stts: zero, or the last delta (FFmpeg's tts_count rule)
        dur[stts_n:] = 0 if ctts_n > stts_n or not stts_n else dur[stts_n - 1]
    t = (np.cumsum(dur) - dur - shift)[:m][keep]
    pos, size, key = pos[keep], sizes[:m][keep], _keyframes(data, stbl, n, path)[:m][keep]
    if not t.size:
        raise DecodeError(f"{path}: the video track has no samples")
    tts_count = max(stts_n, ctts_n)
    off = offsets[: min(t.size, tts_count)]  # FFmpeg walks its tts table per packet
    if edits:
        pick, t, off = _apply_edits(edits, t, key, off, has_ctts, shift, path)
        pos, size, key = pos[pick], size[pick], key[pick]
    pts = t.copy()
    if has_ctts:  # packets past the tts table keep pts = dts
        pts[: off.size] += shift + off
    return pos, size, key, t, pts


def _sizes(data: bytes, stsz: _Span, file_size: int, path: str) -> _I64:
    uniform = _uint(data, stsz, 4, 4, "stsz", path)
    if uniform:
        count = _uint(data, stsz, 8, 4, "stsz", path)
        if count > _MAX_SAMPLES or count * uniform > file_size:
            raise DecodeError(f"{path}: {count} samples of {uniform} bytes in 'stsz'")
        return np.full(count, uniform, np.int64)
    sizes = _table(data, stsz, 8, ">u4", "stsz", path)
    if sizes.size > _MAX_SAMPLES or (sizes > 0x3FFFFFFF).any():
        raise DecodeError(f"{path}: implausible sample sizes in 'stsz'")
    return sizes


def _expand(rows: _I64, n: int) -> tuple[_I64, int]:
    """Per-sample values of a (count, value) run table cut at ``n``, and how many it covers."""
    covered = np.minimum(np.cumsum(rows[:, 0]), n)
    out = np.zeros(n, np.int64)
    filled = int(covered[-1]) if covered.size else 0
    out[:filled] = np.repeat(rows[:, 1], np.diff(covered, prepend=0))
    return out, filled


def _keyframes(data: bytes, stbl: _Boxes, n: int, path: str) -> _Bool:
    if b"stss" not in stbl:
        return np.ones(n, bool)
    sync = _table(data, stbl[b"stss"], 4, ">u4", "stss", path)
    key = np.zeros(n, bool)
    if not sync.size:  # FFmpeg: only the first sample
        key[0] = True
        return key
    # FFmpeg matches the entries in order: one that does not increase is never reached.
    stuck = np.flatnonzero(np.diff(sync) <= 0)
    sync = sync[: int(stuck[0]) + 1 if stuck.size else sync.size] - int(sync[0] > 0)
    key[sync[sync < n]] = True
    return key


def _apply_edits(
    edits: list[_Edit], t: _I64, key: _Bool, tts: _I64, has_ctts: bool, shift: int, path: str
) -> tuple[_I64, _I64, _I64]:
    """FFmpeg's mov_fix_index: the packets the edits keep, their dts and ctts offsets.

    ``tts`` holds the ctts offsets of the first packets, as many as FFmpeg's tts table has.
    """
    off = np.zeros(t.size, np.int64)
    off[: tts.size] = tts
    cts = t + shift + off
    step = np.zeros(t.size, np.int64)
    step[:-1] = np.diff(t)
    picks, stamps, offsets, shown = [], [], [], []
    end, empty, started = -shift, 0, False
    for media_time, duration in edits:
        counter, end = end, end + duration
        if abs(end) > _LIMIT:
            raise DecodeError(f"{path}: edit list ('elst') out of range")
        if not started and media_time == -1:
            empty += duration
            continue
        started = True
        start = _edit_start(t, key, off, tts.size, has_ctts, shift, media_time)
        lo, hi = media_time, media_time + duration
        step[-1] = duration
        # The edit ends at the first keyframe past it, or the second one with B-frames.
        after = np.flatnonzero((cts[start:] + step[start:] >= hi) & key[start:])
        nth = int(has_ctts)
        last = start + int(after[nth]) if after.size > nth else t.size - 1
        seg = slice(start, last + 1)
        inside = (cts[seg] >= lo) & (cts[seg] < hi)
        first = np.flatnonzero(inside)
        if first.size:  # dts runs on from the edit's start, and before it for the preroll
            dts = counter + (t[seg] - t[start + int(first[0])])
            shown.append((dts + off[seg] + shift)[inside])
        else:
            dts = np.full(last + 1 - start, counter, np.int64)
        picks.append(np.arange(start, last + 1))
        stamps.append(dts)
        offsets.append(tts[start : last + 1])
    if not picks:
        raise DecodeError(f"{path}: the edit list ('elst') keeps no samples")
    low = np.concatenate(shown) if shown else np.full(1, -1, np.int64)
    negative = np.flatnonzero(low < 0)  # FFmpeg restarts its minimum after a negative value
    if negative.size:
        low = low[min(int(negative[-1]) + 1, low.size - 1) :]
    dts = np.concatenate(stamps)
    if (corrected := int(low.min()) - empty) > 0:  # the first frame shown gets pts 0
        dts -= corrected
    return np.concatenate(picks), dts, np.concatenate(offsets)


def _edit_start(
    t: _I64, key: _Bool, off: _I64, tts_count: int, has_ctts: bool, shift: int, media_time: int
) -> int:
    """FFmpeg's find_prev_closest_index: the keyframe an edit starts decoding from."""
    wanted = media_time - shift
    for any_frame in (False, True):
        a, b = -1, t.size  # ff_index_search_timestamp, backward: ties depend on the bisection
        if t[b - 1] < wanted:
            a = b - 1
        while b - a > 1:
            mid = (a + b) >> 1
            if t[mid] >= wanted:
                b = mid
            if t[mid] <= wanted:
                a = mid
        index = a
        if not any_frame:
            keys = np.flatnonzero(key[: index + 1])
            index = int(keys[-1]) if keys.size else -1
        if index >= 0:
            same = int(np.searchsorted(t, t[index], "left"))  # back to the first equal dts
            keys = np.flatnonzero(key[same:index])
            if any_frame or keys.size:
                index = same if any_frame else same + int(keys[0])
            if has_ctts and index < tts_count:  # a keyframe shown no later than wanted
                ok = np.flatnonzero(
                    key[: index + 1] & (t[: index + 1] + off[: index + 1] <= wanted)
                )
                index = int(ok[-1]) if ok.size else -1
        if index >= 0:
            return index
    return 0
