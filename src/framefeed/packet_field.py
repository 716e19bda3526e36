"""`PacketVideoDecoder`: frames of a packet-video column (one compressed sample per row).

The decoder reads the column's Arrow binary array from the batch's store, the first row of each
sample's segment (``store.segment_rows``), and, optionally, a sibling keyframe column, then hands
every target row of the batch to one `PacketDecoder` call: targets that share a GOP are decoded
in one forward pass (see `framefeed.video.packets`). A target with no decodable keyframe before
it is ``None``; the planner turns such samples into zeros plus a ``<key>_is_pad`` mask.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .catalog import Column
from .errors import ConfigError, DecodeError
from .fields import BatchIO, FieldRequest
from .video.packets import PacketDecodeConfig, PacketDecoder, PacketRows

__all__ = ["PacketVideoDecoder", "packet_rows"]

_CACHED = 4
"""Converted arrays kept per decoder (a store's arrays live as long as the store)."""


class PacketVideoDecoder:
    """Frames of a packet-video column as uint8 (B, [T,] 3, H, W), or a list with ``None``.

    ``codec`` (``"h264"``, ``"hevc"``, ``"av1"``) defaults to ``column.info["codec"]``.
    ``keyframe_column`` names a sibling boolean column (``True`` on keyframes; null rows are
    unknown and asked of the packet itself); it defaults to ``column.info["keyframe_column"]``
    (set by the Rerun reader). One with rows of its own is matched to the packets by index
    value. ``keyframe_interval`` is the fallback window, in
    rows, for packets that do not say whether they are keyframes. ``size=(H, W)`` resizes inside
    FFmpeg. ``threads`` runs (GOPs) decode at once on threads of the decoder's own (call `close`
    to stop them); by default (``None``) the runs share the dataset's decode threads.
    """

    def __init__(
        self,
        codec: str | None = None,
        keyframe_column: str | None = None,
        keyframe_interval: int | None = None,
        size: tuple[int, int] | None = None,
        *,
        threads: int | None = None,
    ) -> None:
        self.codec = codec
        self.keyframe_column = keyframe_column
        self.keyframe_interval = keyframe_interval
        self.size = size
        self.threads = threads
        if codec is not None:
            self._config(codec)  # validate now, not at the first batch
        self._decoders: dict[str, PacketDecoder] = {}
        self._arrays: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_decoders={}, _arrays=[])
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the decode threads (idempotent)."""
        with self._lock:
            decoders, self._decoders = list(self._decoders.values()), {}
            self._arrays = []
        for decoder in decoders:
            decoder.close()

    def __enter__(self) -> PacketVideoDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def frames_decoded(self) -> int:
        """Frames the codecs produced so far (targets plus the frames decoded before them)."""
        return sum(d.frames_decoded for d in list(self._decoders.values()))

    def _config(self, codec: str) -> PacketDecodeConfig:
        return PacketDecodeConfig(
            codec=codec,
            size=self.size,
            keyframe_interval=self.keyframe_interval,
            threads=self.threads or 1,
        )

    def _keyframe_path(self, column: Column) -> str | None:
        """The keyframe column: the argument, else the one the format names (Rerun's
        ``VideoStream:is_keyframe`` sibling)."""
        named = column.info.get("keyframe_column")
        if self.keyframe_column is not None:
            return self.keyframe_column
        return named if isinstance(named, str) else None

    def columns(self, request_column: Column | None) -> Sequence[str]:
        if request_column is None:
            return []
        keyframes = self._keyframe_path(request_column)
        return [request_column.path, *([keyframes] if keyframes is not None else [])]

    def decode(self, request: FieldRequest, io: BatchIO) -> torch.Tensor | list[Any]:
        col = request.column
        if col is None:
            raise ConfigError(f"field {request.key!r}: PacketVideoDecoder needs a column")
        codec = self.codec or col.info.get("codec")
        if not isinstance(codec, str):
            raise ConfigError(
                f"column {col.path!r}: no codec in its info; pass "
                "PacketVideoDecoder(codec='h264' | 'hevc' | 'av1')"
            )
        store: Any = request.store  # any store with get() and segment_rows()
        packets = store.get(col.path)
        rows = self._converted((packets,), packet_rows)
        keyframes = None
        kf_path = self._keyframe_path(col)
        if kf_path is not None:
            keyframes = self._converted(
                (packets, store.get(kf_path)),
                lambda _, flags: _aligned_keyframes(
                    store, col.path, kf_path, len(rows), flags, request.dataset.num_segments
                ),
            )
        first, end = store.segment_rows(col.path, request.segments)
        b, t = request.rows.shape
        targets = request.rows.reshape(-1)
        ends = np.repeat(np.asarray(end, dtype=np.int64), t)
        if np.any(targets >= ends):
            bad = int(np.flatnonzero(targets >= ends)[0])
            raise ConfigError(
                f"field {request.key!r}: row {int(targets[bad])} is past the end of its segment "
                f"(rows end at {int(ends[bad])})"
            )
        ids = getattr(request.dataset, "segment_ids", None)
        labels = ids[request.segments] if ids is not None else request.segments
        frames = self._decoder(codec).decode(
            rows,
            targets,
            np.repeat(np.asarray(first, dtype=np.int64), t),
            keyframes=keyframes,
            segments=np.repeat(labels, t),
            column=col.path,
            # Without threads of its own, the decoder uses the dataset's decode threads.
            executor=io.executor if self.threads is None else None,
            threads=io.threads if self.threads is None else self.threads,
        )
        return _assemble(frames, b, t, request.windowed, col.path)

    def _decoder(self, codec: str) -> PacketDecoder:
        with self._lock:
            decoder = self._decoders.get(codec)
            if decoder is None:
                decoder = self._decoders[codec] = PacketDecoder(self._config(codec))
            return decoder

    def _converted(self, arrays: tuple[Any, ...], convert: Any) -> Any:
        """``convert(*arrays)``, cached by the arrays' identities (store arrays are loaded
        once)."""
        with self._lock:
            for sources, value in self._arrays:
                if len(sources) == len(arrays) and all(
                    a is b for a, b in zip(sources, arrays, strict=True)
                ):
                    return value
        value = convert(*arrays)
        with self._lock:
            self._arrays = [(arrays, value), *self._arrays[: _CACHED - 1]]
        return value


def _assemble(
    frames: list[np.ndarray | None], b: int, t: int, windowed: bool, path: str
) -> torch.Tensor | list[Any]:
    shapes = {f.shape for f in frames if f is not None}
    if len(shapes) > 1:
        raise DecodeError(
            f"column {path!r}: frames of one batch have different sizes {sorted(shapes)}; pass "
            "PacketVideoDecoder(size=(H, W)) to resize them to one"
        )
    decoded = [f for f in frames if f is not None]
    if decoded and len(decoded) == len(frames):
        stacked = torch.from_numpy(np.stack(decoded)).reshape(b, t, *decoded[0].shape)
        return stacked if windowed else stacked[:, 0]
    out: list[Any] = []
    for i in range(b):
        sample = [f for f in frames[i * t : (i + 1) * t] if f is not None]
        if len(sample) < t:
            out.append(None)  # one undecodable frame masks the sample (the pad mask is per sample)
            continue
        tensor = torch.from_numpy(np.stack(sample))
        out.append(tensor if windowed else tensor[0])
    return out


def packet_rows(array: Any) -> PacketRows:
    """An Arrow Binary/LargeBinary array (or chunked array) as `PacketRows`, without copying
    the packets. Other binary-like types are cast to ``large_binary`` first."""
    if isinstance(array, pa.ChunkedArray):
        array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    if isinstance(array, list):
        return PacketRows.from_list(array)
    if not isinstance(array, pa.Array):
        raise DecodeError(f"a packet column must be an Arrow binary array, got {type(array)}")
    if pa.types.is_binary(array.type):
        dtype: Any = np.int32
    elif pa.types.is_large_binary(array.type):
        dtype = np.int64
    elif pa.types.is_binary_view(array.type) or pa.types.is_fixed_size_binary(array.type):
        return packet_rows(array.cast(pa.large_binary()))
    else:
        raise DecodeError(
            f"a packet column must hold binary values (one compressed sample per row), got "
            f"Arrow type {array.type}"
        )
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=dtype)[array.offset : array.offset + len(array) + 1]
    data = memoryview(buffers[2]) if buffers[2] is not None else b""
    valid = None
    if array.null_count:
        valid = array.is_valid().to_numpy(zero_copy_only=False)
    return PacketRows(data=data, offsets=offsets.astype(np.int64), valid=valid)


def _keyframe_flags(values: Any) -> np.ndarray:
    """A keyframe column as int8 per row: 1 keyframe, 0 not, -1 unknown (null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        flags = np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.int8)
        if values.null_count:
            flags[values.is_null().to_numpy(zero_copy_only=False)] = -1
        return flags
    return np.asarray(values).astype(np.int8)


def _aligned_keyframes(
    store: Any, path: str, kf_path: str, num_rows: int, values: Any, num_segments: int
) -> np.ndarray:
    """Keyframe flags per row of the packet column ``path`` (int8, -1 unknown).

    A keyframe column logged with the samples has the same rows. One that has rows of its own
    (a sparse marker, as Rerun allows) is matched to the packets by segment and index value;
    packet rows without a marker are unknown, so the packet itself is asked.
    """
    flags = _keyframe_flags(values)
    if len(flags) == num_rows:
        return flags
    if not hasattr(store, "index_values"):
        raise ConfigError(
            f"keyframe column {kf_path!r} has {len(flags)} rows and packet column {path!r} "
            f"{num_rows}, and the store cannot match them by index value"
        )
    out = np.full(num_rows, -1, dtype=np.int8)
    at, kf_at = store.index_values(path), store.index_values(kf_path)
    segments = np.arange(num_segments)
    first, end = store.segment_rows(path, segments)
    kf_first, kf_end = store.segment_rows(kf_path, segments)
    for seg in np.flatnonzero((end > first) & (kf_end > kf_first)).tolist():
        times = at[first[seg] : end[seg]]
        marks = kf_at[kf_first[seg] : kf_end[seg]]
        pos = np.searchsorted(times, marks)
        hit = pos < len(times)
        hit[hit] = times[pos[hit]] == marks[hit]
        out[first[seg] + pos[hit]] = flags[kf_first[seg] : kf_end[seg]][hit]
    return out
