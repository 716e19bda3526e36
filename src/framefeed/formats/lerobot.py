"""LeRobot v3 reader: ``meta/`` files into the `Dataset` model, without touching data or video.

The layout and semantics follow ``shared/design/lerobot-v3-format.md``: ``meta/info.json``
(features, fps, path templates), ``meta/episodes/chunk-*/file-*.parquet`` (one row per episode,
with the data and per-camera video file of each episode and its time span inside the video) and
``meta/tasks.parquet`` (task strings as a pandas index). The stats columns of the episodes table
are never read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..catalog import Column, ColumnKind, Dataset, Timeline, TimelineKind
from ..errors import FormatError, StorageError
from ..storage import Storage

__all__ = ["DEFAULT_KEYS", "is_lerobot", "open_lerobot"]

INFO = "meta/info.json"
TASKS = "meta/tasks.parquet"
EPISODES_GLOB = "meta/episodes/*/*.parquet"
DEFAULT_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
"""The five columns LeRobot adds to every dataset."""
_CONVERT_HINT = (
    "convert it with LeRobot's converter: "
    "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=<repo> "
    "(or re-record it with lerobot>=0.4)"
)


def is_lerobot(storage: Storage) -> bool:
    return storage.exists(INFO)


def open_lerobot(storage: Storage) -> Dataset:
    """Read the metadata of the LeRobot dataset at ``storage`` into a `Dataset`."""
    info = storage.read_json(INFO)
    where = storage.url(INFO)
    if not isinstance(info, dict):
        raise FormatError(f"{where}: expected a JSON object")
    version = str(info.get("codebase_version", ""))
    _check_version(version, where)
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise FormatError(f"{where}: missing key {key!r}")
    fps = _number(info["fps"], "fps", where)
    if not (math.isfinite(fps) and fps > 0):
        raise FormatError(f"{where}: fps must be a positive number, got {info['fps']!r}")
    columns = _columns(info["features"], where)
    tasks = _read_tasks(storage)
    video_keys = [c.path for c in columns.values() if c.kind is ColumnKind.VIDEO]
    if video_keys and not info.get("video_path"):
        raise FormatError(f"{where}: features {video_keys} are videos but video_path is null")
    table = _read_episodes(storage, video_keys)
    if table.num_rows and not tasks:
        raise FormatError(
            f"{storage.url(TASKS)}: the tasks table is empty, but the dataset has "
            f"{table.num_rows} episodes; every frame's task_index names a task there"
        )
    table = _add_paths(table, info, video_keys, where)
    total = info.get("total_frames")
    n_frames = int(pc.sum(table.column("length")).as_py() or 0)
    if total is not None and _number(total, "total_frames", where) != n_frames:
        raise FormatError(
            f"{where}: total_frames is {total} but the episodes in meta/episodes add up to "
            f"{n_frames} frames; the metadata is inconsistent"
        )
    return Dataset(
        storage=storage,
        format_name="lerobot",
        version=version,
        fps=fps,
        columns=columns,
        timelines=[
            Timeline(name="frame_index", kind=TimelineKind.SEQUENCE, rate_hz=fps),
            Timeline(name="timestamp", kind=TimelineKind.TIME, rate_hz=fps),
        ],
        tasks=tasks,
        segments=table,
        info=info,
    )


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FormatError(f"{where}: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise FormatError(f"{where}: {key} must be a number, got {value!r}") from None


def _check_version(version: str, where: str) -> None:
    if not version.startswith("v"):
        raise FormatError(f"{where}: no codebase_version; is this a LeRobot dataset?")
    try:
        major = int(version[1:].split(".")[0])
    except ValueError:
        raise FormatError(f"{where}: unreadable codebase_version {version!r}") from None
    if major < 3:
        raise FormatError(
            f"{where}: this is a LeRobot {version} dataset (one file per episode, JSON-lines "
            f"metadata); framefeed reads the v3.0 layout. To use it, {_CONVERT_HINT}."
        )
    if major > 3:
        raise FormatError(f"{where}: LeRobot format {version} is newer than framefeed knows (v3)")


def _columns(features: Any, where: str) -> dict[str, Column]:
    if not isinstance(features, Mapping) or not features:
        raise FormatError(f"{where}: 'features' must be a non-empty object")
    out: dict[str, Column] = {}
    for name, spec in features.items():
        if not isinstance(spec, Mapping) or "dtype" not in spec or "shape" not in spec:
            raise FormatError(f"{where}: feature {name!r} needs 'dtype' and 'shape'")
        dtype = str(spec["dtype"])
        raw = spec["shape"]
        if (
            isinstance(raw, str)
            or not isinstance(raw, Sequence)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in raw)
        ):
            raise FormatError(
                f"{where}: feature {name!r} has shape {raw!r}; expected a list of positive "
                "integers such as [6] or [480, 640, 3]"
            )
        shape = tuple(int(s) for s in raw)
        info = dict(spec.get("info") or {})
        if dtype == "video":
            kind, dtype = ColumnKind.VIDEO, "uint8"
        elif dtype == "image":
            kind, dtype = ColumnKind.IMAGE, "uint8"
        elif dtype == "string":
            kind = ColumnKind.TEXT
        else:
            try:
                numeric = np.dtype(dtype).kind in "biuf"
            except TypeError:
                numeric = False
            if not numeric:
                raise FormatError(
                    f"{where}: feature {name!r} has unknown dtype {dtype!r}; expected video, "
                    "image, string or a numeric dtype such as float32, int64 or bool"
                )
            kind = ColumnKind.NUMERIC
        if kind in (ColumnKind.VIDEO, ColumnKind.IMAGE) and len(shape) != 3:
            raise FormatError(f"{where}: {kind.value} feature {name!r} needs shape [H, W, C]")
        out[name] = Column(
            path=name, kind=kind, dtype=dtype, shape=shape, names=spec.get("names"), info=info
        )
    missing = [k for k in DEFAULT_KEYS if k not in out]
    if missing:
        raise FormatError(f"{where}: features lack LeRobot's default columns {missing}")
    return out


def _read_tasks(storage: Storage) -> list[str]:
    where = storage.url(TASKS)
    try:
        with storage.open_arrow(TASKS) as fh:
            table = pq.read_table(fh, use_threads=storage.is_local)
    except StorageError as exc:
        raise FormatError(f"{where}: missing tasks table ({exc})") from exc
    except (pa.ArrowException, OSError) as exc:
        raise FormatError(f"{where}: unreadable parquet ({exc})") from exc
    meta = table.schema.metadata or {}
    name = None
    if b"pandas" in meta:
        index_cols = json.loads(meta[b"pandas"]).get("index_columns", [])
        name = next((c for c in index_cols if isinstance(c, str)), None)
    if name is None and "task" in table.column_names:
        name = "task"
    if name is None or name not in table.column_names or "task_index" not in table.column_names:
        raise FormatError(
            f"{where}: expected the task strings as a pandas index (or a 'task' column) and a "
            f"'task_index' column; found columns {table.column_names}"
        )
    strings = table.column(name).to_pylist()
    indices = table.column("task_index").to_pylist()
    if sorted(indices) != list(range(len(indices))):
        raise FormatError(f"{where}: task_index values must be 0..{len(indices) - 1} without gaps")
    tasks = [""] * len(indices)
    for i, s in zip(indices, strings, strict=True):
        tasks[i] = str(s)
    return tasks


def _read_episodes(storage: Storage, video_keys: list[str]) -> pa.Table:
    files = storage.glob(EPISODES_GLOB)
    if not files:
        raise FormatError(f"{storage.url('meta/episodes')}: no episode metadata files")
    required = [
        "episode_index",
        "length",
        "dataset_from_index",
        "dataset_to_index",
        "data/chunk_index",
        "data/file_index",
    ]
    for key in video_keys:
        required += [f"videos/{key}/{c}" for c in _VIDEO_COLUMNS]
    parts = []
    for rel in files:
        where = storage.url(rel)
        try:
            with storage.open_arrow(rel) as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                missing = [c for c in required if c not in names]
                if missing:
                    raise FormatError(f"{where}: missing episode columns {missing}")
                wanted = [c for c in names if not c.startswith("stats/")]
                parts.append(pf.read(columns=wanted, use_threads=storage.is_local))
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{where}: unreadable parquet ({exc})") from exc
    table = pa.concat_tables(parts, promote_options="default")
    url = storage.url("meta/episodes")
    for name in required:
        col = table.column(name)
        if col.null_count:
            raise FormatError(f"{url}: column {name!r} has {col.null_count} null values")
        numeric = pa.types.is_floating if name.endswith("_timestamp") else pa.types.is_integer
        if not numeric(col.type):
            kind = "numbers" if name.endswith("_timestamp") else "integers"
            raise FormatError(f"{url}: column {name!r} holds {col.type}, expected {kind}")
    ids = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    if ids.size > 1 and not np.all(np.diff(ids) > 0):
        raise FormatError(
            f"{storage.url('meta/episodes')}: episode_index must increase strictly from row to row"
        )
    start = table.column("dataset_from_index").to_numpy()
    stop = table.column("dataset_to_index").to_numpy()
    length = table.column("length").to_numpy()
    bad = np.flatnonzero((stop - start) != length)
    if bad.size:
        ep = int(ids[bad[0]])
        raise FormatError(
            f"{storage.url('meta/episodes')}: episode {ep}: dataset_to_index - dataset_from_index "
            f"!= length"
        )
    return table


_VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")


def _add_paths(
    table: pa.Table, info: Mapping[str, Any], video_keys: list[str], where: str
) -> pa.Table:
    data_tpl = str(info["data_path"])
    chunks = table.column("data/chunk_index").to_pylist()
    files = table.column("data/file_index").to_pylist()
    data = [
        _fill(data_tpl, "data_path", where, chunk_index=c, file_index=f)
        for c, f in zip(chunks, files, strict=True)
    ]
    table = table.append_column("_data_path", pa.array(data, pa.string()))
    video_tpl = str(info.get("video_path") or "")
    for key in video_keys:
        chunks = table.column(f"videos/{key}/chunk_index").to_pylist()
        files = table.column(f"videos/{key}/file_index").to_pylist()
        paths = [
            _fill(video_tpl, "video_path", where, video_key=key, chunk_index=c, file_index=f)
            for c, f in zip(chunks, files, strict=True)
        ]
        table = table.append_column(f"_video_path/{key}", pa.array(paths, pa.string()))
    return table


def _fill(template: str, key: str, where: str, **values: Any) -> str:
    """A file path from an info.json path template, or a `FormatError` naming the template."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise FormatError(
            f"{where}: {key} {template!r} is not a path template of {sorted(values)} "
            f"(such as {{chunk_index:03d}}): {type(exc).__name__}: {exc}"
        ) from None
