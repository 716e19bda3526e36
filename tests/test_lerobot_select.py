"""`Field(select=...)` on LeRobot datasets: values against a brute-force read of the parquet.

The reference is computed per row in Python (list indexing and slicing on ``to_pylist()``
values), independently of `framefeed.select`; windows are checked position by position,
including the clamped positions at episode edges and their pad masks.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FPS, IMAGE, TOP, data_files, data_table, read_info, write_info

from framefeed import (
    ColumnCache,
    ConfigError,
    Field,
    IterableDataset,
    MapDataset,
    TaskDecoder,
    Window,
)
from framefeed.catalog import Column, ColumnKind
from framefeed.table import select_column

pytestmark = pytest.mark.timeout(120)

STATE = "observation.state"
GRID = "observation.grid"
ARM_DIM = 14
IDS = [Field("episode_index"), Field("frame_index")]

# Expression -> the same selection on one row's Python list (the brute-force reference).
SELECTS: dict[str, Callable[[list[Any]], Any]] = {
    "[0:7]": lambda v: v[0:7],
    "[3]": lambda v: v[3],
    "[-1]": lambda v: v[-1],
    "[::2]": lambda v: v[::2],
    "[-5:-1:2]": lambda v: v[-5:-1:2],
    "[-3:]": lambda v: v[-3:],
    "[4:5]": lambda v: v[4:5],  # a slice keeps its axis, even of length 1
    "[*]": lambda v: v,
}
GRID_SELECTS: dict[str, Callable[[list[Any]], Any]] = {
    "[1]": lambda v: v[1],
    "[*][0]": lambda v: [r[0] for r in v],
    "[0][-1]": lambda v: v[0][-1],
    "[-1][1::3]": lambda v: v[-1][1::3],
    "[:1]": lambda v: v[:1],
}


@pytest.fixture(scope="module")
def arm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No cameras, a 14-dim state and a (2, 7) tensor feature (each row's state, reshaped)."""
    from framefeed.synth import SynthConfig, write_lerobot_dataset

    root = tmp_path_factory.mktemp("arm") / "ds"
    config = SynthConfig(
        num_episodes=4, min_length=6, max_length=12, cameras=(), state_dim=ARM_DIM, seed=5
    )
    write_lerobot_dataset(root, config, progress=False)
    for path in data_files(root):
        table = pq.read_table(path)
        flat = table.column(STATE).combine_chunks().flatten()
        grid = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 7), 2)
        pq.write_table(table.append_column(GRID, grid), path)  # one row group: rows filtered
    info = read_info(root)
    info["features"][GRID] = {"dtype": "float32", "shape": [2, 7], "names": None}
    write_info(root, info)
    return root


def _reference(root: Path, column: str) -> tuple[dict[tuple[int, int], Any], dict[int, int]]:
    """Every row's value of ``column`` by (episode, frame), and each episode's length."""
    table = data_table(root)
    eps = table.column("episode_index").to_pylist()
    frames = table.column("frame_index").to_pylist()
    values = table.column(column).to_pylist()
    rows = {(e, f): v for e, f, v in zip(eps, frames, values, strict=True)}
    lengths: dict[int, int] = {}
    for e in eps:
        lengths[e] = lengths.get(e, 0) + 1
    return rows, lengths


def _expect(fn: Callable[[list[Any]], Any], value: list[Any]) -> np.ndarray:
    return np.asarray(fn(value), dtype=np.float32)


def _ids(batch: dict[str, Any], i: int) -> tuple[int, int]:
    return int(batch["episode_index"][i]), int(batch["frame_index"][i])


def _all(ds: MapDataset) -> dict[str, Any]:
    return ds.get_batch(np.arange(len(ds)))


@pytest.mark.parametrize("expr", list(SELECTS))
def test_select_matches_parquet_rows(arm_root: Path, expr: str) -> None:
    rows, _ = _reference(arm_root, STATE)
    fn = SELECTS[expr]
    want_shape = _expect(fn, rows[(0, 0)]).shape
    with MapDataset(arm_root, fields=[Field(STATE, select=expr, key="sel"), *IDS]) as ds:
        batch = _all(ds)
        column = ds._plan().fields[0].column
    assert column is not None and column.kind is ColumnKind.NUMERIC
    assert column.shape == (want_shape or (1,))
    assert batch["sel"].dtype == torch.float32
    assert tuple(batch["sel"].shape) == (len(rows), *want_shape)
    seen = set()
    for i in range(len(rows)):
        key = _ids(batch, i)
        seen.add(key)
        np.testing.assert_array_equal(batch["sel"][i].numpy(), _expect(fn, rows[key]), err_msg=key)
    assert seen == set(rows)


def test_selected_names_and_several_selects_of_one_column(arm_root: Path) -> None:
    fields = [
        Field(STATE, select="[0:7]", key="arm_state"),
        Field(STATE, select="[-1]", key="last"),
        Field(STATE),
    ]
    with MapDataset(arm_root, fields=fields) as ds:
        batch = _all(ds)
        column = ds._plan().fields[0].column
    assert column is not None
    assert column.names == [f"joint_{j}" for j in range(7)]
    assert torch.equal(batch["arm_state"], batch[STATE][:, :7])
    assert torch.equal(batch["last"], batch[STATE][:, -1])
    assert set(batch) == {"arm_state", "last", STATE}


@pytest.mark.parametrize("expr", list(GRID_SELECTS))
def test_select_on_a_tensor_feature(arm_root: Path, expr: str) -> None:
    rows, _ = _reference(arm_root, GRID)
    fn = GRID_SELECTS[expr]
    with MapDataset(arm_root, fields=[Field(GRID, select=expr, key="g"), *IDS]) as ds:
        batch = _all(ds)
    assert tuple(batch["g"].shape[1:]) == _expect(fn, rows[(0, 0)]).shape
    for i in range(len(rows)):
        key = _ids(batch, i)
        np.testing.assert_array_equal(batch["g"][i].numpy(), _expect(fn, rows[key]), err_msg=key)


STEPS = (-3, -1, 0, 2)
LONG = tuple(range(-1, 14))  # longer than any episode: both ends pad in one sample


@pytest.mark.parametrize("steps", [STEPS, LONG])
@pytest.mark.parametrize("how", ["delta_timestamps", "window"])
def test_windows_pad_and_clamp_like_the_unselected_field(
    arm_root: Path, steps: tuple[int, ...], how: str
) -> None:
    rows, lengths = _reference(arm_root, STATE)
    exprs = {"arm": "[0:7]", "one": "[3]", "odd": "[-5:-1:2]"}
    if how == "window":
        fields = [
            Field(STATE, select=e, key=k, window=Window(steps=steps)) for k, e in exprs.items()
        ]
        fields.append(Field(STATE, window=steps))
        deltas = None
    else:
        fields = [Field(STATE, select=e, key=k) for k, e in exprs.items()] + [Field(STATE)]
        deltas = {k: [s / FPS for s in steps] for k in [*exprs, STATE]}
    with MapDataset(arm_root, fields=[*fields, *IDS], delta_timestamps=deltas) as ds:
        batch = _all(ds)
    pads = 0
    for key, expr in exprs.items():
        fn = SELECTS[expr]
        assert torch.equal(batch[f"{key}_is_pad"], batch[f"{STATE}_is_pad"])
        assert batch[key].shape[:2] == (len(rows), len(steps))
        for i in range(len(rows)):
            ep, frame = _ids(batch, i)
            for t, step in enumerate(steps):
                wanted = frame + step
                clamped = min(max(wanted, 0), lengths[ep] - 1)
                padded = not 0 <= wanted < lengths[ep]
                pads += padded
                assert bool(batch[f"{key}_is_pad"][i, t]) == padded
                np.testing.assert_array_equal(
                    batch[key][i, t].numpy(),
                    _expect(fn, rows[(ep, clamped)]),
                    err_msg=f"{key} episode {ep} frame {frame} step {step}",
                )
    assert pads > 0  # the edges were exercised


def test_getitem_and_getitems_match_get_batch(arm_root: Path) -> None:
    deltas = {"arm": [-2 / FPS, 0.0, 1 / FPS]}
    fields = [Field(STATE, select="[0:7]", key="arm"), Field(STATE, select="[-2]", key="s"), *IDS]
    with MapDataset(arm_root, fields=fields, delta_timestamps=deltas) as ds:
        picks = [0, 5, len(ds) - 1, 7]
        batch = ds.get_batch(picks)
        items = ds.__getitems__(picks)
        for j, i in enumerate(picks):
            one = ds[i]
            for sample in (one, items[j]):
                assert set(sample) == {"arm", "s", "episode_index", "frame_index", "arm_is_pad"}
                for key, value in sample.items():
                    assert torch.equal(value, batch[key][j]), (i, key)
        again = pickle.loads(pickle.dumps(ds))  # spawn workers: a fresh planner derives again
        with again:
            twin = again.get_batch(picks)
    for key, value in batch.items():
        assert torch.equal(value, twin[key]), key


def test_iterable_dataset_serves_selected_values(arm_root: Path) -> None:
    rows, lengths = _reference(arm_root, STATE)
    steps = (-1, 0, 1)
    fields = [Field(STATE, select="[::2]", key="even", window=steps), *IDS]
    ds = IterableDataset(arm_root, fields=fields, episode_pool_size=2, fetch_size=5, seed=3)
    seen = []
    try:
        for sample in ds:
            ep, frame = int(sample["episode_index"]), int(sample["frame_index"])
            seen.append((ep, frame))
            for t, step in enumerate(steps):
                clamped = min(max(frame + step, 0), lengths[ep] - 1)
                assert bool(sample["even_is_pad"][t]) == (clamped != frame + step)
                np.testing.assert_array_equal(
                    sample["even"][t].numpy(), _expect(SELECTS["[::2]"], rows[(ep, clamped)])
                )
    finally:
        ds.close()
    assert sorted(seen) == sorted(rows)


def test_column_cache_keeps_selected_columns_apart(arm_root: Path, tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    fields = [Field(STATE, select="[0:7]", key="arm"), Field(STATE, select="[3]", key="one")]
    with MapDataset(arm_root, fields=[*fields, Field(STATE)]) as plain:
        want = _all(plain)
    for run in range(2):
        with MapDataset(arm_root, fields=[*fields, Field(STATE)], column_cache=cache) as ds:
            got = _all(ds)
            store = ds._plan().store
            assert store.cache_stats == (
                {"built": 3, "mapped": 0} if run == 0 else {"built": 0, "mapped": 3}
            )
            assert not store.get(f"{STATE}#[0:7]").flags.owndata  # served from the mapping
        for key, value in want.items():
            assert torch.equal(value, got[key]), key
    keys = {e.key["column"]: e.key for e in cache.entries()}
    assert set(keys) == {STATE, f"{STATE}#[0:7]", f"{STATE}#[3]"}
    assert keys[f"{STATE}#[0:7]"]["select"] == [STATE, "[0:7]", [ARM_DIM]]
    assert keys[f"{STATE}#[3]"]["shape"] == [1] and "select" not in keys[STATE]
    with MapDataset(arm_root, fields=fields[1:], column_cache=cache) as only:
        assert torch.equal(_all(only)["one"], want["one"])  # the base column is not needed
        assert only._plan().store.cache_stats == {"built": 0, "mapped": 1}


@pytest.mark.parametrize(
    ("path", "expr", "expected"),
    [
        (STATE, "x", "needs a struct with a field 'x'"),
        (STATE, "[*].x", "needs a struct with a field 'x', but the value there has type float"),
        (STATE, "[0][0]", "needs a list, but the value there has type float"),
        (STATE, "[14]", "an index is out of range for a value of shape [14]"),
        (STATE, "[-15]", "an index is out of range for a value of shape [14]"),
        (GRID, "[1][7]", "an index is out of range for a value of shape [2, 7]"),
        (STATE, "[3:3]", "selects no values"),
        (STATE, "[0", 'expected "]"'),
        ("timestamp", "[0]", "holds one float32 per frame (shape [1])"),
        ("next.done", "[0]", "holds one bool per frame"),
    ],
)
def test_select_that_does_not_fit_is_a_config_error(
    arm_root: Path, path: str, expr: str, expected: str
) -> None:
    for make in (MapDataset, IterableDataset):
        with pytest.raises(ConfigError) as err:
            make(arm_root, fields=[Field(path, select=expr, key="k")])
        message = str(err.value)
        assert f"field 'k': select {expr!r} on column {path!r}" in message
        assert expected in message


def test_select_on_video_image_and_columnless_fields_is_refused(plain_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"column 'observation\.images\.top'.* video feature"):
        MapDataset(plain_root, fields=[Field(TOP, select="[0]")])
    with pytest.raises(ConfigError, match=r"column 'observation\.images\.front'.* image feature"):
        MapDataset(plain_root, fields=[Field(IMAGE, select="bytes")])
    with pytest.raises(ConfigError, match="field 'task': select needs a column"):
        MapDataset(plain_root, fields=[Field("task", decode=TaskDecoder(), select="[0]")])


def test_select_on_a_string_column_is_refused() -> None:
    text = Column(path="note", kind=ColumnKind.TEXT, dtype="string", shape=(1,))
    with pytest.raises(ConfigError, match="'note': the column is a string feature"):
        select_column(text, "[0]", "note")
