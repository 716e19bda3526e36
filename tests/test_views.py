"""Views over segment metadata (filter, select, save, reopen) and mixtures of datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import ACTION_DIM, TOP, WRIST
from torch.utils.data import DataLoader

import framefeed
from framefeed import ConfigError, Field, FormatError, Mixture, MixturePart, VideoFrameDecoder

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def ds(rollover_root: Path) -> framefeed.Dataset:
    return framefeed.open_dataset(rollover_root)


def _served_episodes(dataset: framefeed.Dataset) -> list[int]:
    m = framefeed.MapDataset(dataset, fields=[Field("episode_index")])
    return sorted(set(m.get_batch(np.arange(len(m)))["episode_index"].tolist()))


def test_segments_table_describes_every_segment(ds: framefeed.Dataset) -> None:
    table = ds.segments_table()
    assert table.num_rows == ds.num_segments
    for name in ("episode_index", "length", "tasks", "duration_s", "data/path"):
        assert name in table.column_names
    assert f"videos/{TOP}/path" in table.column_names
    assert not [c for c in table.column_names if c.startswith("_")]
    np.testing.assert_allclose(
        table.column("duration_s").to_numpy(), ds.lengths / ds.fps, rtol=1e-12
    )


def test_filter_by_expression_serves_only_matching_episodes(ds: framefeed.Dataset) -> None:
    cut = int(np.median(ds.lengths))
    view = ds.filter(pc.field("length") > cut)
    expected = sorted(ds.segment_ids[ds.lengths > cut].tolist())
    assert 0 < len(expected) < ds.num_segments
    assert _served_episodes(view) == expected
    assert len(framefeed.MapDataset(view)) == int(ds.lengths[ds.lengths > cut].sum())
    text = repr(view)
    assert f"{len(expected)} of {ds.num_segments} segments" in text and "length" in text


def test_views_compose_and_sql_agrees_with_expressions(ds: framefeed.Dataset) -> None:
    pytest.importorskip("duckdb")
    by_expr = ds.filter(pc.field("length") >= 14).filter(
        pc.equal(pc.bit_wise_and(pc.field("episode_index"), 1), 0)
    )
    by_sql = ds.filter(sql="length >= 14").filter(sql="episode_index % 2 = 0")
    assert by_expr.selected_positions.tolist() == by_sql.selected_positions.tolist()
    ok = (ds.lengths >= 14) & (ds.segment_ids % 2 == 0)
    assert _served_episodes(by_sql) == sorted(ds.segment_ids[ok].tolist())
    assert len(repr(by_sql).splitlines()) == 3  # header and one line per step
    with pytest.raises(ConfigError, match="no_such_column"):
        ds.filter(sql="no_such_column > 3")


def test_bad_filters_are_clear(ds: framefeed.Dataset) -> None:
    with pytest.raises(ConfigError, match=r"pyarrow\.compute expression"):
        ds.filter("length > 3")
    with pytest.raises(ConfigError, match="cannot evaluate"):
        ds.filter(pc.field("nope") > 1)
    with pytest.raises(ConfigError, match="exactly one"):
        ds.filter()


def test_user_metadata_joins_by_episode(ds: framefeed.Dataset) -> None:
    ids = ds.segment_ids.tolist()
    success = pa.table({"episode_index": ids[:4], "success": [True, False, True, False]})
    joined = ds.with_metadata(success)
    assert joined.segments_table().column("success").to_pylist()[:4] == [True, False, True, False]
    assert joined.segments_table().column("success").null_count == ds.num_segments - 4
    view = joined.filter(pc.field("success"))
    assert _served_episodes(view) == [ids[0], ids[2]]
    with pytest.raises(ConfigError, match="repeats"):
        ds.with_metadata(pa.table({"episode_index": [0, 0], "x": [1, 2]}))


def test_select_episodes_and_frame_ranges(ds: framefeed.Dataset) -> None:
    a, b = ds.segment_ids[:2].tolist()
    view = ds.select([a, b], frames={b: (3, 7)})
    m = framefeed.MapDataset(view, fields=[Field("episode_index"), Field("frame_index")])
    batch = m.get_batch(np.arange(len(m)))
    eps = batch["episode_index"].numpy()
    frames = batch["frame_index"].numpy()
    assert frames[eps == b].tolist() == [3, 4, 5, 6]
    assert frames[eps == a].tolist() == list(range(int(ds.lengths[0])))
    assert f"{int(ds.lengths[0]) + 4} frames" in repr(view)
    narrower = view.select(frames={b: (5, 20)})
    nb = framefeed.MapDataset(narrower, fields=[Field("frame_index"), Field("episode_index")])
    got = nb.get_batch(np.arange(len(nb)))
    assert got["frame_index"][got["episode_index"] == b].tolist() == [5, 6]
    with pytest.raises(ConfigError, match="not in this view"):
        view.select([int(ds.segment_ids[3])])
    with pytest.raises(ConfigError, match="not in this view"):
        framefeed.MapDataset(view, episodes=[int(ds.segment_ids[3])])


def test_saved_views_reopen_by_name(ds: framefeed.Dataset, tmp_path: Path) -> None:
    a, b = ds.segment_ids[1:3].tolist()
    view = ds.filter(pc.field("episode_index").isin([a, b])).select(frames={a: (0, 5)})
    path = view.save_view("two-episodes", folder=tmp_path)
    record = json.loads(Path(path).read_text())
    assert record["segments"] == [a, b] and record["frames"] == {str(a): [0, 5]}
    again = framefeed.open_view("two-episodes", folder=tmp_path)
    assert again.selected_positions.tolist() == view.selected_positions.tolist()
    m1 = framefeed.MapDataset(view, fields=[Field("index")])
    m2 = framefeed.MapDataset(again, fields=[Field("index")])
    assert m1.get_batch(range(len(m1)))["index"].tolist() == (
        m2.get_batch(range(len(m2)))["index"].tolist()
    )
    assert "saved view 'two-episodes'" in repr(again)
    with pytest.raises(FormatError, match="no saved view"):
        framefeed.open_view("missing", folder=tmp_path)
    with pytest.raises(ConfigError, match="plain file name"):
        view.save_view("../escape", folder=tmp_path)
    record["version"] = "v9"
    Path(path).write_text(json.dumps(record))
    with pytest.raises(FormatError, match="re-create the view"):
        framefeed.open_view(path)


def test_views_work_with_iterable_datasets(ds: framefeed.Dataset) -> None:
    view = ds.select(ds.segment_ids[::2].tolist())
    it = framefeed.IterableDataset(view, fields=[Field("episode_index")], seed=1)
    got = sorted({int(s["episode_index"]) for s in it})
    assert got == sorted(ds.segment_ids[::2].tolist())


def test_mixture_renames_keys_and_draws_by_weight(rollover_root: Path, plain_root: Path) -> None:
    size = (32, 48)
    first = framefeed.MapDataset(
        rollover_root,
        fields=[Field(TOP, decode=VideoFrameDecoder(size=size)), Field("action")],
    )
    second = framefeed.MapDataset(
        plain_root,
        fields=[
            Field(WRIST, decode=VideoFrameDecoder(size=size), key="cam_high"),
            Field("action"),
        ],
    )
    mix = Mixture(
        [
            MixturePart(dataset=first, weight=3.0),
            MixturePart(dataset=second, weight=1.0, rename={"cam_high": TOP}),
        ]
    )
    assert len(mix) == len(first) + len(second)
    assert set(mix.keys) == {TOP, "action"}
    sampler = mix.sampler(num_samples=400, seed=0)
    loader = DataLoader(mix, batch_size=50, sampler=sampler, collate_fn=framefeed.collate)
    sources = []
    for batch in loader:
        assert batch[TOP].shape[1:] == (3, *size) and batch[TOP].dtype == torch.uint8
        assert batch["action"].shape[1:] == (ACTION_DIM,)
        sources.append(batch["source"])
    share = float(torch.cat(sources).float().mean())
    assert 0.15 < share < 0.35  # weight 1 of 4
    # Values match the parts' own samples, in the batch's order.
    picks = [len(first) + 2, 0, len(first), 5]
    batch = mix.get_batch(picks)
    assert batch["source"].tolist() == [1, 0, 1, 0]
    own = second.get_batch([2, 0])
    torch.testing.assert_close(batch[TOP][0], own["cam_high"][0])
    torch.testing.assert_close(batch["action"][2], own["action"][1])


def test_mixture_key_checks(rollover_root: Path, plain_root: Path) -> None:
    a = framefeed.MapDataset(rollover_root, fields=[Field("action"), Field(TOP)])
    b = framefeed.MapDataset(plain_root, fields=[Field("action")])
    with pytest.raises(ConfigError, match="keys='common'"):
        Mixture([MixturePart(dataset=a), MixturePart(dataset=b)])
    common = Mixture([MixturePart(dataset=a), MixturePart(dataset=b)], keys="common")
    assert common.keys == ["action"]
    with pytest.raises(ConfigError, match="does not produce"):
        Mixture([MixturePart(dataset=b, rename={"nope": "x"})])
    c = framefeed.MapDataset(plain_root, fields=[Field("action"), Field(WRIST, key=TOP)])
    shapes = Mixture([MixturePart(dataset=a), MixturePart(dataset=c)])
    with pytest.raises(ConfigError, match="shapes"):
        shapes.get_batch([0, len(a)])


def test_mixture_argument_errors(plain_root: Path) -> None:
    a = framefeed.MapDataset(plain_root, fields=[Field("action"), Field("observation.state")])
    with pytest.raises(ConfigError, match=r"two keys are called \['observation\.state'\]"):
        # 'action' would silently overwrite 'observation.state' in every sample
        Mixture([MixturePart(dataset=a, rename={"action": "observation.state"})])
    b = framefeed.MapDataset(plain_root, fields=[Field("next.reward")])
    with pytest.raises(ConfigError, match="no key in common"):
        Mixture([MixturePart(dataset=a), MixturePart(dataset=b)], keys="common")
    with pytest.raises(ConfigError, match="MixturePart"):
        Mixture([a])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="MixturePart"):
        Mixture([MixturePart(dataset=str(plain_root))])  # type: ignore[arg-type]


def test_mixture_indices(plain_root: Path) -> None:
    a = framefeed.MapDataset(plain_root, fields=[Field("index")], episodes=[0])
    m = Mixture([MixturePart(dataset=a), MixturePart(dataset=a)])
    n = len(m)
    assert int(m[-1]["source"]) == 1
    assert int(m[-1]["index"]) == int(m[n - 1]["index"])
    with pytest.raises(IndexError, match=f"sample {n} out of range"):
        m[n]
    with pytest.raises(ConfigError, match="a sample index is an integer"):
        m[1.5]  # type: ignore[index]
    empty = m.get_batch([])
    assert empty["index"].shape == (0,)
    assert empty["source"].shape == (0,)


def test_select_argument_errors(ds: framefeed.Dataset, tmp_path: Path) -> None:
    first = int(ds.segment_ids[0])
    length = int(ds.lengths[0])
    with pytest.raises(ConfigError, match="integer episode ids"):
        ds.select(episodes=["a"])
    with pytest.raises(ConfigError, match="list of episode ids"):
        ds.select(episodes=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"maps episode ids to \(start, stop\)"):
        ds.select(frames=[(0, 1)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\(start, stop\) in whole frames"):
        ds.select(frames={first: 5})  # type: ignore[dict-item]
    # a range past the episode's end used to leave the episode silently empty
    with pytest.raises(ConfigError, match=f"episode {first} has {length} frames"):
        ds.select(frames={first: (length, length + 10)})
    with pytest.raises(ConfigError, match="no samples to serve from this view"):
        framefeed.MapDataset(ds.filter(pc.field("length") > 10**6))
    (tmp_path / "file").write_text("")
    with pytest.raises(framefeed.StorageError, match="cannot save view"):
        ds.select(episodes=[first]).save_view("v", folder=tmp_path / "file" / "sub")


def test_with_metadata_needs_a_table_of_integer_ids(ds: framefeed.Dataset) -> None:
    with pytest.raises(ConfigError, match=r"pyarrow\.Table"):
        ds.with_metadata({"episode_index": [0]})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="integer segment ids"):
        ds.with_metadata(pa.table({"episode_index": ["a"], "x": [1]}))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "2", True])
def test_mixture_part_weight_is_checked_when_made(plain_root: Path, weight: Any) -> None:
    ds = framefeed.MapDataset(plain_root)
    with pytest.raises(ConfigError, match="MixturePart weight must be"):
        MixturePart(dataset=ds, weight=weight)
