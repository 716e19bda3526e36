"""Views: a dataset restricted to some segments (and frame ranges), chosen from its metadata.

``dataset.segments_table()`` is one row per segment: id, length, duration, tasks, file
locations, every per-segment column the format stores, and columns the user joined with
``with_metadata``. ``filter`` keeps the rows a pyarrow compute expression (or, with DuckDB
installed, an SQL ``WHERE`` clause) accepts; ``select`` keeps listed segments and frame ranges.
Either returns a view: a `Dataset` that shares everything with its parent except the
selection, so it goes wherever a dataset goes (``MapDataset(view)``, ``IterableDataset(view)``).
Views compose, describe themselves, and can be saved under a name as a small JSON file and
reopened by that name from a training configuration.
"""

from __future__ import annotations

import copy
import datetime
import json
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .catalog import TimelineKind
from .errors import ConfigError, FormatError, StorageError
from .index import episode_ids

if TYPE_CHECKING:
    from .catalog import Dataset

__all__ = ["ViewSelection", "open_view", "views_folder"]

VIEW_DIR = "meta/framefeed-views"
"""Where a local dataset keeps its saved views."""
_POSITION = "_position"


class ViewSelection:
    """Which segments of a dataset a view keeps, and optional position ranges inside them."""

    def __init__(
        self,
        positions: np.ndarray,
        ranges: Mapping[int, tuple[int, int]] | None = None,
        steps: tuple[str, ...] = (),
    ) -> None:
        self.positions = np.unique(np.asarray(positions, dtype=np.int64))
        self.ranges: dict[int, tuple[int, int]] = dict(ranges or {})
        """Per segment position: [start, stop) positions (frames, or grid steps) kept."""
        self.steps = steps
        """How the view was made, one line per filter or select."""


def segments_table(dataset: Dataset) -> pa.Table:
    """Per-segment metadata of the whole dataset (internal columns hidden)."""
    table = dataset._table
    keep = [c for c in table.column_names if not c.startswith("_")]
    out = table.select(keep)
    for t in dataset.timelines:  # time ranges as timestamps, so filters can compare dates
        for end in ("start", "end"):
            name = f"{t.name}/{end}"
            if t.kind is TimelineKind.TIME and name in out.column_names:
                where = out.column_names.index(name)
                stamps = out.column(name).cast(pa.timestamp("ns"))
                out = out.set_column(where, name, stamps)
    if "duration_s" not in out.column_names:
        out = out.append_column("duration_s", pa.array(_durations(dataset)))
    for key in dataset.video_keys:
        out = out.append_column(f"videos/{key}/path", pa.array(dataset.video_paths[key].tolist()))
    if not dataset.is_recording:
        out = out.append_column("data/path", pa.array(dataset.data_paths.tolist(), pa.string()))
    return out


def _durations(dataset: Dataset) -> np.ndarray:
    for t in dataset.timelines:
        if t.kind is TimelineKind.TIME and t.name in dataset.ranges:
            start, end = dataset.ranges[t.name]
            seconds: np.ndarray = (end - start) / 1e9
            return seconds
    if dataset.fps > 0:
        return dataset.lengths / dataset.fps
    return np.full(dataset.num_segments, np.nan)


def filter_view(dataset: Dataset, expression: Any = None, sql: str | None = None) -> Dataset:
    """The segments of ``dataset`` (a view already, possibly) whose metadata matches."""
    if (expression is None) == (sql is None):
        raise ConfigError("filter needs exactly one of an expression or sql=")
    table = dataset.segments_table()
    table = table.append_column(_POSITION, pa.array(np.arange(len(table), dtype=np.int64)))
    table = table.take(pa.array(dataset.selected_positions))
    if sql is not None:
        hits = _sql_positions(table, sql, dataset.root)
        step = f"where {sql}"
    else:
        if not isinstance(expression, pc.Expression):
            raise ConfigError(
                "filter expects a pyarrow.compute expression, e.g. "
                "pc.field('length') > 100, or sql='length > 100'"
            )
        try:
            hits = np.asarray(table.filter(expression).column(_POSITION).to_numpy())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ConfigError(
                f"{dataset.root}: cannot evaluate filter {expression} over the segment table "
                f"(columns: {table.column_names[:-1]}): {exc}"
            ) from exc
        step = f"filter {expression}"
    return _with_selection(dataset, hits, None, step)


def _sql_positions(table: pa.Table, sql: str, root: str) -> np.ndarray:
    try:
        import duckdb
    except ImportError:
        raise ImportError(
            "SQL filters need DuckDB: pip install 'framefeed[sql]' (or use a pyarrow.compute "
            "expression: dataset.filter(pc.field('length') > 100))"
        ) from None
    con = duckdb.connect()
    try:
        con.register("segments", table)
        result = con.execute(f"SELECT {_POSITION} FROM segments WHERE {sql}")
        return np.asarray(result.fetchnumpy()[_POSITION], dtype=np.int64)
    except duckdb.Error as exc:
        raise ConfigError(
            f"{root}: SQL filter {sql!r} failed over the segment table (columns: "
            f"{table.column_names[:-1]}): {exc}"
        ) from exc
    finally:
        con.close()


def select_view(
    dataset: Dataset,
    episodes: Iterable[int] | None = None,
    frames: Mapping[int, tuple[int, int]] | None = None,
) -> Dataset:
    """Keep the segments whose ids are listed and, for ids in ``frames``, only the positions
    ``[start, stop)`` (frames for LeRobot, grid steps for recordings) inside them."""
    current = dataset.selected_positions
    if episodes is None:
        chosen = current
    else:
        ids = episode_ids(episodes, "select(episodes=...)").tolist()
        chosen = np.asarray([dataset.position_of(i) for i in ids], dtype=np.int64)
        outside = np.setdiff1d(chosen, current)
        if outside.size:
            bad = dataset.segment_ids[outside][:10].tolist()
            raise ConfigError(f"{dataset.root}: episodes {bad} are not in this view")
    ranges: dict[int, tuple[int, int]] = {}
    if frames is not None and not isinstance(frames, Mapping):
        raise ConfigError(
            f"select(frames=...) maps episode ids to (start, stop), such as {{3: (0, 100)}}, "
            f"not {frames!r}"
        )
    for seg_id, bounds in (frames or {}).items():
        pos = dataset.position_of(int(episode_ids([seg_id], "select(frames=...)")[0]))
        if (
            isinstance(bounds, str | bytes)
            or not isinstance(bounds, Sequence)
            or len(bounds) != 2
            or not all(isinstance(v, numbers.Integral) for v in bounds)
        ):
            raise ConfigError(
                f"episode {seg_id}: a frame range is (start, stop) in whole frames, not {bounds!r}"
            )
        start, stop = (int(v) for v in bounds)
        if not 0 <= start < stop:
            raise ConfigError(
                f"episode {seg_id}: frame range {bounds!r} must satisfy 0 <= start < stop"
            )
        length = int(dataset.lengths[pos])
        if not dataset.is_recording and start >= length:
            raise ConfigError(
                f"{dataset.root}: episode {seg_id} has {length} frames, so frame range "
                f"{tuple(bounds)} holds none of them; start below {length}"
            )
        ranges[pos] = (start, stop)
    parts = []
    if episodes is not None:
        parts.append(f"episodes {sorted(int(e) for e in episodes)[:20]}")
    if frames:
        parts.append(f"frames {dict(sorted((int(k), tuple(v)) for k, v in frames.items()))}")
    return _with_selection(dataset, chosen, ranges, "select " + ", ".join(parts or ["all"]))


def _with_selection(
    dataset: Dataset,
    positions: np.ndarray,
    ranges: Mapping[int, tuple[int, int]] | None,
    step: str,
) -> Dataset:
    old = dataset.selection
    merged = dict(old.ranges) if old is not None else {}
    for pos, (start, stop) in (ranges or {}).items():
        if pos in merged:  # intersect with the parent view's range
            start, stop = max(start, merged[pos][0]), min(stop, merged[pos][1])
            if start >= stop:
                raise ConfigError(
                    f"episode {int(dataset.segment_ids[pos])}: the frame range leaves nothing "
                    "inside the parent view's range"
                )
        merged[pos] = (start, stop)
    view = copy.copy(dataset)
    steps = (old.steps if old is not None else ()) + (step,)
    keep = np.asarray(positions, dtype=np.int64)
    kept = set(keep.tolist())
    view.selection = ViewSelection(keep, {p: r for p, r in merged.items() if p in kept}, steps)
    return view


def describe(dataset: Dataset) -> str:
    """What a view holds, for ``repr`` and ``print``."""
    sel = dataset.selection
    assert sel is not None
    frames = int(dataset.lengths[sel.positions].sum())
    for pos, (start, stop) in sel.ranges.items():
        length = int(dataset.lengths[pos])
        frames -= length - max(0, min(stop, length) - start)
    lines = [
        f"View of {dataset.root} ({dataset.format_name} {dataset.version}): "
        f"{len(sel.positions)} of {dataset.num_segments} segments, {frames} frames"
    ]
    lines += [f"  {s}" for s in sel.steps]
    if sel.ranges:
        lines.append(f"  frame ranges in {len(sel.ranges)} segments")
    return "\n".join(lines)


def views_folder() -> str:
    """The user's folder of saved views (``$FRAMEFEED_VIEWS``, else under the XDG config)."""
    env = os.environ.get("FRAMEFEED_VIEWS")
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "framefeed", "views")


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"a view name is a plain file name (no '/', not hidden), not {name!r}")


def save_view(dataset: Dataset, name: str, folder: str | os.PathLike[str] | None = None) -> str:
    """Write the view as ``<name>.json`` and return its path.

    The default folder is the dataset's ``meta/framefeed-views/`` for a local, writable dataset,
    else `views_folder()`. The file names the dataset, its version, the kept segment ids, the
    frame ranges and how the view was made.
    """
    _check_name(name)
    sel = dataset.selection
    positions = sel.positions if sel is not None else dataset.selected_positions
    record = {
        "framefeed_view": 1,
        "name": name,
        "root": dataset.root,
        "format": dataset.format_name,
        "version": dataset.version,
        "segments": dataset.segment_ids[positions].tolist(),
        "frames": {
            str(int(dataset.segment_ids[p])): list(r)
            for p, r in (sel.ranges.items() if sel is not None else [])
        },
        "steps": list(sel.steps) if sel is not None else [],
        "saved": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if folder is None:
        local = os.path.join(dataset.root, VIEW_DIR)
        can_write = dataset.storage.is_local and os.access(dataset.root, os.W_OK)
        folder = local if can_write else views_folder()
    path = os.path.join(os.fspath(folder), f"{name}.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(record, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(
            f"{path}: cannot save view {name!r} ({exc}); pass a writable folder="
        ) from exc
    return path


def open_view(
    name_or_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    folder: str | os.PathLike[str] | None = None,
    **open_kwargs: Any,
) -> Dataset:
    """Reopen a saved view: a path to its JSON, or a name looked up in ``folder``, the
    dataset's ``meta/framefeed-views/`` (when ``root`` is given) and `views_folder()`.

    ``root`` overrides the dataset location recorded in the file (a dataset moved or mirrored);
    ``open_kwargs`` go to `framefeed.open_dataset` (storage options, cache, ...).
    """
    from .formats import open_dataset

    path = _find_view(os.fspath(name_or_path), root, folder)
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a readable framefeed view ({exc})") from exc
    if not isinstance(record, dict) or record.get("framefeed_view") != 1:
        raise FormatError(f"{path}: not a framefeed view file")
    dataset = open_dataset(os.fspath(root) if root is not None else record["root"], **open_kwargs)
    if str(record.get("version")) != dataset.version:
        raise FormatError(
            f"{path}: saved for {record.get('format')} version {record.get('version')!r} but "
            f"{dataset.root} is version {dataset.version!r}; re-create the view"
        )
    missing = np.setdiff1d(np.asarray(record["segments"], dtype=np.int64), dataset.segment_ids)
    if missing.size:
        raise FormatError(
            f"{path}: episodes {missing[:10].tolist()} of the view are not in {dataset.root}"
        )
    frames = {int(k): (int(v[0]), int(v[1])) for k, v in record.get("frames", {}).items()}
    view = select_view(dataset, record["segments"], frames or None)
    assert view.selection is not None
    view.selection.steps = (f"saved view {record['name']!r}", *record.get("steps", []))
    return view


def _find_view(name: str, root: str | os.PathLike[str] | None, folder: Any) -> str:
    if name.endswith(".json") or os.sep in name:
        if not os.path.exists(name):
            raise FormatError(f"{name}: no such view file")
        return name
    _check_name(name)
    places = []
    if folder is not None:
        places.append(os.fspath(folder))
    if root is not None:
        places.append(os.path.join(os.fspath(root), VIEW_DIR))
    places.append(views_folder())
    for place in places:
        candidate = os.path.join(place, f"{name}.json")
        if os.path.exists(candidate):
            return candidate
    raise FormatError(f"no saved view {name!r}; looked in {places}")
