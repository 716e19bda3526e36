"""Multi-rate recordings: fixed-rate grids, latest-at alignment, windows, staleness."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch.utils.data import DataLoader

import framefeed
from framefeed import ConfigError, Field, FixedRateSampling, IndexSpec, Window
from framefeed.catalog import ColumnKind, Dataset, TimelineKind
from framefeed.streams import Stream, from_streams

pytestmark = pytest.mark.timeout(120)

NS = 1_000_000_000
STATE_HZ = 100
ACTION_HZ = 10
TIMELINES = {"log_time": TimelineKind.TIME, "step": TimelineKind.SEQUENCE}


def _segment(rng: np.random.Generator, seg: int, seconds: float) -> dict[str, Stream]:
    """A 100 Hz state (value = row number + 1000 * segment) and a 10 Hz action, jittered."""
    base = seg * 100 * NS + int(rng.integers(0, NS))
    n_state = int(seconds * STATE_HZ)
    t_state = base + np.arange(n_state) * (NS // STATE_HZ) + rng.integers(0, NS // 400, n_state)
    state = (np.arange(n_state, dtype=np.float64) + 1000 * seg)[:, None].repeat(14, axis=1)
    n_act = int(seconds * ACTION_HZ)
    t_act = base + 3 * NS // 1000 + np.arange(n_act) * (NS // ACTION_HZ)
    t_act = t_act + rng.integers(-NS // 100, NS // 100, n_act)
    action = np.arange(n_act, dtype=np.float32) + 100 * seg
    return {
        "/state": Stream(values=state, index={"log_time": t_state, "step": np.arange(n_state)}),
        "/action": Stream(
            values=action, index={"log_time": t_act, "step": np.arange(n_act) * 10 + 5}
        ),
    }


def _recording(seconds: Sequence[float] = (2.0, 3.0, 1.5), seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    segs = [_segment(rng, i, s) for i, s in enumerate(seconds)]
    return from_streams(segs, timelines=TIMELINES, segment_ids=[10 + i for i in range(len(segs))])


def _brute_latest(times: np.ndarray, t: int) -> int:
    """Row of the last value at or before ``t`` (-1 if none), by a Python loop."""
    best = -1
    for i, v in enumerate(times.tolist()):
        if v <= t:
            best = i
    return best


TIME_30HZ = IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0))


def test_time_timeline_needs_fixed_rate_sampling() -> None:
    ds = _recording()
    with pytest.raises(ConfigError, match="FixedRateSampling"):
        framefeed.MapDataset(ds, index=IndexSpec(timeline="log_time"))
    with pytest.raises(ConfigError, match="sequence"):
        framefeed.MapDataset(ds, index=IndexSpec(timeline="step", sampling=FixedRateSampling(30.0)))


def test_grid_covers_each_segment_at_the_rate() -> None:
    ds = _recording()
    m = framefeed.MapDataset(ds, index=TIME_30HZ)
    start, end = ds.ranges["log_time"]
    step = round(NS / 30.0)
    expected = int(sum((end - start) // step + 1))
    assert len(m) == expected
    batch = m.get_batch(np.arange(len(m)))
    times = batch["log_time"].numpy()
    segs = batch["episode_index"].numpy()
    for pos, seg_id in enumerate(ds.segment_ids.tolist()):
        mine = times[segs == seg_id]
        assert mine[0] == start[pos]
        assert np.all(np.diff(mine) == step)
        assert mine[-1] <= end[pos] < mine[-1] + step


def test_latest_at_matches_a_brute_force_lookup() -> None:
    ds = _recording(seed=3)
    m = framefeed.MapDataset(ds, index=TIME_30HZ)
    rng = np.random.default_rng(1)
    picks = rng.choice(len(m), size=64, replace=False)
    batch = m.get_batch(picks)
    source = ds.source
    assert source is not None
    for i in range(len(picks)):
        pos = int(np.flatnonzero(ds.segment_ids == int(batch["episode_index"][i]))[0])
        rows = source.read(pos, ["/state", "/action"], "log_time")
        t = int(batch["log_time"][i])
        for key in ("/state", "/action"):
            times = rows[key].index
            want = _brute_latest(times, t)
            pad = bool(batch[f"{key}_is_pad"][i])
            assert pad == (want < 0)
            values = np.asarray(rows[key].values.to_pylist(), dtype=np.float64).reshape(
                len(times), -1
            )
            expect = values[max(want, 0)]
            got = batch[key][i].numpy().reshape(-1)
            np.testing.assert_allclose(got, expect)


def test_values_between_real_rows_hold_the_previous_row() -> None:
    """A 30 Hz grid over a 10 Hz action: three grid points share each action row."""
    ds = _recording(seconds=(3.0,))
    m = framefeed.MapDataset(ds, index=TIME_30HZ, fields=[Field("/action")])
    batch = m.get_batch(np.arange(len(m)))
    values = batch["/action"].numpy()
    pad = batch["/action_is_pad"].numpy()
    runs = np.diff(values[~pad])
    assert set(np.unique(runs).tolist()) <= {0.0, 1.0}
    assert values[~pad].max() == 29.0  # every action row is reached


def test_time_windows_are_seconds_and_steps_are_sampling_periods() -> None:
    ds = _recording()
    seconds = framefeed.MapDataset(
        ds,
        index=TIME_30HZ,
        fields=[Field("/state", window=Window(seconds=(-0.1, 0.0, 0.1)), key="s")],
    )
    steps = framefeed.MapDataset(
        ds, index=TIME_30HZ, fields=[Field("/state", window=Window(steps=(-3, 0, 3)), key="s")]
    )
    batch_s = seconds.get_batch([40])
    batch_k = steps.get_batch([40])
    # 0.1 s at 100 Hz is 10 state rows; 3 steps of 1/30 s is exactly 0.1 s as well.
    np.testing.assert_allclose(batch_s["s"].numpy(), batch_k["s"].numpy())
    row = batch_s["s"][0, :, 0].numpy()
    assert abs((row[2] - row[1]) - 10) <= 1 and abs((row[1] - row[0]) - 10) <= 1


def test_sequence_timeline_uses_steps() -> None:
    ds = _recording()
    m = framefeed.MapDataset(
        ds,
        index=IndexSpec(timeline="step"),
        fields=[Field("/action", window=Window(steps=(0, 10)))],
    )
    start, end = ds.ranges["step"]
    assert len(m) == int(sum(end - start + 1))
    b = m.get_batch([15])  # step 15 of segment 0: action rows at steps 5, 15, 25, ...
    assert b["/action"][0].tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="counts steps"):
        framefeed.MapDataset(
            ds, index=IndexSpec(timeline="step"), delta_timestamps={"/action": [0.0, 0.1]}
        )


def test_pad_and_trim_modes() -> None:
    ds = _recording()
    window = Window(seconds=(-0.2, 0.0, 0.5))
    fields = [Field("/state", window=window)]
    pad = framefeed.MapDataset(ds, index=TIME_30HZ, fields=fields)
    trim = framefeed.MapDataset(
        ds,
        index=IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0), window_mode="trim"),
        fields=fields,
    )
    assert len(trim) < len(pad)
    pb = pad.get_batch(np.arange(len(pad)))
    tb = trim.get_batch(np.arange(len(trim)))
    assert pb["/state_is_pad"].any()
    assert not tb["/state_is_pad"].any()
    start, end = ds.ranges["log_time"]
    segs = np.searchsorted(ds.segment_ids, tb["episode_index"].numpy())
    t = tb["log_time"].numpy()
    assert np.all(t - round(0.2 * NS) >= start[segs]) and np.all(t + round(0.5 * NS) <= end[segs])
    # Every trimmed sample is also a pad-mode sample with the same values.
    both = np.isin(pb["log_time"].numpy(), t)
    np.testing.assert_allclose(pb["/state"].numpy()[both], tb["/state"].numpy())


def test_empty_sample_space_names_the_window_and_a_segment() -> None:
    ds = _recording(seconds=(1.0, 1.5))
    with pytest.raises(ConfigError) as err:
        framefeed.MapDataset(
            ds,
            index=IndexSpec(
                timeline="log_time", sampling=FixedRateSampling(30), window_mode="trim"
            ),
            fields=[Field("/state", window=Window(seconds=(-1.0, 1.0)), key="long")],
        )
    message = str(err.value)
    assert "'long'" in message and "segment 11" in message and "[-1 s, 1 s]" in message


def test_staleness_marks_or_drops() -> None:
    ds = _recording()
    limit = 0.05  # the 10 Hz action is older than 50 ms about half the time
    mark = framefeed.MapDataset(ds, index=TIME_30HZ, fields=[Field("/action", max_staleness=limit)])
    plain = framefeed.MapDataset(ds, index=TIME_30HZ, fields=[Field("/action")])
    mb = mark.get_batch(np.arange(len(mark)))
    plain_pad = plain.get_batch(np.arange(len(plain)))["/action_is_pad"]
    stale = mb["/action_is_pad"] & ~plain_pad
    assert 0.2 < float(stale.float().mean()) < 0.8
    drop = framefeed.MapDataset(
        ds, index=TIME_30HZ, fields=[Field("/action", max_staleness=limit, on_stale="drop")]
    )
    assert len(drop) == int((~mb["/action_is_pad"]).sum())
    db = drop.get_batch(np.arange(len(drop)))
    assert not db["/action_is_pad"].any()
    np.testing.assert_array_equal(
        db["log_time"].numpy(), mb["log_time"].numpy()[~mb["/action_is_pad"].numpy()]
    )


def test_stale_drop_reads_its_column_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _recording()
    assert ds.source is not None
    reads: list[tuple[int, tuple[str, ...]]] = []
    real_read = ds.source.read

    def counting_read(pos: int, columns: Sequence[str], timeline: str) -> object:
        reads.append((pos, tuple(columns)))
        return real_read(pos, columns, timeline)

    monkeypatch.setattr(ds.source, "read", counting_read)
    field = Field("/action", max_staleness=0.05, on_stale="drop")
    drop = framefeed.MapDataset(ds, index=TIME_30HZ, fields=[field])
    assert sorted(reads) == [(pos, ("/action",)) for pos in range(ds.num_segments)]
    batch = drop.get_batch(np.arange(len(drop)))  # served from the check's store
    assert not batch["/action_is_pad"].any()
    assert len(reads) == ds.num_segments
    assert "_index_store" in drop.__getstate__() and drop.__getstate__()["_index_store"] is None


def test_staleness_is_refused_on_lerobot(plain_root: str) -> None:
    with pytest.raises(ConfigError, match="max_staleness applies to recordings"):
        framefeed.MapDataset(plain_root, fields=[Field("action", max_staleness=0.1)])


def test_lerobot_trim_mode_keeps_whole_windows(plain_root: str) -> None:
    deltas = {"action": [0.0, 0.1, 0.2]}
    pad = framefeed.MapDataset(plain_root, delta_timestamps=deltas)
    trim = framefeed.MapDataset(
        plain_root, delta_timestamps=deltas, index=IndexSpec(window_mode="trim")
    )
    fps = pad.dataset.fps
    lost = round(0.2 * fps)
    assert len(trim) == len(pad) - lost * pad.dataset.num_segments
    batch = trim.get_batch(np.arange(len(trim)))
    assert not batch["action_is_pad"].any()
    assert int(batch["frame_index"].min()) == 0


def test_datetime64_index_values() -> None:
    t0 = np.datetime64("2026-06-01T12:00:00", "ns")
    times = t0 + np.arange(50) * np.timedelta64(20, "ms")
    seg = {"/x": Stream(values=np.arange(50, dtype=np.int32), index={"log_time": times})}
    ds = from_streams([seg], timelines={"log_time": TimelineKind.TIME})
    m = framefeed.MapDataset(
        ds, index=IndexSpec(timeline="log_time", sampling=FixedRateSampling(10))
    )
    b = m.get_batch([0, 1, 2])
    assert b["/x"].tolist() == [0, 5, 10]
    assert int(b["log_time"][0]) == int(t0.astype(np.int64))


def test_dataloader_and_iterable_over_a_recording() -> None:
    ds = _recording()
    m = framefeed.MapDataset(ds, index=TIME_30HZ)
    loader = DataLoader(m, batch_size=16, shuffle=True, collate_fn=framefeed.collate)
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(len(m)))
    it = framefeed.IterableDataset(ds, index=TIME_30HZ, seed=4, episode_pool_size=2)
    got = sorted(int(s["index"]) for s in it)
    assert got == list(range(len(m)))


def test_from_streams_checks_its_input() -> None:
    with pytest.raises(ConfigError, match="timeline 'log_time'"):
        from_streams(
            [{"/x": Stream(values=np.zeros(3), index={"step": np.arange(3)})}],
            timelines={"log_time": TimelineKind.TIME},
        )
    with pytest.raises(ConfigError, match="2 index values for 3 rows"):
        from_streams(
            [{"/x": Stream(values=np.zeros(3), index={"step": np.arange(2)})}],
            timelines={"step": TimelineKind.SEQUENCE},
        )


def test_select_picks_nested_values_before_decoding() -> None:
    n = 40
    times = np.arange(n, dtype=np.int64) * (NS // 20)
    poses = pa.array(
        [[{"x": float(i), "y": [float(-i), 1.0]}] for i in range(n)],
        type=pa.list_(pa.struct([("x", pa.float64()), ("y", pa.list_(pa.float64()))])),
    )
    seg = {"/pose": Stream(values=poses, index={"log_time": times}, kind=ColumnKind.NUMERIC)}
    ds = from_streams([seg], timelines={"log_time": TimelineKind.TIME})
    spec = IndexSpec(timeline="log_time", sampling=FixedRateSampling(10))
    m = framefeed.MapDataset(
        ds,
        index=spec,
        fields=[
            Field("/pose", select="[0].x", key="x"),
            Field("/pose", select="[0].y", key="y", window=Window(seconds=(0.0, 0.1))),
        ],
    )
    b = m.get_batch([0, 3])
    assert b["x"].tolist() == [0.0, 6.0]
    assert b["y"].shape == (2, 2, 2)
    assert b["y"][1].tolist() == [[-6.0, 1.0], [-8.0, 1.0]]


def test_rows_whose_selection_is_empty_are_not_values() -> None:
    """``[0]`` of an empty instance list is no value: latest-at keeps the previous row."""
    times = np.arange(6, dtype=np.int64) * (NS // 10)
    data = pa.array([[1.0], [], [3.0], None, [], [6.0]], type=pa.list_(pa.float64()))
    seg = {"/g": Stream(values=data, index={"log_time": times}, kind=ColumnKind.NUMERIC)}
    ds = from_streams([seg], timelines={"log_time": TimelineKind.TIME})
    spec = IndexSpec(timeline="log_time", sampling=FixedRateSampling(10))
    m = framefeed.MapDataset(ds, index=spec, fields=[Field("/g", select="[0]")])
    b = m.get_batch(np.arange(len(m)))
    assert b["/g"].tolist() == [1.0, 1.0, 3.0, 3.0, 3.0, 6.0]
    assert not b["/g_is_pad"].any()


def test_segment_table_of_a_recording_has_timestamps() -> None:
    ds = _recording()
    table = ds.segments_table()
    assert table.schema.field("log_time/start").type == pa.timestamp("ns")
    assert table.schema.field("step/start").type == pa.int64()
    start = ds.ranges["log_time"][0]
    assert table.column("log_time/start").cast(pa.int64()).to_pylist() == start.tolist()
    late = np.datetime64(int(start[1]), "ns")
    view = ds.filter(pc.field("log_time/start") >= pa.scalar(late, pa.timestamp("ns")))
    assert view.segment_ids[view.selected_positions].tolist() == [11, 12]


def test_inspect_summarises_a_recording() -> None:
    from framefeed.summary import inspect_dataset

    text = inspect_dataset(_recording(seconds=(2.0, 3.0)))
    assert "segments  2" in text
    assert "log_time     time" in text and "segments 1.99-2.99 s" in text
    assert "step         sequence  segments 200-300 steps" in text
    assert "/state" in text and "numeric" in text


def _small(n: int = 4, start: int = 0) -> dict[str, Stream]:
    return {
        "/x": Stream(
            values=np.arange(n, dtype=np.float32),
            index={"log_time": start + np.arange(n) * 10**7, "step": np.arange(n)},
        )
    }


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: from_streams([_small()], timelines={}), "at least one timeline"),
        (lambda: from_streams([_small()], timelines={"step": "clock"}), "TimelineKind"),
        (lambda: from_streams([[1, 2]], timelines=TIMELINES), "segment 0 must map"),  # type: ignore[list-item]
        (lambda: from_streams([{"/x": np.zeros(3)}], timelines=TIMELINES), "expected a Stream"),  # type: ignore[dict-item]
        (
            lambda: from_streams([_small(), _small()], timelines=TIMELINES, segment_ids=[1, 1]),
            "repeat an id",
        ),
        (
            lambda: from_streams([_small()], timelines=TIMELINES, segment_ids=["a"]),  # type: ignore[list-item]
            "integer episode ids",
        ),
        (
            lambda: from_streams(
                [{"/y": Stream(values=[1, "a"], index={"log_time": [0, 1], "step": [0, 1]})}],
                timelines=TIMELINES,
            ),
            "mixed or unsupported types",
        ),
    ],
)
def test_from_streams_argument_errors(build: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build()  # type: ignore[operator]


def test_segment_without_a_column_names_it() -> None:
    """A segment that never logged a column: a FormatError naming it (was a KeyError)."""
    other = {"/y": Stream(values=np.zeros(2), index={"log_time": [0, 1], "step": [0, 1]})}
    rec = from_streams([_small(), other], timelines=TIMELINES, segment_ids=[3, 7])
    with (
        framefeed.MapDataset(rec, fields=[Field("/x")]) as ds,
        pytest.raises(framefeed.FormatError, match=r"segment 7 has no rows of column '/x'"),
    ):
        ds.get_batch(np.arange(len(ds)))


def test_window_beyond_the_timeline_range_is_a_config_error() -> None:
    rec = from_streams([_small()], timelines=TIMELINES)
    spec = IndexSpec(timeline="log_time", sampling=FixedRateSampling(100.0))
    with pytest.raises(ConfigError, match=r"field '/x'.*beyond the range"):
        framefeed.MapDataset(rec, index=spec, delta_timestamps={"/x": [1e12]})


def test_image_decoder_needs_a_frame_shape() -> None:
    blobs = {"/img": Stream(values=[b"a", b"b"], index={"log_time": [0, 1], "step": [0, 1]})}
    rec = from_streams([blobs], timelines=TIMELINES)
    with pytest.raises(ConfigError, match=r"'shape': \(H, W, 3\)"):
        framefeed.MapDataset(rec)


def test_select_that_leaves_no_value_names_field_column_and_expression() -> None:
    segs = [{"/pair": Stream(values=np.arange(20.0).reshape(10, 2), index={"step": np.arange(10)})}]
    ds = from_streams(segs, timelines={"step": TimelineKind.SEQUENCE})
    m = framefeed.MapDataset(
        ds, index=IndexSpec(timeline="step"), fields=[Field("/pair", select="[9]", key="far")]
    )
    with pytest.raises(framefeed.FormatError) as err:
        m[0]
    msg = str(err.value)
    assert "field 'far'" in msg and "select '[9]' of column '/pair'" in msg and "segment 0" in msg
    ok = framefeed.MapDataset(
        ds, index=IndexSpec(timeline="step"), fields=[Field("/pair", select="[1]", key="second")]
    )
    assert float(ok[3]["second"]) == 7.0
