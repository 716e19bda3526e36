"""Samples of local Rerun recordings through `MapDataset`, checked against the values logged.

The recordings come from `framefeed.synth.rerun`, whose logged rows are known exactly
(`recording_streams`). For every grid point the expected row of a column is computed here,
independently of framefeed: latest-at (the last row at or before the clamped index value), a pad
flag where the point leaves the segment or precedes the column's first row. Grid points fall
between real rows almost everywhere (``log_time`` stamps carry jitter, the cameras and the action
are slower than the grid), so these tests check values held from the previous row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_rerun_config

import framefeed
from framefeed import Field, FixedRateSampling, IndexSpec, Window
from framefeed.catalog import Dataset
from framefeed.synth import read_marker
from framefeed.synth.rerun import (
    ACTION,
    H264,
    JPEG,
    STATE,
    TASK,
    SynthStream,
    recording_streams,
    write_rerun_recordings,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.rerun]

CONFIG = tiny_rerun_config(num_recordings=2, min_duration_s=1.2, max_duration_s=1.8, seed=3)
NS = 1_000_000_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    pytest.importorskip("rerun")
    root: Path = write_rerun_recordings(tmp_path_factory.mktemp("rrd-samples"), CONFIG)
    return framefeed.open_dataset(root)


def _span(streams: dict[str, SynthStream], timeline: str) -> tuple[int, int]:
    """First and last index value of a recording over every column logged."""
    return (
        min(int(s.index[timeline].min()) for s in streams.values()),
        max(int(s.index[timeline].max()) for s in streams.values()),
    )


def _expected_rows(
    streams: dict[str, SynthStream], path: str, timeline: str, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Latest-at row of ``path`` at each ``t`` (clamped into the recording) and the pad flag."""
    lo, hi = _span(streams, timeline)
    index = streams[path].index[timeline]
    row = np.searchsorted(index, np.clip(t, lo, hi), side="right") - 1
    pad = (t < lo) | (t > hi) | (row < 0)
    return np.maximum(row, 0), pad


def _markers(images: torch.Tensor) -> list[tuple[int, int]]:
    return [read_marker(img.numpy()) for img in images]


def _check_samples(
    m: framefeed.MapDataset, timeline: str, step: int, action_offsets: np.ndarray
) -> None:
    batch = m.get_batch(np.arange(len(m)))
    segments = batch["episode_index"].numpy()
    times = batch[timeline].numpy()
    total = 0
    between = 0
    for r in range(CONFIG.num_recordings):
        streams = recording_streams(CONFIG, r)
        lo, hi = _span(streams, timeline)
        sel = np.flatnonzero(segments == r)
        t = times[sel]
        np.testing.assert_array_equal(t, lo + step * np.arange((hi - lo) // step + 1))
        total += len(t)
        between += int(np.sum(~np.isin(t, streams[ACTION].index[timeline])))

        row, pad = _expected_rows(streams, STATE, timeline, t)
        np.testing.assert_array_equal(batch[STATE].numpy()[sel], streams[STATE].values[row])
        np.testing.assert_array_equal(batch[f"{STATE}_is_pad"].numpy()[sel], pad)

        tw = t[:, None] + action_offsets[None, :]
        row, pad = _expected_rows(streams, ACTION, timeline, tw)
        got = batch[ACTION].numpy()[sel]
        assert got.shape == (len(sel), len(action_offsets), CONFIG.action_dim)
        np.testing.assert_array_equal(got, streams[ACTION].values[row])
        np.testing.assert_array_equal(batch[f"{ACTION}_is_pad"].numpy()[sel], pad)
        assert pad.any() and not pad.all()  # the window leaves the recordings at their ends

        for camera in (JPEG, H264):
            row, pad = _expected_rows(streams, camera, timeline, t)
            images = batch[camera][torch.from_numpy(sel)]
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 48, 64)
            assert _markers(images) == [(r, int(i)) for i in row], camera
            np.testing.assert_array_equal(batch[f"{camera}_is_pad"].numpy()[sel], pad)

        row, _ = _expected_rows(streams, TASK, timeline, t)
        assert [batch[TASK][i] for i in sel] == [streams[TASK].values[i] for i in row]
    assert len(m) == total
    assert between > 0.8 * total  # most grid points lie between two action rows


def test_fixed_rate_samples_on_the_time_timeline_hold_the_logged_values(dataset: Dataset) -> None:
    offsets = (-0.25, -0.1, 0.0, 0.05)
    m = framefeed.MapDataset(
        dataset,
        index=IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0)),
        fields=[
            Field(STATE),
            Field(ACTION, window=Window(seconds=offsets)),
            Field(JPEG),
            Field(H264),
            Field(TASK),
        ],
    )
    step = FixedRateSampling(30.0).step_ns
    _check_samples(m, "log_time", step, np.asarray([round(s * NS) for s in offsets]))


def test_every_step_of_the_sequence_timeline_holds_the_logged_values(dataset: Dataset) -> None:
    offsets = (-15, 0, 5)
    m = framefeed.MapDataset(
        dataset,
        index=IndexSpec(timeline="step"),
        fields=[
            Field(STATE),
            Field(ACTION, window=Window(steps=offsets)),
            Field(JPEG),
            Field(H264),
            Field(TASK),
        ],
    )
    _check_samples(m, "step", 1, np.asarray(offsets))


def test_trimmed_windows_stay_inside_each_recording(dataset: Dataset) -> None:
    """``window_mode="trim"``: only samples whose whole action window lies in the recording."""
    offsets = (-0.25, 0.0, 0.25)
    m = framefeed.MapDataset(
        dataset,
        index=IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0), window_mode="trim"),
        fields=[Field(ACTION, window=Window(seconds=offsets))],
    )
    batch = m.get_batch(np.arange(len(m)))
    assert not batch[f"{ACTION}_is_pad"].any()
    segments = batch["episode_index"].numpy()
    times = batch["log_time"].numpy()
    for r in range(CONFIG.num_recordings):
        streams = recording_streams(CONFIG, r)
        lo, hi = _span(streams, "log_time")
        t = times[segments == r]
        assert t.min() - round(0.25 * NS) >= lo and t.max() + round(0.25 * NS) <= hi
        tw = t[:, None] + np.asarray([round(s * NS) for s in offsets])[None, :]
        row, pad = _expected_rows(streams, ACTION, "log_time", tw)
        assert not pad.any()
        np.testing.assert_array_equal(
            batch[ACTION].numpy()[segments == r], streams[ACTION].values[row]
        )
