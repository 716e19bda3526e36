"""Tabular columns: row-group and filtered reads, episode subsets, text columns, custom decoders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    CAMERAS,
    FPS,
    column_values,
    copy_dataset,
    data_files,
    data_table,
    read_info,
    write_info,
)

import framefeed
from framefeed import Column, Field, MapDataset
from framefeed.fields import BatchIO, FieldRequest
from framefeed.synth import read_marker

pytestmark = pytest.mark.timeout(60)

NUMERIC = ("observation.state", "action", "next.reward", "index", "frame_index", "episode_index")


def _all(ds: MapDataset) -> dict[str, Any]:
    return framefeed.collate(ds.__getitems__(list(range(len(ds)))))


def _rows_of(root: Path, episodes: Sequence[int]) -> np.ndarray:
    eps = column_values(data_table(root), "episode_index")
    return np.flatnonzero(np.isin(eps, list(episodes)))


@pytest.mark.parametrize("episodes", [[2, 4], [3], [5], [1, 3, 5], [4, 0, 2]])
def test_subsets_read_the_right_rows(rollover_root: Path, episodes: list[int]) -> None:
    """Subsets that skip episodes inside one data file (row-group reads) get the right rows."""
    table = data_table(rollover_root)
    rows = _rows_of(rollover_root, episodes)
    with MapDataset(rollover_root, episodes=episodes) as ds:
        assert len(ds) == len(rows)
        got = _all(ds)
    for key in NUMERIC:
        want = column_values(table, key)[rows]
        np.testing.assert_array_equal(got[key].numpy().astype(np.float64), want, key)
    for cam in CAMERAS:
        ids = [read_marker(x.numpy()) for x in got[cam]]
        assert ids == list(
            zip(got["episode_index"].tolist(), got["frame_index"].tolist(), strict=True)
        )


def test_synth_writes_one_row_group_per_episode(rollover_root: Path) -> None:
    meta = framefeed.open_dataset(rollover_root)
    for path in data_files(rollover_root):
        rel = path.relative_to(rollover_root).as_posix()
        groups = pq.ParquetFile(path).metadata.num_row_groups
        assert groups == int((meta.data_paths == rel).sum())


@pytest.mark.parametrize("row_group_size", [7, 1_000_000])
def test_data_files_with_other_row_groups(
    tmp_path: Path, rollover_root: Path, row_group_size: int
) -> None:
    """Files whose row groups are not one per episode are read and filtered by episode_index."""
    root = copy_dataset(rollover_root, tmp_path / "ds")
    for path in data_files(root):
        pq.write_table(pq.read_table(path), path, row_group_size=row_group_size)
    for episodes in (None, [2, 4], [5, 0]):
        with (
            MapDataset(root, episodes=episodes) as a,
            MapDataset(rollover_root, episodes=episodes) as b,
        ):
            got, want = _all(a), _all(b)
        for key in want:
            if isinstance(want[key], torch.Tensor):
                assert torch.equal(got[key], want[key]), (episodes, key)
            else:
                assert got[key] == want[key]


def test_variable_size_lists_are_accepted(tmp_path: Path, plain_root: Path) -> None:
    """Older writers store vectors as variable-size lists; values are the same."""
    root = copy_dataset(plain_root, tmp_path / "ds")
    for path in data_files(root):
        table = pq.read_table(path)
        for name in ("observation.state", "action"):
            i = table.column_names.index(name)
            values = pa.array(table.column(name).to_pylist(), type=pa.list_(pa.float32()))
            table = table.set_column(i, name, values)
        pq.write_table(table, path)
    with MapDataset(root) as a, MapDataset(plain_root) as b:
        for i in (0, 9, len(a) - 1):
            for key in ("observation.state", "action"):
                assert a[i][key].dtype == torch.float32
                assert torch.equal(a[i][key], b[i][key])


def test_float64_and_int32_columns_become_float32_and_int64(
    tmp_path: Path, plain_root: Path
) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds")
    for path in data_files(root):
        table = pq.read_table(path)
        i = table.column_names.index("next.reward")
        table = table.set_column(i, "next.reward", table.column("next.reward").cast(pa.float64()))
        i = table.column_names.index("task_index")
        table = table.set_column(i, "task_index", table.column("task_index").cast(pa.int32()))
        pq.write_table(table, path)
    info = read_info(root)
    info["features"]["next.reward"]["dtype"] = "float64"
    info["features"]["task_index"]["dtype"] = "int32"
    write_info(root, info)
    with MapDataset(root) as a, MapDataset(plain_root) as b:
        sa, sb = a[5], b[5]
    assert sa["next.reward"].dtype == torch.float32
    assert sa["next.reward"].shape == ()
    assert torch.equal(sa["next.reward"], sb["next.reward"])
    assert sa["task_index"].dtype == torch.int64
    assert sa["task"] == sb["task"]


def _add_text_column(root: Path) -> list[str]:
    texts: list[str] = []
    for path in data_files(root):
        table = pq.read_table(path)
        ep = table.column("episode_index").to_pylist()
        fr = table.column("frame_index").to_pylist()
        col = [f"ep{e}-frame{f}" for e, f in zip(ep, fr, strict=True)]
        texts += col
        pq.write_table(table.append_column("note", pa.array(col, pa.string())), path)
    info = read_info(root)
    features = dict(info["features"])
    defaults = {k: features.pop(k) for k in list(features)[-5:]}
    features["note"] = {"dtype": "string", "shape": [1], "names": None}
    features.update(defaults)
    info["features"] = features
    write_info(root, info)
    return texts


def test_text_column(tmp_path: Path, plain_root: Path) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds")
    texts = _add_text_column(root)
    meta = framefeed.open_dataset(root)
    assert meta.column("note").kind is framefeed.ColumnKind.TEXT
    with MapDataset(root) as ds:
        assert [ds[i]["note"] for i in (0, 7, len(ds) - 1)] == [
            texts[0],
            texts[7],
            texts[len(ds) - 1],
        ]
        batch = _all(ds)
        assert batch["note"] == texts
    with MapDataset(root, fields=[Field("note", window=[-1, 0, 1])]) as ds:
        s = ds[0]
        assert s["note"] == [texts[0], texts[0], texts[1]]
        assert s["note_is_pad"].tolist() == [True, False, False]


class _EvenFramesOnly:
    """A custom decoder: frame_index as a float tensor on even frames, missing (None) on odd."""

    def columns(self, request_column: Column | None) -> Sequence[str]:
        return ["frame_index"]

    def decode(self, request: FieldRequest, io: BatchIO) -> list[Any]:
        frames = request.store.get("frame_index")[request.rows[:, 0]]
        return [torch.tensor([float(f), 1.0]) if f % 2 == 0 else None for f in frames.tolist()]


def test_custom_decoder_missing_values_are_zero_filled(plain_root: Path) -> None:
    fields = [Field("even", decode=_EvenFramesOnly()), Field("frame_index")]
    with MapDataset(plain_root, fields=fields) as ds:
        samples = ds.__getitems__([0, 1, 2, 3])
    for s in samples:
        f = int(s["frame_index"])
        if f % 2 == 0:
            assert s["even"].tolist() == [float(f), 1.0]
            assert not bool(s["even_is_pad"])
        else:
            assert s["even"].tolist() == [0.0, 0.0]
            assert bool(s["even_is_pad"])


def test_task_field_alone(plain_root: Path) -> None:
    with MapDataset(plain_root, fields=[Field("task", decode=framefeed.TaskDecoder())]) as ds:
        tasks = [ds[i]["task"] for i in range(len(ds))]
    meta = framefeed.open_dataset(plain_root)
    ids = np.repeat(meta.segment_ids, meta.lengths)
    assert tasks == [meta.tasks[int(e) % 2] for e in ids]


def test_numeric_window_on_image_keeps_time_axis(plain_root: Path) -> None:
    from conftest import IMAGE

    deltas = {IMAGE: [-1 / FPS, 0.0]}
    with MapDataset(plain_root, delta_timestamps=deltas) as ds:
        s = ds[0]
        one = MapDataset(plain_root, delta_timestamps={IMAGE: [0.0]})
        t = one[0]
        one.close()
    assert s[IMAGE].shape == (2, 3, 48, 64)
    assert [read_marker(x.numpy()) for x in s[IMAGE]] == [(0, 0), (0, 0)]
    assert s[f"{IMAGE}_is_pad"].tolist() == [True, False]
    # LeRobot stacks non-video keys, so a length-1 image window keeps its T axis.
    assert t[IMAGE].shape == (1, 3, 48, 64)


def test_two_dimensional_feature(tmp_path: Path, plain_root: Path) -> None:
    """A (2, 3) feature stored as nested lists (HF ``Array2D`` storage) comes back as (2, 3)."""
    root = copy_dataset(plain_root, tmp_path / "ds")
    for path in data_files(root):
        table = pq.read_table(path)
        index = table.column("index").to_pylist()
        values = [[[i + r + c / 10 for c in range(3)] for r in range(2)] for i in index]
        matrix = pa.array(values, type=pa.list_(pa.list_(pa.float32())))
        pq.write_table(table.append_column("observation.matrix", matrix), path)
    info = read_info(root)
    features = {"observation.matrix": {"dtype": "float32", "shape": [2, 3], "names": None}}
    features.update(info["features"])
    info["features"] = features
    write_info(root, info)
    with MapDataset(root, delta_timestamps={"observation.matrix": [-1 / FPS, 0.0]}) as ds:
        s = ds[4]
        plain = MapDataset(root)
        p = plain[4]
        plain.close()

    def want_at(i: int) -> torch.Tensor:
        return torch.tensor([[i + r + c / 10 for c in range(3)] for r in range(2)])

    want = want_at(4)
    assert p["observation.matrix"].dtype == torch.float32
    assert p["observation.matrix"].shape == (2, 3)
    assert torch.equal(p["observation.matrix"], want)
    assert s["observation.matrix"].shape == (2, 2, 3)
    assert torch.equal(s["observation.matrix"][1], want)
    assert torch.equal(s["observation.matrix"][0], want_at(3))
