"""``write_lerobot_dataset``: a deterministic synthetic LeRobot v3.0 dataset on local disk.

The layout, schemas and rollover rules follow LeRobot 0.4.4 (``shared/design/lerobot-v3-format.md``
sections 1-7 and 11). Content is a pure function of the config (see :mod:`.content` and
:mod:`.frames`), so tests can check every value and every decoded frame.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from framefeed.errors import ConfigError, StorageError
from framefeed.synth.config import DEFAULT_FEATURE_NAMES, CameraSpec, SynthConfig
from framefeed.synth.content import episode_columns, episode_lengths, episode_task_index
from framefeed.synth.frames import FramePainter
from framefeed.synth.stats import ImageStats, Stats, aggregate_stats, numeric_stats
from framefeed.synth.tables import (
    data_schema,
    data_table,
    encode_png,
    episodes_schema,
    episodes_table,
    tasks_table,
)
from framefeed.synth.video import (
    VIDEO_PATH,
    VideoFileWriter,
    encode_episode,
    next_file_indices,
    verify_video_file,
)

__all__ = ["IMAGE_SHAPE", "build_features", "write_lerobot_dataset"]

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_SHAPE = (48, 64, 3)
"""(H, W, C) of every image (PNG-in-parquet) feature."""
_EPISODES_ROW_GROUP = 10  # LeRobot's metadata_buffer_size
_MAX_ENCODE_THREADS = 4
_LOOKAHEAD = 2  # episodes whose encodes may run ahead of the one being written
_MB = 1024 * 1024


def _video_feature(camera: CameraSpec, fps: int) -> dict[str, Any]:
    return {
        "dtype": "video",
        "shape": [camera.height, camera.width, 3],
        "names": ["height", "width", "channels"],
        "info": {
            "video.height": camera.height,
            "video.width": camera.width,
            "video.codec": camera.codec,
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": fps,
            "video.channels": 3,
            "has_audio": False,
        },
    }


def build_features(config: SynthConfig) -> dict[str, dict[str, Any]]:
    """``info.json["features"]`` for ``config``, in LeRobot order (defaults last)."""
    features: dict[str, dict[str, Any]] = {}
    for camera in config.cameras:
        features[camera.key] = _video_feature(camera, config.fps)
    for key in config.image_keys:
        features[key] = {
            "dtype": "image",
            "shape": list(IMAGE_SHAPE),
            "names": ["height", "width", "channels"],
        }
    features["observation.state"] = {
        "dtype": "float32",
        "shape": [config.state_dim],
        "names": [f"joint_{j}" for j in range(config.state_dim)],
    }
    features["action"] = {
        "dtype": "float32",
        "shape": [config.action_dim],
        "names": [f"joint_{j}" for j in range(config.action_dim)],
    }
    features["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    features["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    default_dtypes = ("float32", "int64", "int64", "int64", "int64")
    for name, dtype in zip(DEFAULT_FEATURE_NAMES, default_dtypes, strict=True):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def _number(value: float) -> float | int:
    """Integral sizes are written as JSON integers, as LeRobot does (``100``, not ``100.0``)."""
    return int(value) if float(value).is_integer() else value


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=4, ensure_ascii=False)
        f.write("\n")


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"dataset root {str(root)!r} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"dataset root {str(root)!r} already exists and is not empty; choose a new "
                "path or pass overwrite=True to replace it"
            )
        shutil.rmtree(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"dataset root {str(root)!r}: cannot create it ({exc})") from exc


class _DataFileWriter:
    """Writes episodes to ``data/chunk-XXX/file-YYY.parquet``, one row group per episode.

    A new file starts when ``current_MB + MB_per_frame * new_frames >= data_files_size_in_mb``,
    estimated from the bytes written so far (LeRobot's rule); never before the first episode.
    """

    def __init__(self, root: Path, schema: pa.Schema, config: SynthConfig) -> None:
        self._root = root
        self.schema = schema
        self._limit_mb = config.data_files_size_in_mb
        self._chunks_size = config.chunks_size
        self._sink: Any = None
        self._writer: Any = None
        self._indices = (0, 0)
        self._frames = 0

    def _open(self) -> None:
        chunk_index, file_index = self._indices
        path = self._root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pq.ParquetWriter(
            self._sink, self.schema, compression="snappy", use_dictionary=True
        )
        self._frames = 0

    def write(self, table: pa.Table) -> tuple[int, int]:
        """Write one episode as one row group; returns its (chunk_index, file_index)."""
        if self._writer is None:
            self._open()
        else:
            size_mb = self._sink.tell() / _MB
            per_frame_mb = size_mb / self._frames
            if size_mb + per_frame_mb * table.num_rows >= self._limit_mb:
                self.close()
                self._indices = next_file_indices(*self._indices, self._chunks_size)
                self._open()
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._frames += table.num_rows
        return self._indices

    def close(self) -> None:
        """Write the footer of the current file; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None
            self._sink = None


def write_lerobot_dataset(
    root: str | os.PathLike[str],
    config: SynthConfig = SynthConfig(),  # noqa: B008 - frozen, immutable default
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic LeRobot v3.0 dataset described by ``config`` under ``root``.

    ``root`` must not exist or must be empty; with ``overwrite=True`` an existing directory is
    removed first. Returns the root as a :class:`~pathlib.Path`. The same config always gives
    byte-identical parquet and JSON files and identical video packets (on the same platform and
    library versions). Every mp4 is checked after writing (frame count, timestamps, a keyframe
    at every episode start, moov before mdat). ``meta/`` is written last, so a run that fails
    part-way leaves a directory without ``meta/info.json`` that no reader will take for a dataset.
    """
    root_path = Path(root)
    _prepare_root(root_path, overwrite)
    # SVT-AV1 prints a banner per encoder instance unless told otherwise; the level is read
    # once per process, and a level chosen by the user wins.
    os.environ.setdefault("SVT_LOG", "1")
    features = build_features(config)
    lengths = episode_lengths(config)
    data_writer = _DataFileWriter(root_path, data_schema(features), config)
    video_writers = [
        VideoFileWriter(
            root=root_path,
            camera=camera,
            fps=config.fps,
            size_limit_mb=config.video_files_size_in_mb,
            chunks_size=config.chunks_size,
        )
        for camera in config.cameras
    ]
    rows: list[dict[str, Any]] = []
    all_stats: list[dict[str, Stats]] = []
    start = 0
    # Encoding dominates the run time and a single small encode does not fill the cores, so the
    # (episode, camera) encodes run on a few threads, a bounded number of episodes ahead. Files
    # are still written strictly in episode order by this thread, so the output is the same.
    workers = max(1, min(_MAX_ENCODE_THREADS, os.cpu_count() or 1))
    pending: deque[list[Future[tuple[bytes, Stats]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth-encode") as pool:
        try:
            next_episode = 0
            for episode in tqdm(
                range(config.num_episodes),
                desc="synthetic episodes",
                unit="ep",
                disable=not progress,
            ):
                while next_episode < config.num_episodes and len(pending) <= _LOOKAHEAD:
                    pending.append(
                        [
                            pool.submit(
                                _encode_camera, config, next_episode, index, lengths[next_episode]
                            )
                            for index in range(len(config.cameras))
                        ]
                    )
                    next_episode += 1
                encoded = [future.result() for future in pending.popleft()]
                row, stats = _write_episode(
                    config, episode, lengths[episode], start, encoded, data_writer, video_writers
                )
                rows.append(row)
                all_stats.append(stats)
                start += lengths[episode]
            data_writer.close()
            for video_writer in video_writers:
                video_writer.close()
        except BaseException:
            for futures in pending:
                for future in futures:
                    future.cancel()
            data_writer.close()
            for video_writer in video_writers:
                video_writer.abort()
            raise
    for video_writer in video_writers:
        for path, episodes in video_writer.files:
            verify_video_file(path, episodes, config.fps)
    _write_metadata(root_path, config, features, rows, all_stats)
    return root_path


def _encode_camera(
    config: SynthConfig, episode: int, camera_index: int, length: int
) -> tuple[bytes, Stats]:
    """Draw and encode one episode of one camera: its single-episode mp4 and image stats."""
    camera = config.cameras[camera_index]
    painter = FramePainter(
        episode=episode,
        camera=camera_index,
        height=camera.height,
        width=camera.width,
        texture=config.texture,
        seed=config.seed,
    )
    image_stats = ImageStats(length)

    def draw(frame: int) -> npt.NDArray[np.uint8]:
        image = painter.draw(frame)
        image_stats.add(frame, image)
        return image

    mp4 = encode_episode(draw, length, camera, config.fps)
    return mp4, image_stats.result()


def _write_episode(
    config: SynthConfig,
    episode: int,
    length: int,
    start: int,
    encoded: list[tuple[bytes, Stats]],
    data_writer: _DataFileWriter,
    video_writers: list[VideoFileWriter],
) -> tuple[dict[str, Any], dict[str, Stats]]:
    """Write every file entry of one episode; returns its episodes-table row and its stats."""
    columns = episode_columns(config, episode, length, start)
    stats: dict[str, Stats] = {}
    row: dict[str, Any] = {
        "episode_index": episode,
        "tasks": [config.tasks[episode_task_index(config, episode)]],
        "length": length,
        "dataset_from_index": start,
        "dataset_to_index": start + length,
    }
    for camera, writer, (mp4, camera_stats) in zip(
        config.cameras, video_writers, encoded, strict=True
    ):
        placement = writer.append(mp4, length)
        prefix = f"videos/{camera.key}"
        row[f"{prefix}/chunk_index"] = placement.chunk_index
        row[f"{prefix}/file_index"] = placement.file_index
        row[f"{prefix}/from_timestamp"] = placement.from_timestamp
        row[f"{prefix}/to_timestamp"] = placement.to_timestamp
        stats[camera.key] = camera_stats
    images: dict[str, list[bytes]] = {}
    for offset, key in enumerate(config.image_keys):
        painter = FramePainter(
            episode=episode,
            camera=len(config.cameras) + offset,
            height=IMAGE_SHAPE[0],
            width=IMAGE_SHAPE[1],
            texture=config.texture,
            seed=config.seed,
        )
        image_stats = ImageStats(length)
        pngs: list[bytes] = []
        for frame in range(length):
            image = painter.draw(frame)
            image_stats.add(frame, image)
            pngs.append(encode_png(image))
        images[key] = pngs
        stats[key] = image_stats.result()
    chunk_index, file_index = data_writer.write(data_table(data_writer.schema, columns, images))
    row["data/chunk_index"] = chunk_index
    row["data/file_index"] = file_index
    for name, values in columns.items():
        stats[name] = numeric_stats(values)
    return row, stats


def _write_metadata(
    root: Path,
    config: SynthConfig,
    features: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    all_stats: list[dict[str, Stats]],
) -> None:
    total_frames = sum(row["length"] for row in rows)
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": config.robot_type,
        "total_episodes": config.num_episodes,
        "total_frames": total_frames,
        "total_tasks": len(config.tasks),
        "chunks_size": config.chunks_size,
        "data_files_size_in_mb": _number(config.data_files_size_in_mb),
        "video_files_size_in_mb": _number(config.video_files_size_in_mb),
        "fps": config.fps,
        "splits": {"train": f"0:{config.num_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if config.cameras else None,
        "features": features,
    }
    _write_json(root / "meta" / "info.json", info)

    ordered_stats = [{name: stats[name] for name in features} for stats in all_stats]
    dataset_stats = {
        name: {
            stat: value.tolist()
            for stat, value in aggregate_stats([s[name] for s in ordered_stats]).items()
        }
        for name in features
    }
    _write_json(root / "meta" / "stats.json", dataset_stats)

    tasks_path = root / "meta" / "tasks.parquet"
    pq.write_table(tasks_table(config.tasks), tasks_path, compression="snappy")

    episodes_path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    schema = episodes_schema(features, [camera.key for camera in config.cameras])
    for row in rows:
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
    with pq.ParquetWriter(str(episodes_path), schema, compression="snappy") as writer:
        for begin in range(0, len(rows), _EPISODES_ROW_GROUP):
            end = begin + _EPISODES_ROW_GROUP
            writer.write_table(episodes_table(schema, rows[begin:end], ordered_stats[begin:end]))
