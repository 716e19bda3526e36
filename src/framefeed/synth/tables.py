"""Arrow tables and schemas of the synthetic dataset: data rows, episode rows, tasks, PNG bytes."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from framefeed.synth.stats import STAT_NAMES, Stats

__all__ = [
    "data_schema",
    "data_table",
    "encode_png",
    "episodes_schema",
    "episodes_table",
    "tasks_table",
]

Features = Mapping[str, Mapping[str, Any]]
"""``info.json["features"]``: feature name to ``{"dtype", "shape", "names", ...}``."""

_ARROW_TYPES: dict[str, pa.DataType] = {
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
}
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# The layout pandas writes for ``DataFrame({"task_index": ...}, index=tasks).to_parquet()``;
# the version names the pandas release whose layout this mirrors.
_PANDAS_LAYOUT_VERSION = "2.2.3"


def _column_type(feature: Mapping[str, Any]) -> pa.DataType:
    if feature["dtype"] == "image":
        return _IMAGE_TYPE
    scalar = _ARROW_TYPES[feature["dtype"]]
    shape = feature["shape"]
    return scalar if list(shape) == [1] else pa.list_(scalar, shape[0])


def _hf_feature(feature: Mapping[str, Any]) -> dict[str, Any]:
    """The ``datasets`` (4.x) serialisation of one column's feature type."""
    if feature["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": feature["dtype"], "_type": "Value"}
    if list(feature["shape"]) == [1]:
        return value
    return {"feature": value, "length": feature["shape"][0], "_type": "List"}


def data_schema(features: Features) -> pa.Schema:
    """Schema of the data parquet files: every non-video feature, with ``datasets`` metadata."""
    columns = {name: f for name, f in features.items() if f["dtype"] != "video"}
    hf = {"info": {"features": {name: _hf_feature(f) for name, f in columns.items()}}}
    fields = [pa.field(name, _column_type(f)) for name, f in columns.items()]
    return pa.schema(fields, metadata={b"huggingface": json.dumps(hf).encode()})


def data_table(
    schema: pa.Schema,
    numeric: Mapping[str, npt.NDArray[np.generic]],
    images: Mapping[str, Sequence[bytes]],
) -> pa.Table:
    """One episode's rows. ``numeric`` and ``images`` (PNG bytes per frame) are keyed by name."""
    arrays: list[pa.Array] = []
    for field in schema:
        if field.name in images:
            pngs = images[field.name]
            paths = [f"frame-{i:06d}.png" for i in range(len(pngs))]
            arrays.append(
                pa.StructArray.from_arrays(
                    [pa.array(pngs, pa.binary()), pa.array(paths, pa.string())],
                    fields=list(_IMAGE_TYPE),
                )
            )
            continue
        values = numeric[field.name]
        if pa.types.is_fixed_size_list(field.type):
            flat = pa.array(np.ascontiguousarray(values).ravel(), field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _stats_type(feature: Mapping[str, Any], stat: str) -> pa.DataType:
    """``list<...>`` type of one ``stats/<feature>/<stat>`` column."""
    if stat == "count":
        return pa.list_(pa.int64())
    if feature["dtype"] in ("image", "video"):
        return pa.list_(pa.list_(pa.list_(pa.float64())))
    if stat in ("min", "max") and feature["dtype"] in ("int64", "bool"):
        return pa.list_(_ARROW_TYPES[feature["dtype"]])
    return pa.list_(pa.float64())


def episodes_schema(features: Features, camera_keys: Sequence[str]) -> pa.Schema:
    """Schema of ``meta/episodes/*/*.parquet`` in LeRobot's column order (spec section 4)."""
    fields = [
        pa.field("episode_index", pa.int64()),
        pa.field("tasks", pa.list_(pa.string())),
        pa.field("length", pa.int64()),
        pa.field("data/chunk_index", pa.int64()),
        pa.field("data/file_index", pa.int64()),
        pa.field("dataset_from_index", pa.int64()),
        pa.field("dataset_to_index", pa.int64()),
    ]
    for key in camera_keys:
        fields += [
            pa.field(f"videos/{key}/chunk_index", pa.int64()),
            pa.field(f"videos/{key}/file_index", pa.int64()),
            pa.field(f"videos/{key}/from_timestamp", pa.float64()),
            pa.field(f"videos/{key}/to_timestamp", pa.float64()),
        ]
    for name, feature in features.items():
        if feature["dtype"] == "string":
            continue
        fields += [pa.field(f"stats/{name}/{s}", _stats_type(feature, s)) for s in STAT_NAMES]
    fields += [
        pa.field("meta/episodes/chunk_index", pa.int64()),
        pa.field("meta/episodes/file_index", pa.int64()),
    ]
    return pa.schema(fields)


def episodes_table(
    schema: pa.Schema, rows: Sequence[Mapping[str, Any]], stats: Sequence[Mapping[str, Stats]]
) -> pa.Table:
    """Episode rows: plain columns come from ``rows``, ``stats/<f>/<s>`` columns from ``stats``."""
    columns: list[pa.Array] = []
    for field in schema:
        if field.name.startswith("stats/"):
            _, feature, stat = field.name.split("/")  # feature names never contain "/"
            values = [episode[feature][stat].tolist() for episode in stats]
        else:
            values = [row[field.name] for row in rows]
        columns.append(pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def tasks_table(tasks: Sequence[str]) -> pa.Table:
    """``meta/tasks.parquet``: the pandas layout with the task string as the (unnamed) index."""
    pandas_metadata = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": _PANDAS_LAYOUT_VERSION,
    }
    schema = pa.schema(
        [pa.field("task_index", pa.int64()), pa.field("__index_level_0__", pa.string())],
        metadata={b"pandas": json.dumps(pandas_metadata).encode()},
    )
    return pa.Table.from_arrays(
        [pa.array(range(len(tasks)), pa.int64()), pa.array(list(tasks), pa.string())],
        schema=schema,
    )


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """A minimal, deterministic 8-bit RGB PNG (no filtering, zlib level 6) of an HWC image."""
    height, width, _ = image.shape
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # filter byte 0 ("None") per row
    rows[:, 1:] = image.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        ]
    )
