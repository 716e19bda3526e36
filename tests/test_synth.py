"""Tests of the synthetic LeRobot v3 writer, checked with pyarrow and PyAV directly."""

from __future__ import annotations

import io
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from framefeed.errors import ConfigError, DecodeError
from framefeed.synth import (
    CameraSpec,
    SynthConfig,
    draw_frame,
    episode_lengths,
    read_marker,
    write_lerobot_dataset,
)
from framefeed.synth.stats import QUANTILES, STAT_NAMES, ImageStats

pytestmark = pytest.mark.timeout(120)

DEFAULT_NAMES = ["timestamp", "frame_index", "episode_index", "index", "task_index"]
INFO_KEYS = [
    "codebase_version",
    "robot_type",
    "total_episodes",
    "total_frames",
    "total_tasks",
    "chunks_size",
    "data_files_size_in_mb",
    "video_files_size_in_mb",
    "fps",
    "splits",
    "data_path",
    "video_path",
    "features",
]

SMALL = SynthConfig(image_keys=("observation.images.side",))
ROLLOVER = SynthConfig(
    num_episodes=12,
    min_length=8,
    max_length=16,
    cameras=(
        CameraSpec(key="observation.images.top", height=64, width=96),
        CameraSpec(key="observation.images.wrist", height=32, width=48),
    ),
    texture=True,
    data_files_size_in_mb=0.004,
    video_files_size_in_mb=0.012,
    chunks_size=3,
    seed=7,
)


def _marker_config(texture: bool) -> SynthConfig:
    return SynthConfig(
        num_episodes=3,
        min_length=5,
        max_length=11,
        cameras=(
            CameraSpec(key="observation.images.av1", height=48, width=64, codec="av1"),
            CameraSpec(key="observation.images.h264", height=32, width=48, codec="h264"),
            CameraSpec(
                key="observation.images.bframes", height=48, width=64, codec="h264", bframes=2
            ),
        ),
        texture=texture,
        video_files_size_in_mb=0.004,
        seed=3,
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lerobot_dataset(tmp_path_factory.mktemp("small") / "ds", SMALL, progress=False)


@pytest.fixture(scope="module")
def rollover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lerobot_dataset(tmp_path_factory.mktemp("roll") / "ds", ROLLOVER, progress=False)


@pytest.fixture(scope="module", params=[False, True], ids=["flat", "texture"])
def marked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = _marker_config(request.param)
    return write_lerobot_dataset(tmp_path_factory.mktemp("marked") / "ds", config, progress=False)


def _info(root: Path) -> dict[str, Any]:
    with open(root / "meta" / "info.json", encoding="utf-8") as f:
        info: dict[str, Any] = json.load(f)
    return info


def _episodes(root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def _data_files(root: Path) -> list[Path]:
    return sorted(root.glob("data/*/*.parquet"))


def _video_path(root: Path, key: str, episode: dict[str, Any]) -> Path:
    relative = _info(root)["video_path"].format(
        video_key=key,
        chunk_index=episode[f"videos/{key}/chunk_index"],
        file_index=episode[f"videos/{key}/file_index"],
    )
    return root / str(relative)


def _camera_keys(root: Path) -> list[str]:
    return [k for k, f in _info(root)["features"].items() if f["dtype"] == "video"]


# ---------------------------------------------------------------------------------- info.json


def test_info_json(small: Path) -> None:
    info = _info(small)
    assert list(info) == INFO_KEYS
    lengths = episode_lengths(SMALL)
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "synthetic"
    assert info["total_episodes"] == 4
    assert info["total_frames"] == sum(lengths)
    assert info["total_tasks"] == 2
    assert info["splits"] == {"train": "0:4"}
    assert info["fps"] == 30 and isinstance(info["fps"], int)
    assert info["data_files_size_in_mb"] == 100 and isinstance(info["data_files_size_in_mb"], int)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == (
        "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    )
    features = info["features"]
    assert list(features) == [
        "observation.images.top",
        "observation.images.wrist",
        "observation.images.side",
        "observation.state",
        "action",
        "next.reward",
        "next.done",
        *DEFAULT_NAMES,
    ]
    top = features["observation.images.top"]
    assert top["dtype"] == "video"
    assert top["shape"] == [48, 64, 3]
    assert top["names"] == ["height", "width", "channels"]
    assert top["info"] == {
        "video.height": 48,
        "video.width": 64,
        "video.codec": "av1",
        "video.pix_fmt": "yuv420p",
        "video.is_depth_map": False,
        "video.fps": 30,
        "video.channels": 3,
        "has_audio": False,
    }
    assert features["observation.images.wrist"]["shape"] == [32, 48, 3]
    assert features["observation.images.side"] == {
        "dtype": "image",
        "shape": [48, 64, 3],
        "names": ["height", "width", "channels"],
    }
    assert features["observation.state"]["dtype"] == "float32"
    assert features["observation.state"]["shape"] == [6]
    assert len(features["observation.state"]["names"]) == 6
    assert features["next.done"] == {"dtype": "bool", "shape": [1], "names": None}
    dtypes = ["float32", "int64", "int64", "int64", "int64"]
    for name, dtype in zip(DEFAULT_NAMES, dtypes, strict=True):
        assert features[name] == {"dtype": dtype, "shape": [1], "names": None}


def test_no_cameras_gives_null_video_path(tmp_path: Path) -> None:
    config = SynthConfig(num_episodes=2, cameras=())
    root = write_lerobot_dataset(tmp_path / "ds", config, progress=False)
    info = _info(root)
    assert info["video_path"] is None
    assert not (root / "videos").exists()
    assert "videos/" not in " ".join(pq.read_schema(next(iter(_data_files(root)))).names)


# ------------------------------------------------------------------------------- data parquet


def test_data_schema_and_row_groups(small: Path) -> None:
    files = _data_files(small)
    assert [f.relative_to(small).as_posix() for f in files] == ["data/chunk-000/file-000.parquet"]
    parquet = pq.ParquetFile(files[0])
    schema = parquet.schema_arrow
    assert schema.names == [
        "observation.images.side",
        "observation.state",
        "action",
        "next.reward",
        "next.done",
        *DEFAULT_NAMES,
    ]
    assert str(schema.field("observation.state").type) == "fixed_size_list<element: float>[6]"
    assert str(schema.field("next.reward").type) == "float"
    assert str(schema.field("next.done").type) == "bool"
    assert str(schema.field("timestamp").type) == "float"
    assert str(schema.field("index").type) == "int64"
    assert str(schema.field("observation.images.side").type) == (
        "struct<bytes: binary, path: string>"
    )
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["observation.state"] == {
        "feature": {"dtype": "float32", "_type": "Value"},
        "length": 6,
        "_type": "List",
    }
    assert hf["next.done"] == {"dtype": "bool", "_type": "Value"}
    assert hf["observation.images.side"] == {"_type": "Image"}
    assert list(hf) == schema.names
    lengths = episode_lengths(SMALL)
    meta = parquet.metadata
    assert meta.num_row_groups == len(lengths)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == list(lengths)
    assert meta.row_group(0).column(1).compression == "SNAPPY"


def _check_rows(root: Path, config: SynthConfig) -> None:
    lengths = episode_lengths(config)
    episodes = _episodes(root)
    index = 0
    for path in _data_files(root):
        table = pq.read_table(path)
        state = np.asarray(table["observation.state"].to_pylist(), dtype=np.float32)
        action = np.asarray(table["action"].to_pylist(), dtype=np.float32)
        cols = {name: table[name].to_numpy() for name in DEFAULT_NAMES}
        reward = table["next.reward"].to_numpy()
        done = table["next.done"].to_numpy(zero_copy_only=False)
        for row in range(table.num_rows):
            e = int(cols["episode_index"][row])
            i = int(cols["frame_index"][row])
            assert cols["index"][row] == index
            assert episodes[e]["dataset_from_index"] + i == index
            base = e * 1000 + i
            j_state = np.arange(config.state_dim, dtype=np.float32) / 8
            j_action = np.arange(config.action_dim, dtype=np.float32) / 8
            assert np.array_equal(state[row], np.float32(base) + j_state)
            assert np.array_equal(action[row], -np.float32(base) - j_action)
            assert reward[row] == np.float32(i / 4)
            assert bool(done[row]) == (i == lengths[e] - 1)
            assert cols["timestamp"][row] == np.float32(i / config.fps)
            assert cols["task_index"][row] == e % len(config.tasks)
            index += 1
    assert index == sum(lengths)


def test_data_values(small: Path) -> None:
    _check_rows(small, SMALL)


def test_data_values_across_rolled_files(rollover: Path) -> None:
    _check_rows(rollover, ROLLOVER)


def test_png_images_round_trip(small: Path) -> None:
    table = pq.read_table(_data_files(small)[0])
    column = table["observation.images.side"].to_pylist()
    episodes = table["episode_index"].to_pylist()
    frames = table["frame_index"].to_pylist()
    for row in (0, 5, len(column) - 1):
        png = column[row]["bytes"]
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with av.open(io.BytesIO(png), "r") as container:
            image = next(container.decode(video=0)).to_ndarray(format="rgb24")
        expected = draw_frame(episodes[row], frames[row], 2, 48, 64, texture=False, seed=0)
        assert np.array_equal(image, expected)
        assert read_marker(image) == (episodes[row], frames[row])


# --------------------------------------------------------------------------- episodes parquet


def test_episodes_table(small: Path) -> None:
    path = small / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    schema = pq.read_schema(path)
    cameras = ["observation.images.top", "observation.images.wrist"]
    expected = [
        "episode_index",
        "tasks",
        "length",
        "data/chunk_index",
        "data/file_index",
        "dataset_from_index",
        "dataset_to_index",
    ]
    for key in cameras:
        expected += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index")]
        expected += [f"videos/{key}/{c}" for c in ("from_timestamp", "to_timestamp")]
    for name in _info(small)["features"]:
        expected += [f"stats/{name}/{s}" for s in STAT_NAMES]
    expected += ["meta/episodes/chunk_index", "meta/episodes/file_index"]
    assert schema.names == expected
    assert str(schema.field("tasks").type) == "list<element: string>"
    assert str(schema.field(f"videos/{cameras[0]}/from_timestamp").type) == "double"
    assert str(schema.field("stats/index/min").type) == "list<element: int64>"
    assert str(schema.field("stats/index/mean").type) == "list<element: double>"
    assert str(schema.field("stats/action/count").type) == "list<element: int64>"
    rows = _episodes(small)
    lengths = episode_lengths(SMALL)
    start = 0
    for e, row in enumerate(rows):
        assert row["episode_index"] == e
        assert row["tasks"] == [SMALL.tasks[e % 2]]
        assert row["length"] == lengths[e]
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (start, start + lengths[e])
        assert row["stats/frame_index/min"] == [0]
        assert row["stats/frame_index/max"] == [lengths[e] - 1]
        assert row["stats/observation.state/mean"][0] == pytest.approx(
            e * 1000 + (lengths[e] - 1) / 2
        )
        top_mean = np.asarray(row["stats/observation.images.top/mean"])
        assert top_mean.shape == (3, 1, 1) and 0 < top_mean.min() <= top_mean.max() < 1
        assert row["meta/episodes/chunk_index"] == 0 and row["meta/episodes/file_index"] == 0
        start += lengths[e]


def test_camera_stats_match_drawn_frames(small: Path) -> None:
    row = _episodes(small)[1]
    frames = np.stack(
        [draw_frame(1, i, 0, 48, 64, texture=False, seed=0) for i in range(row["length"])]
    ).astype(np.float64)
    pixels = frames.reshape(-1, 3)
    key = "observation.images.top"
    assert row[f"stats/{key}/count"] == [row["length"]]
    for stat, expected in (
        ("mean", pixels.mean(axis=0)),
        ("std", pixels.std(axis=0)),
        ("min", pixels.min(axis=0)),
        ("q10", np.quantile(pixels, 0.10, axis=0)),
        ("q50", np.quantile(pixels, 0.50, axis=0)),
        ("q99", np.quantile(pixels, 0.99, axis=0)),
    ):
        got = np.asarray(row[f"stats/{key}/{stat}"]).reshape(3)
        assert np.allclose(got, expected / 255.0), stat


def test_image_stats_quantiles_equal_numpy() -> None:
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, size=(7, 20, 30, 3), dtype=np.uint8)
    accumulator = ImageStats(len(frames))
    for i, frame in enumerate(frames):
        accumulator.add(i, frame)
        accumulator.add(i, frame)  # offered twice (an encode retry) but counted once
    result = accumulator.result()
    pixels = frames.reshape(-1, 3).astype(np.float64)
    for name, level in QUANTILES.items():
        expected = np.quantile(pixels, level, axis=0) / 255.0
        assert np.allclose(result[name].reshape(3), expected, rtol=0, atol=1e-12), name
    assert np.allclose(result["std"].reshape(3), pixels.std(axis=0) / 255.0)
    assert result["count"].tolist() == [7]


def test_episodes_row_groups_of_ten(rollover: Path) -> None:
    meta = pq.ParquetFile(rollover / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 2]


# ----------------------------------------------------------------------------- tasks & stats


def test_tasks_parquet_pandas_layout(small: Path) -> None:
    table = pq.read_table(small / "meta" / "tasks.parquet")
    assert set(table.column_names) == {"__index_level_0__", "task_index"}
    assert str(table.schema.field("__index_level_0__").type) == "string"
    assert str(table.schema.field("task_index").type) == "int64"
    pandas_meta = json.loads(table.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["__index_level_0__"]
    assert [c["field_name"] for c in pandas_meta["columns"]] == table.column_names
    assert table["__index_level_0__"].to_pylist() == list(SMALL.tasks)
    assert table["task_index"].to_pylist() == [0, 1]


def test_stats_json(small: Path) -> None:
    with open(small / "meta" / "stats.json", encoding="utf-8") as f:
        stats = json.load(f)
    info = _info(small)
    assert list(stats) == list(info["features"])
    total = info["total_frames"]
    table = pq.read_table(_data_files(small)[0])
    state = np.asarray(table["observation.state"].to_pylist(), dtype=np.float64)
    s = stats["observation.state"]
    assert list(s) == list(STAT_NAMES)
    assert s["count"] == [total]
    assert np.allclose(s["mean"], state.mean(axis=0))
    assert np.allclose(s["std"], state.std(axis=0))
    assert s["min"] == state.min(axis=0).tolist()
    assert s["max"] == state.max(axis=0).tolist()
    assert stats["index"]["min"] == [0] and stats["index"]["max"] == [total - 1]
    assert stats["next.done"]["max"] == [True]
    for key in ("observation.images.top", "observation.images.side"):
        image_stats = stats[key]
        for name in STAT_NAMES:
            if name != "count":
                value = np.asarray(image_stats[name])
                assert value.shape == (3, 1, 1)
                assert value.min() >= 0.0 and value.max() <= 1.0
        assert image_stats["count"] == [total]  # fewer than 100 frames per episode: all sampled


# ------------------------------------------------------------------------------------ videos


def _packets(path: Path) -> tuple[Fraction, list[tuple[int, bool, bytes]]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.time_base is not None
        packets = [
            (p.pts, bool(p.is_keyframe), bytes(p))
            for p in container.demux(stream)
            if p.size > 0 and p.pts is not None
        ]
        return stream.time_base, packets


def _check_video_layout(root: Path) -> None:
    episodes = _episodes(root)
    fps = _info(root)["fps"]
    for key in _camera_keys(root):
        by_file: dict[Path, list[dict[str, Any]]] = {}
        for ep in episodes:
            by_file.setdefault(_video_path(root, key, ep), []).append(ep)
        assert set(by_file) == set(root.glob(f"videos/{key}/*/*.mp4"))
        for path, members in by_file.items():
            with open(path, "rb") as f:
                head = f.read(64)
            assert head[4:8] == b"ftyp" and b"moov" in head  # faststart: moov before mdat
            time_base, packets = _packets(path)
            step = Fraction(1, fps) / time_base
            assert step.denominator == 1
            assert len(packets) == sum(ep["length"] for ep in members)
            assert sorted(p for p, _, _ in packets) == [i * step for i in range(len(packets))]
            keyframes = {p for p, key_frame, _ in packets if key_frame}
            expected_from = 0.0
            for ep in members:
                start = ep[f"videos/{key}/from_timestamp"]
                end = ep[f"videos/{key}/to_timestamp"]
                assert start == expected_from
                assert end == start + ep["length"] / fps
                assert round(Fraction(start) / time_base) in keyframes
                expected_from = end


def test_videos_layout_timestamps_and_keyframes(small: Path) -> None:
    with av.open(str(small / "videos/observation.images.top/chunk-000/file-000.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name in ("libdav1d", "av1", "libaom-av1")
        assert stream.time_base == Fraction(1, 15360)
        assert stream.average_rate == 30
        assert stream.format.name == "yuv420p"
    _check_video_layout(small)


def test_rollover_data_and_videos(rollover: Path) -> None:
    data_files = _data_files(rollover)
    assert len(data_files) >= 3
    # chunks_size=3: the fourth data file goes to chunk 1.
    assert (rollover / "data" / "chunk-001" / "file-000.parquet") in data_files
    episodes = _episodes(rollover)
    per_file = [pq.ParquetFile(f).metadata.num_row_groups for f in data_files]
    assert max(per_file) >= 2, "some data file should hold several episodes"
    assert sum(per_file) == len(episodes)
    by_data_file = [(ep["data/chunk_index"], ep["data/file_index"]) for ep in episodes]
    assert by_data_file == sorted(by_data_file)
    cameras = _camera_keys(rollover)
    indices = {
        key: [(ep[f"videos/{key}/chunk_index"], ep[f"videos/{key}/file_index"]) for ep in episodes]
        for key in cameras
    }
    for key in cameras:
        assert len(set(indices[key])) >= 2, f"{key} should roll over"
        assert indices[key] == sorted(indices[key])
    assert indices[cameras[0]] != indices[cameras[1]], "cameras should roll over independently"
    assert indices[cameras[0]] != by_data_file
    # Timestamps reset to 0.0 in every new video file.
    for key in cameras:
        for previous, ep in itertools.pairwise(episodes):
            same_file = indices[key][ep["episode_index"]] == indices[key][previous["episode_index"]]
            expected = previous[f"videos/{key}/to_timestamp"] if same_file else 0.0
            assert ep[f"videos/{key}/from_timestamp"] == expected
    _check_video_layout(rollover)


def _decode_at(container: Any, stream: Any, pts: int) -> np.ndarray:
    container.seek(pts, stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.pts == pts:
            image: np.ndarray = frame.to_ndarray(format="rgb24")
            return image
        assert frame.pts < pts, f"seek to pts {pts} overshot to {frame.pts}"
    raise AssertionError(f"no frame with pts {pts}")


def test_markers_of_every_frame_random_access(marked: Path) -> None:
    episodes = _episodes(marked)
    fps = _info(marked)["fps"]
    video_files: set[Path] = set()
    for key in _camera_keys(marked):
        for ep in episodes:
            path = _video_path(marked, key, ep)
            video_files.add(path)
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                assert stream.time_base is not None
                order = np.random.default_rng(ep["episode_index"]).permutation(ep["length"])
                for i in order:
                    seconds = ep[f"videos/{key}/from_timestamp"] + int(i) / fps
                    pts = round(Fraction(seconds) / stream.time_base)
                    image = _decode_at(container, stream, pts)
                    assert read_marker(image) == (ep["episode_index"], int(i)), (key, ep, i)
    assert len(video_files) >= 2 * len(_camera_keys(marked)), "expected rolled-over videos"


def test_markers_sequential_decode(marked: Path) -> None:
    episodes = _episodes(marked)
    for key in _camera_keys(marked):
        expected: dict[Path, list[tuple[int, int]]] = {}
        for ep in episodes:
            path = _video_path(marked, key, ep)
            expected.setdefault(path, []).extend(
                (ep["episode_index"], i) for i in range(ep["length"])
            )
        for path, markers in expected.items():
            with av.open(str(path)) as container:
                decoded = [
                    read_marker(frame.to_ndarray(format="rgb24"))
                    for frame in container.decode(video=0)
                ]
            assert decoded == markers


def test_camera_with_bframes_reorders(marked: Path) -> None:
    path = next(marked.glob("videos/observation.images.bframes/*/*.mp4"))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size > 0]
    assert any(p.pts != p.dts for p in packets)


# ------------------------------------------------------------------ determinism & root rules


def _all_packets(root: Path) -> dict[str, list[bytes]]:
    return {
        p.relative_to(root).as_posix(): [data for _, _, data in _packets(p)[1]]
        for p in sorted(root.glob("videos/*/*/*.mp4"))
    }


def test_deterministic(rollover: Path, tmp_path: Path) -> None:
    again = write_lerobot_dataset(tmp_path / "again", ROLLOVER, progress=False)
    files = sorted(p.relative_to(rollover) for p in rollover.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in files:
        if relative.suffix in (".parquet", ".json"):
            assert (rollover / relative).read_bytes() == (again / relative).read_bytes(), relative
    assert _all_packets(rollover) == _all_packets(again)


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = SynthConfig(num_episodes=2, min_length=2, max_length=3, cameras=())
    write_lerobot_dataset(tmp_path / "ds", config, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_root_must_be_new_or_empty(tmp_path: Path) -> None:
    config = SynthConfig(num_episodes=1, min_length=2, max_length=2, cameras=())
    root = tmp_path / "ds"
    root.mkdir()
    write_lerobot_dataset(root, config, progress=False)  # empty directory is fine
    with pytest.raises(ConfigError, match="ds"):
        write_lerobot_dataset(root, config, progress=False)
    (root / "stale.txt").write_text("x")
    write_lerobot_dataset(root, config, progress=False, overwrite=True)
    assert not (root / "stale.txt").exists()
    assert (root / "meta" / "info.json").exists()
    file_root = tmp_path / "file"
    file_root.write_text("x")
    with pytest.raises(ConfigError, match="file"):
        write_lerobot_dataset(file_root, config, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "vp9"},
        {"height": 16},
        {"width": 47},
        {"gop": 0},
        {"key": "a/b"},
    ],
)
def test_camera_spec_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CameraSpec(**{"key": "observation.images.x", **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_episodes": 0},
        {"num_episodes": 2000},
        {"min_length": 5, "max_length": 4},
        {"max_length": 5000},
        {"tasks": ()},
        {"tasks": ("a", "a")},
        {"image_keys": ("observation.images.top",)},
        {"image_keys": ("action",)},
        {"seed": -1},
        {"data_files_size_in_mb": 0},
    ],
)
def test_synth_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SynthConfig(**kwargs)


# ------------------------------------------------------------------------------ frame marker


@pytest.mark.parametrize("texture", [False, True])
@pytest.mark.parametrize("size", [(32, 48), (48, 64), (240, 320), (480, 640)])
def test_marker_round_trip(size: tuple[int, int], texture: bool) -> None:
    height, width = size
    cases = [(0, 0), (1, 1), (1023, 4095), (517, 1234), (3, 2048)]
    for camera, (episode, frame) in enumerate(cases):
        image = draw_frame(episode, frame, camera, height, width, texture=texture, seed=11)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert read_marker(image) == (episode, frame)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        assert read_marker(chw) == (episode, frame)
        assert read_marker(chw.astype(np.float32) / 255.0) == (episode, frame)
        half = image.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
        assert read_marker(half.round().astype(np.uint8)) == (episode, frame)
        assert read_marker(image[::2, ::2]) == (episode, frame)


def test_marker_reads_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    image = draw_frame(12, 345, 3, 32, 48, texture=True, seed=5)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    assert read_marker(tensor) == (12, 345)
    assert read_marker(tensor.numpy()[0]) == (12, 345)  # a single channel also works


def test_marker_after_resize_with_pyav() -> None:
    image = draw_frame(77, 301, 1, 48, 64, texture=True, seed=0)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    for height, width in [(24, 32), (96, 128), (36, 48)]:
        resized = frame.reformat(width=width, height=height).to_ndarray(format="rgb24")
        assert read_marker(resized) == (77, 301)


def test_draw_frame_is_deterministic_and_texture_moves() -> None:
    a = draw_frame(2, 5, 0, 48, 64, texture=True, seed=1)
    assert np.array_equal(a, draw_frame(2, 5, 0, 48, 64, texture=True, seed=1))
    assert not np.array_equal(a, draw_frame(2, 5, 0, 48, 64, texture=True, seed=2))
    b = draw_frame(2, 6, 0, 48, 64, texture=True, seed=1)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0
    flat = draw_frame(2, 5, 0, 48, 64, texture=False, seed=1)
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) == 2
    other_camera = draw_frame(2, 5, 1, 48, 64, texture=False, seed=1)
    assert not np.array_equal(flat, other_camera)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((48, 64, 3), np.uint8),
        np.full((48, 64, 3), 255, np.uint8),
        np.full((48, 64, 3), 128, np.uint8),
        np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8),
    ],
    ids=["black", "white", "grey", "noise"],
)
def test_marker_rejects_non_markers(image: np.ndarray) -> None:
    with pytest.raises(DecodeError):
        read_marker(image)


def test_marker_argument_errors() -> None:
    with pytest.raises(ConfigError):
        read_marker(np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(ConfigError):
        read_marker(np.zeros((48, 64, 3), np.int32))
    with pytest.raises(ConfigError):
        draw_frame(1024, 0, 0, 48, 64, texture=False, seed=0)
    with pytest.raises(ConfigError):
        draw_frame(0, 4096, 0, 48, 64, texture=False, seed=0)


def test_episode_lengths_are_seeded() -> None:
    lengths = episode_lengths(SynthConfig(num_episodes=50, min_length=3, max_length=9, seed=4))
    assert len(lengths) == 50 and min(lengths) >= 3 and max(lengths) <= 9
    assert len(set(lengths)) > 1
    again = episode_lengths(SynthConfig(num_episodes=50, min_length=3, max_length=9, seed=4))
    assert lengths == again
    assert math.isclose(np.mean(lengths), 6, abs_tol=1.5)
