"""What a Rerun component column is to framefeed: its kind, row layout, shape and extras.

Shared by the ``.rrd`` reader (``formats/rerun.py``) and the catalog server reader
(``formats/rerun_catalog.py``): both hand a ``rerun.chunk.LazyStore`` (of a file, or of a
server's segment) to `probe`, which looks at the first chunk that holds the column and nothing
more. Kinds: ``EncodedImage:blob`` is an image column (``info["media_type"]``); a ``VideoSample``
component (``VideoStream:sample``) holds packet video (``info["codec"]`` and, when the sibling
``VideoStream:is_keyframe`` exists, ``info["keyframe_column"]``); text components are text
columns; other components of numbers or booleans are numeric with the shape of one row.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import ColumnKind
from ..errors import FormatError
from .rerun_source import ColumnSpec, as_binary, is_list, one_per_row

__all__ = ["CODECS", "PROPERTIES", "classify", "field_meta", "probe"]

PROPERTIES = "/__properties"
"""Entity of a recording's properties (static; never a column)."""

CODECS = {
    0x61766331: "h264",
    0x68657631: "hevc",
    0x61763031: "av1",
    0x76703038: "vp8",
    0x76703039: "vp9",
}
"""Rerun's ``VideoCodec`` values (big-endian fourccs) and the PyAV decoder of each."""


def field_meta(f: pa.Field, key: str) -> str:
    """A ``rerun:*`` metadata entry of a schema field ("" when absent)."""
    raw: bytes = (f.metadata or {}).get(key.encode(), b"")
    return raw.decode()


def classify(f: pa.Field) -> ColumnKind | None:
    """The kind of a Rerun component column, or None for kinds framefeed does not read."""
    component_type = field_meta(f, "rerun:component_type")
    if component_type == "rerun.components.VideoSample":
        return ColumnKind.PACKETS
    if field_meta(f, "rerun:component") == "EncodedImage:blob":
        return ColumnKind.IMAGE
    t = f.type
    if not is_list(t):
        return None
    t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ColumnKind.TEXT
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return ColumnKind.NUMERIC
    return None


def _first_rows(store: Any, entity: str, component: str, *, static: bool | None) -> pa.Array:
    """The non-null rows of the first chunk that has any (an empty array when none has)."""
    for chunk in store.stream().filter(content=entity, components=[component], is_static=static):
        if chunk.entity_path != entity:
            continue
        batch = chunk.to_record_batch()
        if component in batch.schema.names:
            values = batch.column(component).drop_null()
            if len(values):
                return values
    return pa.array([], pa.null())


def probe(
    store: Any, where: str, f: pa.Field, kind: ColumnKind, names: set[str]
) -> tuple[ColumnSpec, tuple[int, ...], dict[str, Any], str]:
    """Spec, row shape, info and dtype of a column, from its first chunk in ``store``.

    ``where`` names the column in messages; ``names`` are every column path of the dataset (to
    find a video's keyframe sibling).
    """
    entity = field_meta(f, "rerun:entity_path")
    component = field_meta(f, "rerun:component")
    spec = ColumnSpec(entity=entity, component=component, kind=kind)
    rows = _first_rows(store, entity, component, static=False)
    info: dict[str, Any] = {"rerun.component_type": field_meta(f, "rerun:component_type")}
    if kind is ColumnKind.NUMERIC:
        t = f.type.value_type
        inner: list[int] = []
        while pa.types.is_fixed_size_list(t):
            inner.append(t.list_size)
            t = t.value_type
        counts = pc.list_value_length(rows).to_numpy(zero_copy_only=False) if len(rows) else [1]
        leaf = "bool" if pa.types.is_boolean(t) else t.to_pandas_dtype().__name__
        spec = ColumnSpec(
            entity=entity,
            component=component,
            kind=kind,
            instances=int(counts[0]),
            inner=tuple(inner),
            leaf=str(np.dtype(leaf)),
        )
        return spec, spec.shape, info, spec.leaf
    if kind is ColumnKind.TEXT:
        return spec, (), info, "string"
    blobs = as_binary(one_per_row(rows, where)) if len(rows) else pa.array([], pa.binary())
    first = blobs[0].as_py() if len(blobs) else b""
    if kind is ColumnKind.IMAGE:
        media = _first_rows(store, entity, _sibling(component, "media_type"), static=None)
        media_type = media.flatten()[0].as_py() if len(media) else _sniff(first)
        info["media_type"] = media_type
        return spec, _image_shape(first) or (), info, "uint8"
    codecs = _first_rows(store, entity, _sibling(component, "codec"), static=None)
    fourcc = int(codecs.flatten()[0].as_py()) if len(codecs) else -1
    if fourcc not in CODECS:
        raise FormatError(
            f"{where}: video codec {fourcc:#x} is not one of "
            f"{sorted(CODECS.values())} (log VideoStream:codec with the samples)"
        )
    info["codec"] = CODECS[fourcc]
    keyframes = f"{entity}:{_sibling(component, 'is_keyframe')}"
    if keyframes in names:
        info["keyframe_column"] = keyframes
    return spec, _frame_shape(info["codec"], blobs), info, "uint8"


def _sibling(component: str, field_name: str) -> str:
    """``VideoStream:sample`` -> ``VideoStream:codec``: a component of the same archetype."""
    archetype = component.rsplit(":", 1)[0]
    return f"{archetype}:{field_name}"


def _sniff(blob: bytes) -> str | None:
    if blob.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _image_shape(blob: bytes) -> tuple[int, int, int] | None:
    """(height, width, channels) from a JPEG or PNG header, or None."""
    if blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) >= 26:
        width, height = struct.unpack(">II", blob[16:24])
        channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(blob[25], 3)
        return int(height), int(width), channels
    pos = 2
    while blob.startswith(b"\xff\xd8") and pos + 4 <= len(blob):
        if blob[pos] != 0xFF:
            return None
        marker = blob[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in _SOF and pos + 10 <= len(blob):
            height, width = struct.unpack(">HH", blob[pos + 5 : pos + 9])
            return int(height), int(width), int(blob[pos + 9])
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            pos += 2
            continue
        pos += 2 + struct.unpack(">H", blob[pos + 2 : pos + 4])[0]
    return None


def _frame_shape(codec: str, packets: pa.Array) -> tuple[int, ...]:
    """(height, width, 3) of the first frame the packets decode to, or () if none does."""
    import av

    try:
        ctx: Any = av.CodecContext.create(codec, "r")
        for blob in packets.to_pylist():
            for frame in ctx.decode(av.Packet(blob)):
                return int(frame.height), int(frame.width), 3
        for frame in ctx.decode(None):
            return int(frame.height), int(frame.width), 3
    except av.FFmpegError:
        return ()
    return ()
