"""Bad input fails with a framefeed error that names the file (and episode, column, camera)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FPS, TOP, WRIST, copy_dataset, read_info, rewrite_episodes, write_info

import framefeed
from framefeed import FormatError, FramefeedError, FrameTimestampError, MapDataset
from framefeed.synth import read_marker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broken(tmp_path: Path, rollover_root: Path) -> Path:
    """A private copy of the rollover dataset, free to corrupt."""
    return copy_dataset(rollover_root, tmp_path / "ds")


def _first_sample_in(root: Path, key: str, rel: str) -> tuple[int, int]:
    """(global sample, episode id) of the first sample whose ``key`` file is ``rel``."""
    ds = framefeed.open_dataset(root)
    paths = ds.data_paths if key == "data" else ds.video_paths[key]
    pos = int(np.flatnonzero(paths == rel)[0])
    return int(ds.start_rows[pos]), int(ds.segment_ids[pos])


def _last_sample_in(root: Path, key: str, rel: str) -> tuple[int, int]:
    ds = framefeed.open_dataset(root)
    pos = int(np.flatnonzero(ds.video_paths[key] == rel)[-1])
    return int(ds.start_rows[pos] + ds.lengths[pos] - 1), int(ds.segment_ids[pos])


def _video(key: str, file_no: int) -> str:
    return f"videos/{key}/chunk-000/file-{file_no:03d}.mp4"


def _error_of(root: Path, index: int, **kwargs: Any) -> FramefeedError:
    with MapDataset(root, **kwargs) as ds, pytest.raises(FramefeedError) as err:
        ds[index]
    return err.value


def _assert_names_sample(err: Exception, path: Path, episode: int, camera: str) -> None:
    msg = str(err)
    assert str(path) in msg
    assert f"episode {episode}" in msg
    assert camera in msg


def test_missing_video_file(broken: Path) -> None:
    rel = _video(WRIST, 1)
    (broken / rel).unlink()
    sample, episode = _first_sample_in(broken, WRIST, rel)
    err = _error_of(broken, sample)
    _assert_names_sample(err, broken / rel, episode, WRIST)
    with MapDataset(broken) as ds:  # samples of other files still load
        ok = ds[0]
        assert read_marker(ok[WRIST].numpy()) == (0, 0)


def test_video_path_that_is_a_folder(broken: Path) -> None:
    rel = _video(WRIST, 1)
    (broken / rel).unlink()
    (broken / rel).mkdir()
    sample, episode = _first_sample_in(broken, WRIST, rel)
    err = _error_of(broken, sample)
    _assert_names_sample(err, broken / rel, episode, WRIST)
    assert "not a regular file" in str(err)


def test_video_size_that_differs_from_the_metadata(broken: Path) -> None:
    info = read_info(broken)
    real = info["features"][WRIST]["shape"]
    info["features"][WRIST]["shape"] = [real[0] + 8, real[1] + 8, 3]
    write_info(broken, info)
    err = _error_of(broken, 0)
    assert isinstance(err, FormatError)
    msg = str(err)
    assert f"the video is {real[0]}x{real[1]} pixels" in msg
    assert f"declares {real[0] + 8}x{real[1] + 8}" in msg and "meta/info.json" in msg
    assert WRIST in msg and "episode" in msg
    # asking for a size is a resize, not an error
    fields = [framefeed.Field(WRIST, decode=framefeed.VideoFrameDecoder(size=(16, 16)))]
    with MapDataset(broken, fields=fields) as ds:
        assert ds[0][WRIST].shape == (3, 16, 16)


def test_roots_that_are_not_paths_or_known_urls() -> None:
    from framefeed.errors import ConfigError

    with pytest.raises(ConfigError, match="folder path or an fsspec URL, got int 123"):
        MapDataset(123)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no filesystem for this URL"):
        framefeed.open_dataset("nope://bucket/ds")


def test_truncated_video_file(broken: Path) -> None:
    rel = _video(TOP, 0)
    path = broken / rel
    os.truncate(path, path.stat().st_size // 2)
    sample, episode = _last_sample_in(broken, TOP, rel)
    err = _error_of(broken, sample)
    _assert_names_sample(err, path, episode, TOP)
    assert isinstance(err, framefeed.DecodeError)
    # The file is damaged: that is not a timestamp/tolerance problem of the request.
    assert not isinstance(err, FrameTimestampError), str(err)


def test_truncated_video_file_first_half_still_decodes(broken: Path) -> None:
    rel = _video(TOP, 0)
    path = broken / rel
    os.truncate(path, path.stat().st_size // 2)
    with MapDataset(broken) as ds:
        s = ds[0]
        assert read_marker(s[TOP].numpy()) == (0, 0)


def test_garbage_video_file(broken: Path) -> None:
    rel = _video(TOP, 1)
    path = broken / rel
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    sample, episode = _first_sample_in(broken, TOP, rel)
    err = _error_of(broken, sample)
    assert isinstance(err, framefeed.DecodeError)
    _assert_names_sample(err, path, episode, TOP)


@pytest.mark.parametrize("where", ["footer", "pages"])
def test_corrupt_data_parquet(broken: Path, where: str) -> None:
    rel = "data/chunk-000/file-000.parquet"
    path = broken / rel
    data = bytearray(path.read_bytes())
    if where == "footer":
        data[-64:] = b"\xab" * 64
    else:
        data[4 : len(data) // 2] = b"\xff" * (len(data) // 2 - 4)
    path.write_bytes(bytes(data))
    err = _error_of(broken, 0)
    assert isinstance(err, FormatError)
    assert str(path) in str(err)


def test_missing_data_file(broken: Path) -> None:
    rel = "data/chunk-000/file-001.parquet"
    (broken / rel).unlink()
    sample, _ = _first_sample_in(broken, "data", rel)
    err = _error_of(broken, sample)
    assert str(broken / rel) in str(err)


def test_feature_missing_from_parquet(broken: Path) -> None:
    info = read_info(broken)
    features = {"observation.extra": {"dtype": "float32", "shape": [3], "names": None}}
    features.update(info["features"])
    info["features"] = features
    write_info(broken, info)
    framefeed.open_dataset(broken)  # metadata alone is consistent
    err = _error_of(broken, 0)
    assert isinstance(err, FormatError)
    assert "observation.extra" in str(err)
    assert str(broken / "data" / "chunk-000" / "file-000.parquet") in str(err)


def test_data_file_does_not_match_metadata(broken: Path) -> None:
    def point_elsewhere(cols: dict[str, list[Any]]) -> None:
        cols["data/file_index"][0] = 1

    rewrite_episodes(broken, point_elsewhere)
    err = _error_of(broken, 0)
    assert isinstance(err, FormatError)
    assert "file-001.parquet" in str(err)


def _shift_video(root: Path, key: str, episode: int, seconds: float) -> None:
    def shift(cols: dict[str, list[Any]]) -> None:
        row = cols["episode_index"].index(episode)
        cols[f"videos/{key}/from_timestamp"][row] += seconds
        cols[f"videos/{key}/to_timestamp"][row] += seconds

    rewrite_episodes(root, shift)


def test_timestamp_beyond_the_video(broken: Path) -> None:
    ds = framefeed.open_dataset(broken)
    pos = 3
    episode = int(ds.segment_ids[pos])
    rel = str(ds.video_paths[TOP][pos])
    _shift_video(broken, TOP, episode, 1000.0)
    err = _error_of(broken, int(ds.start_rows[pos]) + 2)
    assert isinstance(err, FrameTimestampError)
    msg = str(err)
    assert str(broken / rel) in msg
    assert f"episode {episode}" in msg
    assert TOP in msg
    assert "frame 2" in msg
    with MapDataset(broken) as mds:  # the other camera and the other episodes are fine
        s = mds[int(ds.start_rows[pos - 1])]
        assert read_marker(s[TOP].numpy()) == (int(ds.segment_ids[pos - 1]), 0)


@pytest.mark.parametrize("shift_frames", [0.4, -0.4])
def test_tolerance_violation(broken: Path, shift_frames: float) -> None:
    ds = framefeed.open_dataset(broken)
    pos = 1
    episode = int(ds.segment_ids[pos])
    _shift_video(broken, WRIST, episode, shift_frames / FPS)
    sample = int(ds.start_rows[pos]) + 5
    err = _error_of(broken, sample)
    assert isinstance(err, FrameTimestampError)
    assert f"episode {episode}" in str(err)
    assert WRIST in str(err)
    assert str(broken / str(ds.video_paths[WRIST][pos])) in str(err)
    # A looser tolerance accepts the nearest frame, which is the right one.
    with MapDataset(broken, tolerance_s=0.5 / FPS) as loose:
        assert read_marker(loose[sample][WRIST].numpy()) == (episode, 5)


def test_error_in_a_batch_names_the_failing_sample(broken: Path) -> None:
    ds = framefeed.open_dataset(broken)
    pos = 2
    episode = int(ds.segment_ids[pos])
    _shift_video(broken, TOP, episode, 0.5 / FPS)
    bad = int(ds.start_rows[pos]) + 1
    with MapDataset(broken) as mds, pytest.raises(FrameTimestampError) as err:
        mds.__getitems__([0, 1, bad, 2])
    assert f"episode {episode}" in str(err.value)
    assert "frame 1" in str(err.value)


def test_missing_info_file_is_not_a_dataset(broken: Path) -> None:
    (broken / "meta" / "info.json").unlink()
    with pytest.raises(FormatError, match=r"info\.json"):
        MapDataset(broken)


def test_video_feature_without_video_path(broken: Path) -> None:
    info = read_info(broken)
    info["video_path"] = None
    write_info(broken, info)
    with pytest.raises(FormatError, match="video_path"):
        framefeed.open_dataset(broken)


def test_local_parquet_goes_to_arrow_as_its_own_file(plain_root: Path) -> None:
    # Arrow decodes on its threads only what it read itself: buffers read from a Python file
    # object and released by those threads at interpreter exit abort the process
    # (apache/arrow#49942).
    import pyarrow as pa

    from framefeed.errors import StorageError
    from framefeed.storage import Storage

    storage = Storage(str(plain_root))
    with storage.open_arrow("meta/tasks.parquet") as fh:
        assert isinstance(fh, pa.NativeFile)
    with pytest.raises(StorageError, match=r"nothing\.parquet: file not found"):
        storage.open_arrow("meta/nothing.parquet")


def test_task_index_without_a_task(broken: Path) -> None:
    """A data row whose task_index the tasks table lacks is an error, not a ``None`` task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"task_index": [0], "task": ["only the first task"]}),
        broken / "meta" / "tasks.parquet",
    )
    ds = framefeed.open_dataset(broken)
    pos = 1  # synthetic episode e has task_index e % 2
    episode = int(ds.segment_ids[pos])
    err = _error_of(broken, int(ds.start_rows[pos]) + 3)
    assert isinstance(err, FormatError)
    msg = str(err)
    assert f"episode {episode}, frame 3" in msg
    assert "task_index 1" in msg
    assert "meta/tasks.parquet" in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda i: i.__setitem__("fps", "abc"), "fps must be a number"),
        (lambda i: i.__setitem__("fps", None), "fps must be a number"),
        (lambda i: i.__setitem__("fps", "nan"), "fps must be a positive number"),
        (lambda i: i.__setitem__("total_frames", "x"), "total_frames must be a number"),
        (lambda i: i["features"]["action"].__setitem__("shape", "x"), "feature 'action' has shape"),
        (
            lambda i: i["features"]["action"].__setitem__("shape", None),
            "feature 'action' has shape",
        ),
        (
            lambda i: i["features"]["action"].__setitem__("shape", [-1]),
            "feature 'action' has shape",
        ),
        (
            lambda i: i["features"]["action"].__setitem__("dtype", "object"),
            "unknown dtype 'object'",
        ),
        (lambda i: i.__setitem__("data_path", "data/{nope}.parquet"), "data_path 'data/{nope}"),
        (lambda i: i.__setitem__("data_path", "data/{chunk_index:q}"), "data_path 'data/{chunk"),
        (lambda i: i.__setitem__("video_path", "videos/{chunk_index"), "video_path 'videos/{chunk"),
    ],
)
def test_malformed_info_json(
    tmp_path: Path, rollover_root: Path, change: Any, expected: str
) -> None:
    """Wrong types and templates in info.json are FormatErrors naming the key, not raw
    ValueError/TypeError/KeyError from parsing them."""
    root = copy_dataset(rollover_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    change(info)
    write_info(root, info)
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    assert expected in str(err.value)
    assert str(root / "meta" / "info.json") in str(err.value)


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("data/file_index", None, "'data/file_index' has 1 null values"),
        ("episode_index", None, "'episode_index' has 1 null values"),
        ("length", "12", "'length' holds string, expected integers"),
    ],
)
def test_malformed_episodes_table(
    tmp_path: Path, rollover_root: Path, column: str, values: Any, expected: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = copy_dataset(rollover_root, tmp_path / "ds", meta_only=True)
    path = sorted((root / "meta" / "episodes").glob("*/*.parquet"))[0]
    table = pq.read_table(path)
    col = table.column(column).to_pylist()
    col[0] = values
    typ = pa.string() if isinstance(values, str) else table.schema.field(column).type
    if isinstance(values, str):
        col = [str(v) for v in col]
    table = table.set_column(table.column_names.index(column), column, pa.array(col, typ))
    pq.write_table(table, path)
    with pytest.raises(FormatError) as err:
        framefeed.open_dataset(root)
    assert expected in str(err.value)
    assert str(root / "meta" / "episodes") in str(err.value)


def test_empty_tasks_table(tmp_path: Path, rollover_root: Path) -> None:
    import pyarrow.parquet as pq

    root = copy_dataset(rollover_root, tmp_path / "ds", meta_only=True)
    path = root / "meta" / "tasks.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(FormatError, match="the tasks table is empty") as err:
        framefeed.open_dataset(root)
    assert str(path) in str(err.value)


def test_bad_numeric_column_names_its_data_file(broken: Path) -> None:
    info = read_info(broken)
    info["features"]["action"]["shape"] = [7]
    write_info(broken, info)
    err = _error_of(broken, 0)
    assert isinstance(err, FormatError)
    msg = str(err)
    assert str(broken / "data" / "chunk-000" / "file-000.parquet") in msg
    assert "'action'" in msg
    assert "declared shape [7]" in msg
