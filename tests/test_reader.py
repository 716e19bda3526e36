"""The LeRobot v3 reader: `framefeed.open_dataset` builds the catalog from ``meta/`` alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    ACTION_DIM,
    CAMERAS,
    FPS,
    STATE_DIM,
    TASKS,
    TOP,
    WRIST,
    copy_dataset,
    episode_files,
    episodes_table,
    read_info,
    rewrite_episodes,
    write_info,
)

import framefeed
from framefeed import ColumnKind, ConfigError, FormatError, FramefeedError

pytestmark = pytest.mark.timeout(60)


def test_segments_match_episode_metadata(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    eps = episodes_table(rollover_root)
    info = read_info(rollover_root)
    assert ds.format_name == "lerobot"
    assert ds.version == info["codebase_version"] == "v3.0"
    assert ds.fps == float(FPS)
    assert ds.num_segments == info["total_episodes"] == eps.num_rows
    assert ds.num_frames == info["total_frames"]
    assert ds.segment_ids.tolist() == eps.column("episode_index").to_pylist()
    assert ds.lengths.tolist() == eps.column("length").to_pylist()
    assert ds.start_rows.tolist() == eps.column("dataset_from_index").to_pylist()
    assert ds.lengths.dtype == np.int64
    expected_data = [
        info["data_path"].format(chunk_index=c, file_index=f)
        for c, f in zip(
            eps.column("data/chunk_index").to_pylist(),
            eps.column("data/file_index").to_pylist(),
            strict=True,
        )
    ]
    assert ds.data_paths.tolist() == expected_data
    for rel in expected_data:
        assert (rollover_root / rel).is_file()


def test_video_paths_and_timestamps_match_metadata(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    eps = episodes_table(rollover_root)
    info = read_info(rollover_root)
    assert ds.video_keys == list(CAMERAS)
    for key in CAMERAS:
        expected = [
            info["video_path"].format(video_key=key, chunk_index=c, file_index=f)
            for c, f in zip(
                eps.column(f"videos/{key}/chunk_index").to_pylist(),
                eps.column(f"videos/{key}/file_index").to_pylist(),
                strict=True,
            )
        ]
        assert ds.video_paths[key].tolist() == expected
        for rel in expected:
            assert (rollover_root / rel).is_file()
        frm = eps.column(f"videos/{key}/from_timestamp").to_numpy()
        to = eps.column(f"videos/{key}/to_timestamp").to_numpy()
        np.testing.assert_array_equal(ds.video_from[key], frm)
        np.testing.assert_array_equal(ds.video_to[key], to)
        assert ds.video_from[key].dtype == np.float64


def test_segment_view(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    eps = episodes_table(rollover_root).to_pylist()
    for pos, row in enumerate(eps):
        seg = ds.segment(pos)
        assert seg.position == pos
        assert seg.id == row["episode_index"]
        assert seg.length == row["length"]
        assert seg.start_row == row["dataset_from_index"]
        assert seg.tasks == tuple(row["tasks"])
        assert seg.tasks == (TASKS[row["episode_index"] % len(TASKS)],)
        assert seg.data_path == ds.data_paths[pos]
        assert set(seg.videos) == set(CAMERAS)
        for key in CAMERAS:
            span = seg.videos[key]
            assert span.path == ds.video_paths[key][pos]
            assert span.from_timestamp == row[f"videos/{key}/from_timestamp"]
            assert span.to_timestamp == row[f"videos/{key}/to_timestamp"]
            assert span.to_timestamp > span.from_timestamp
        assert not any(k.startswith("stats/") for k in seg.meta)
    with pytest.raises(IndexError):
        ds.segment(ds.num_segments)
    with pytest.raises(IndexError):
        ds.segment(-1)


def test_columns_kinds_dtypes_shapes(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    info = read_info(rollover_root)
    assert list(ds.columns) == list(info["features"])
    expected = {
        TOP: (ColumnKind.VIDEO, "uint8", (48, 64, 3)),
        WRIST: (ColumnKind.VIDEO, "uint8", (32, 48, 3)),
        "observation.state": (ColumnKind.NUMERIC, "float32", (STATE_DIM,)),
        "action": (ColumnKind.NUMERIC, "float32", (ACTION_DIM,)),
        "next.reward": (ColumnKind.NUMERIC, "float32", (1,)),
        "next.done": (ColumnKind.NUMERIC, "bool", (1,)),
        "timestamp": (ColumnKind.NUMERIC, "float32", (1,)),
        "frame_index": (ColumnKind.NUMERIC, "int64", (1,)),
        "episode_index": (ColumnKind.NUMERIC, "int64", (1,)),
        "index": (ColumnKind.NUMERIC, "int64", (1,)),
        "task_index": (ColumnKind.NUMERIC, "int64", (1,)),
    }
    assert set(ds.columns) == set(expected)
    for path, (kind, dtype, shape) in expected.items():
        col = ds.column(path)
        assert col.path == path
        assert (col.kind, col.dtype, col.shape) == (kind, dtype, shape), path
    assert ds.column(TOP).info["video.codec"] == info["features"][TOP]["info"]["video.codec"]
    assert ds.image_keys == []


def test_tasks_follow_task_index(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    table = pq.read_table(rollover_root / "meta" / "tasks.parquet")
    pandas_meta = json.loads(table.schema.metadata[b"pandas"])
    name = pandas_meta["index_columns"][0]
    by_index = dict(
        zip(table.column("task_index").to_pylist(), table.column(name).to_pylist(), strict=True)
    )
    assert ds.tasks == tuple(by_index[i] for i in range(len(by_index)))
    assert set(ds.tasks) == set(TASKS)


def test_unknown_column_and_episode(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    with pytest.raises(ConfigError, match="no_such_column"):
        ds.column("no_such_column")
    assert ds.position_of(int(ds.segment_ids[-1])) == ds.num_segments - 1
    with pytest.raises(ConfigError, match="12345"):
        ds.position_of(12345)


def test_open_dataset_passes_datasets_through(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    assert framefeed.open_dataset(ds) is ds
    assert framefeed.open_dataset(str(rollover_root)).num_frames == ds.num_frames
    assert str(ds.num_frames) in repr(ds)


# --- metadata only: proves that opening reads no data or video file -------------------------------


def _write_meta_only(root: Path, num_episodes: int, *, files: int = 2) -> list[int]:
    """A LeRobot v3 ``meta/`` for ``num_episodes`` episodes; no data/ or videos/ at all."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 50, size=num_episodes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    info = {
        "codebase_version": "v3.0",
        "robot_type": None,
        "total_episodes": num_episodes,
        "total_frames": int(lengths.sum()),
        "total_tasks": 2,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": FPS,
        "splits": {"train": f"0:{num_episodes}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            TOP: {
                "dtype": "video",
                "shape": [48, 64, 3],
                "names": ["height", "width", "channels"],
                "info": {"video.codec": "av1", "video.fps": FPS},
            },
            "observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    pandas_meta = {"index_columns": ["__index_level_0__"], "columns": []}
    tasks = pa.table(
        {"task_index": pa.array([0, 1], pa.int64()), "__index_level_0__": list(TASKS)}
    ).replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(tasks, root / "meta" / "tasks.parquet")
    ids = np.arange(num_episodes, dtype=np.int64)
    data_file = ids // 500
    video_file = ids // 300
    per_file = -(-num_episodes // files)
    for f in range(files):
        sl = slice(f * per_file, (f + 1) * per_file)
        table = pa.table(
            {
                "episode_index": ids[sl],
                "tasks": [[TASKS[i % 2]] for i in ids[sl].tolist()],
                "length": lengths[sl],
                "data/chunk_index": np.zeros_like(ids[sl]),
                "data/file_index": data_file[sl],
                "dataset_from_index": starts[sl],
                "dataset_to_index": starts[sl] + lengths[sl],
                f"videos/{TOP}/chunk_index": np.zeros_like(ids[sl]),
                f"videos/{TOP}/file_index": video_file[sl],
                f"videos/{TOP}/from_timestamp": np.zeros(len(ids[sl]), dtype=np.float64),
                f"videos/{TOP}/to_timestamp": lengths[sl] / FPS,
                "stats/observation.state/mean": [[0.0] * STATE_DIM] * len(ids[sl]),
            }
        )
        out = root / "meta" / "episodes" / "chunk-000" / f"file-{f:03d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    return lengths.tolist()


def test_ten_thousand_episodes_open_without_data_files(tmp_path: Path) -> None:
    lengths = _write_meta_only(tmp_path, 10_000)
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "videos").exists()
    ds = framefeed.open_dataset(tmp_path)
    assert ds.num_segments == 10_000
    assert ds.num_frames == sum(lengths)
    assert ds.lengths.tolist() == lengths
    assert ds.segment_ids.tolist() == list(range(10_000))
    assert ds.data_paths[9_999] == "data/chunk-000/file-019.parquet"
    assert ds.video_paths[TOP][9_999] == f"videos/{TOP}/chunk-000/file-033.mp4"
    assert ds.segment(9_999).tasks == (TASKS[1],)
    # Building the map dataset (index, fields, windows) must not read data either.
    mds = framefeed.MapDataset(
        tmp_path, delta_timestamps={"observation.state": [-1 / FPS, 0.0]}, episodes=[9_999, 3]
    )
    assert len(mds) == lengths[3] + lengths[9_999]
    assert len(framefeed.MapDataset(tmp_path)) == sum(lengths)


# --- bad metadata ---------------------------------------------------------------------------------


def test_v21_dataset_is_rejected_with_converter_hint(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    info["codebase_version"] = "v2.1"
    write_info(root, info)
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    msg = str(err.value)
    assert "v2.1" in msg
    assert "convert_dataset_v21_to_v30" in msg
    assert "info.json" in msg


@pytest.mark.parametrize("key", ["fps", "features", "data_path"])
def test_missing_info_key(tmp_path: Path, plain_root: Path, key: str) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    del info[key]
    write_info(root, info)
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    assert str(root / "meta" / "info.json") in str(err.value)
    assert key in str(err.value)


def test_missing_codebase_version(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    del info["codebase_version"]
    write_info(root, info)
    with pytest.raises(FormatError, match="codebase_version"):
        framefeed.open_dataset(root)


def test_newer_major_version_is_rejected(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    info["codebase_version"] = "v4.0"
    write_info(root, info)
    with pytest.raises(FormatError, match=r"v4\.0"):
        framefeed.open_dataset(root)


def test_invalid_info_json(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    (root / "meta" / "info.json").write_text("{not json")
    with pytest.raises(FramefeedError, match=r"info\.json"):
        framefeed.open_dataset(root)


@pytest.mark.parametrize(
    "column", ["dataset_from_index", "length", "data/file_index", f"videos/{WRIST}/from_timestamp"]
)
def test_missing_episodes_column(tmp_path: Path, plain_root: Path, column: str) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    path = episode_files(root)[0]
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    assert str(path) in str(err.value)
    assert column in str(err.value)


def test_no_episode_files(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    for path in episode_files(root):
        path.unlink()
    with pytest.raises(FormatError, match="episode"):
        framefeed.open_dataset(root)


def test_missing_tasks_file(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    (root / "meta" / "tasks.parquet").unlink()
    with pytest.raises(FormatError, match=r"tasks\.parquet"):
        framefeed.open_dataset(root)


def test_total_frames_mismatch(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    info["total_frames"] += 1
    write_info(root, info)
    with pytest.raises(FormatError, match="total_frames"):
        framefeed.open_dataset(root)


def test_inconsistent_episode_range(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)

    def grow(cols: dict[str, list[int]]) -> None:
        cols["dataset_to_index"][1] += 1

    rewrite_episodes(root, grow)
    with pytest.raises(FormatError, match="episode 1"):
        framefeed.open_dataset(root)


def test_unknown_feature_dtype(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    info["features"]["observation.state"]["dtype"] = "quaternion64"
    write_info(root, info)
    with pytest.raises(FormatError, match=r"observation\.state"):
        framefeed.open_dataset(root)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_dataset(tmp_path: Path, make: str) -> None:
    root = tmp_path / "nothing"
    if make == "empty":
        root.mkdir()
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    assert str(root) in str(err.value)
