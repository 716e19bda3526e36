"""Shared fixtures: small synthetic LeRobot v3 datasets, written once per test session.

Every dataset is written by framefeed's own writer (`framefeed.synth`) into a session temporary
folder; no test touches the network. The datasets are tiny (64x48 and 48x32 cameras, a handful
of episodes of 12-24 frames) so that the whole suite stays fast on a shared 2-core machine.
Tests that corrupt a dataset copy it first (`copy_dataset`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TOP = "observation.images.top"
WRIST = "observation.images.wrist"
CAMERAS = (TOP, WRIST)
FPS = 30
TASKS = ("pick up the cube", "push the block")
STATE_DIM = 6
ACTION_DIM = 6

# Small enough that data files and each camera's video files roll over after a few episodes,
# at different episodes (checked by `test_rollover_dataset_has_independent_rollovers`).
ROLLOVER_DATA_MB = 0.006
ROLLOVER_VIDEO_MB = 0.006
IMAGE = "observation.images.front"


def _write(root: Path, **overrides: Any) -> Path:
    from framefeed.synth import CameraSpec, SynthConfig, write_lerobot_dataset

    cameras = overrides.pop(
        "cameras",
        (
            CameraSpec(key=TOP, height=48, width=64),
            CameraSpec(key=WRIST, height=32, width=48),
        ),
    )
    config = SynthConfig(
        num_episodes=overrides.pop("num_episodes", 5),
        min_length=overrides.pop("min_length", 12),
        max_length=overrides.pop("max_length", 24),
        fps=FPS,
        cameras=cameras,
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        tasks=TASKS,
        **overrides,
    )
    return Path(write_lerobot_dataset(root, config, progress=False))


@pytest.fixture(scope="session")
def rollover_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AV1 (g=2) dataset whose data files and per-camera video files roll over independently."""
    root = tmp_path_factory.mktemp("rollover") / "ds"
    return _write(
        root,
        num_episodes=6,
        seed=0,
        data_files_size_in_mb=ROLLOVER_DATA_MB,
        video_files_size_in_mb=ROLLOVER_VIDEO_MB,
        chunks_size=2,
    )


@pytest.fixture(scope="session")
def plain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AV1 dataset with default file sizes (one file each) and a PNG image feature."""
    root = tmp_path_factory.mktemp("plain") / "ds"
    return _write(root, num_episodes=4, seed=1, image_keys=(IMAGE,))


@pytest.fixture(scope="session")
def h264_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """H.264 cameras with GOP 8 (longer GOPs: decode-cost bounds are meaningful)."""
    from framefeed.synth import CameraSpec

    root = tmp_path_factory.mktemp("h264") / "ds"
    return _write(
        root,
        num_episodes=3,
        min_length=16,
        max_length=24,
        seed=2,
        cameras=(
            CameraSpec(key=TOP, height=48, width=64, codec="h264", gop=8),
            CameraSpec(key=WRIST, height=32, width=48, codec="h264", gop=8),
        ),
    )


@pytest.fixture(scope="session")
def bframes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One H.264 camera with B-frames: decode order differs from presentation order."""
    from framefeed.synth import CameraSpec

    root = tmp_path_factory.mktemp("bframes") / "ds"
    return _write(
        root,
        num_episodes=2,
        min_length=20,
        max_length=24,
        seed=4,
        cameras=(CameraSpec(key=TOP, height=48, width=64, codec="h264", gop=8, bframes=2),),
    )


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AV1 dataset with textured, moving frames (real inter prediction)."""
    root = tmp_path_factory.mktemp("texture") / "ds"
    return _write(root, num_episodes=3, seed=3, texture=True)


# --- helpers (plain functions, imported by the test modules) -------------------------------------


def read_info(root: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((root / "meta" / "info.json").read_text())
    return info


def write_info(root: Path, info: dict[str, Any]) -> None:
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))


def episode_files(root: Path) -> list[Path]:
    return sorted((root / "meta" / "episodes").glob("*/*.parquet"))


def episodes_table(root: Path) -> pa.Table:
    """Every row of meta/episodes, in file order."""
    return pa.concat_tables([pq.read_table(p) for p in episode_files(root)])


def data_files(root: Path) -> list[Path]:
    return sorted((root / "data").glob("*/*.parquet"))


def data_table(root: Path) -> pa.Table:
    """Every frame row of the dataset, read with pyarrow directly (the loader's file order)."""
    return pa.concat_tables([pq.read_table(p) for p in data_files(root)])


def column_values(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy: scalars (N,), fixed-size lists (N, D)."""
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        return np.stack([np.asarray(v, dtype=np.float64) for v in col.to_pylist()])
    return np.asarray(col.to_pylist())


def copy_dataset(src: Path, dst: Path, *, meta_only: bool = False) -> Path:
    """Copy a session dataset before corrupting it (``meta_only``: just ``meta/``)."""
    if meta_only:
        shutil.copytree(src / "meta", dst / "meta")
    else:
        shutil.copytree(src, dst)
    return dst


def rewrite_episodes(root: Path, change: Callable[[dict[str, list[Any]]], None]) -> None:
    """Apply ``change`` to the columns (as Python lists) of every meta/episodes file."""
    for path in episode_files(root):
        table = pq.read_table(path)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        change(columns)
        fields = [table.schema.field(n) for n in columns if n in table.column_names]
        arrays = [pa.array(columns[f.name], type=f.type) for f in fields]
        pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)


def sample_ids(root: Path) -> list[tuple[int, int]]:
    """(episode_index, frame_index) of every global sample, from the parquet rows."""
    table = data_table(root)
    eps = table.column("episode_index").to_pylist()
    frames = table.column("frame_index").to_pylist()
    return list(zip(eps, frames, strict=True))


def tiny_rerun_config(**overrides: Any) -> Any:
    """A small `RerunSynthConfig` (48x64 cameras, GOP 10, 16 rows per chunk) for Rerun tests."""
    from framefeed.synth.rerun import RerunSynthConfig

    settings: dict[str, Any] = {
        "jpeg_size": (48, 64),
        "h264_size": (48, 64),
        "h264_gop": 10,
        "rows_per_chunk": 16,
    }
    settings.update(overrides)
    return RerunSynthConfig(**settings)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group on 127.0.0.1 (tests that spawn ranks)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Two lists of batches hold the same keys, dtypes and values, in order."""
    import torch

    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert list(x) == list(y), k
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype, (k, key)
                assert torch.equal(x[key], y[key]), (k, key)
            else:
                assert x[key] == y[key], (k, key)
