"""Windows (LeRobot ``delta_timestamps``): clamping, ``_is_pad`` masks, padding, shapes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ACTION_DIM, CAMERAS, FPS, STATE_DIM, TOP, WRIST, column_values, data_table

import framefeed
from framefeed import ConfigError, Field, MapDataset, Window
from framefeed.synth import read_marker

pytestmark = pytest.mark.timeout(90)

STATE_STEPS = (-3, -1, 0)
ACTION_STEPS = tuple(range(-1, 30))  # longer than any episode: both ends pad in one sample
TOP_STEPS = (-2, 0, 2)
REWARD_STEPS = (-1, 0)
DONE_STEPS = (1,)


def _seconds(steps: tuple[int, ...]) -> list[float]:
    return [s / FPS for s in steps]


DELTAS = {
    "observation.state": _seconds(STATE_STEPS),
    "action": _seconds(ACTION_STEPS),
    TOP: _seconds(TOP_STEPS),
    WRIST: [0.0],
    "next.reward": _seconds(REWARD_STEPS),
    "next.done": _seconds(DONE_STEPS),
}
WINDOWS = {
    "observation.state": STATE_STEPS,
    "action": ACTION_STEPS,
    TOP: TOP_STEPS,
    WRIST: (0,),
    "next.reward": REWARD_STEPS,
    "next.done": DONE_STEPS,
}


def _expected_window(
    frame: int, length: int, steps: tuple[int, ...]
) -> tuple[list[int], list[bool]]:
    wanted = [frame + s for s in steps]
    return [min(max(w, 0), length - 1) for w in wanted], [w < 0 or w >= length for w in wanted]


def test_windows_clamp_pad_and_repeat_boundary(rollover_root: Path) -> None:
    table = data_table(rollover_root)
    values = {k: column_values(table, k) for k in ("observation.state", "action", "next.reward")}
    values["next.done"] = column_values(table, "next.done").astype(bool)
    meta = framefeed.open_dataset(rollover_root)
    episode_of_row = column_values(table, "episode_index")
    frame_of_row = column_values(table, "frame_index")
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as ds:
        n = len(ds)
        for start in range(0, n, 32):
            idx = list(range(start, min(start + 32, n)))
            for row, s in zip(idx, ds.__getitems__(idx), strict=True):
                episode, frame = int(episode_of_row[row]), int(frame_of_row[row])
                pos = meta.position_of(episode)
                length, first = int(meta.lengths[pos]), int(meta.start_rows[pos])
                assert int(s["index"]) == row  # the sample's own keys stay per-frame
                assert s["timestamp"].shape == ()
                for key, steps in WINDOWS.items():
                    clamped, pad = _expected_window(frame, length, steps)
                    mask = s[f"{key}_is_pad"]
                    assert mask.dtype == torch.bool, key
                    assert mask.tolist() == pad, (row, key)
                    if key in CAMERAS:
                        frames = s[key] if len(steps) > 1 else s[key][None]
                        assert frames.shape[0] == len(steps)
                        got = [read_marker(f.numpy()) for f in frames]
                        assert got == [(episode, q) for q in clamped], (row, key)
                    else:
                        want = values[key][[first + q for q in clamped]]
                        got_v = s[key].numpy()
                        assert got_v.shape == want.shape, (row, key)
                        np.testing.assert_array_equal(got_v, want.astype(got_v.dtype), f"{key}")


def test_window_shapes_and_dtypes(plain_root: Path) -> None:
    with MapDataset(plain_root, delta_timestamps=DELTAS) as ds:
        s = ds[0]
        batch = framefeed.collate(ds.__getitems__([0, 1, 2]))
    assert s["observation.state"].shape == (len(STATE_STEPS), STATE_DIM)
    assert s["action"].shape == (len(ACTION_STEPS), ACTION_DIM)
    assert s["action"].dtype == torch.float32
    assert s[TOP].shape == (len(TOP_STEPS), 3, 48, 64)
    assert s[TOP].dtype == torch.uint8
    assert s[WRIST].shape == (3, 32, 48)  # a length-1 camera window is squeezed
    assert s[f"{WRIST}_is_pad"].shape == (1,)
    assert s["next.reward"].shape == (len(REWARD_STEPS),)
    assert s["next.reward"].dtype == torch.float32
    assert s["next.done"].shape == (1,)  # a length-1 numeric window keeps its T axis
    assert s["next.done"].dtype == torch.bool
    assert batch["action"].shape == (3, len(ACTION_STEPS), ACTION_DIM)
    assert batch["action_is_pad"].shape == (3, len(ACTION_STEPS))
    assert batch[TOP].shape == (3, len(TOP_STEPS), 3, 48, 64)
    assert batch[WRIST].shape == (3, 3, 32, 48)
    pad_keys = sorted(k for k in s if k.endswith("_is_pad"))
    assert pad_keys == sorted(f"{k}_is_pad" for k in DELTAS)


def test_length_one_windows(plain_root: Path) -> None:
    deltas = {"observation.state": [0.0], TOP: [0.0], "timestamp": [0.0]}
    with MapDataset(plain_root, delta_timestamps=deltas) as ds, MapDataset(plain_root) as ref:
        s, r = ds[5], ref[5]
    assert s["observation.state"].shape == (1, STATE_DIM)
    assert torch.equal(s["observation.state"][0], r["observation.state"])
    assert s["timestamp"].shape == (1,)
    assert s[TOP].shape == (3, 48, 64)
    assert torch.equal(s[TOP], r[TOP])
    assert s["observation.state_is_pad"].tolist() == [False]


def test_float32_frames_in_windows(plain_root: Path) -> None:
    deltas = {TOP: _seconds(TOP_STEPS)}
    with (
        MapDataset(plain_root, delta_timestamps=deltas, image_dtype="float32") as f32,
        MapDataset(plain_root, delta_timestamps=deltas) as u8,
    ):
        a, b = f32[0], u8[0]
    assert a[TOP].dtype == torch.float32
    assert torch.equal(a[TOP], b[TOP].float() / 255.0)
    assert torch.equal(a[f"{TOP}_is_pad"], b[f"{TOP}_is_pad"])


def _subset(sample: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {k: sample[k] for k in keys}


def test_integer_steps_equal_seconds(rollover_root: Path) -> None:
    fields = [
        Field("action", window=Window(steps=(-1, 0, 1, 5))),
        Field(TOP, window=[-2, 0, 2]),
        Field("observation.state", window=Window(seconds=(-1 / FPS, 0.0))),
        Field("index"),
    ]
    deltas = {
        "action": _seconds((-1, 0, 1, 5)),
        TOP: _seconds((-2, 0, 2)),
        "observation.state": [-1 / FPS, 0.0],
    }
    keys = [
        "action",
        TOP,
        "observation.state",
        "index",
        "action_is_pad",
        f"{TOP}_is_pad",
        "observation.state_is_pad",
    ]
    idx = [0, 1, 11, 12, 40, 41, 80, -1]
    with (
        MapDataset(rollover_root, fields=fields) as steps,
        MapDataset(rollover_root, delta_timestamps=deltas) as seconds,
    ):
        a = steps.__getitems__(idx)
        b = seconds.__getitems__(idx)
    for i, sa, sb in zip(idx, a, b, strict=True):
        assert set(sa) == set(keys)
        for key in keys:
            assert sa[key].dtype == sb[key].dtype, (i, key)
            assert torch.equal(sa[key], sb[key]), (i, key)


def test_fields_with_delta_timestamps(plain_root: Path) -> None:
    fields = [Field("action"), Field("index")]
    with MapDataset(plain_root, fields=fields, delta_timestamps={"action": [0.0, 1 / FPS]}) as ds:
        s = ds[0]
    assert s["action"].shape == (2, ACTION_DIM)
    assert s["action_is_pad"].tolist() == [False, False]


def test_delta_within_tolerance_is_rounded(plain_root: Path) -> None:
    with (
        MapDataset(plain_root, delta_timestamps={"action": [1 / FPS + 5e-5, -2 / FPS - 5e-5]}) as a,
        MapDataset(plain_root, delta_timestamps={"action": [1 / FPS, -2 / FPS]}) as b,
    ):
        assert torch.equal(a[4]["action"], b[4]["action"])


@pytest.mark.parametrize(
    ("deltas", "tolerance_s"),
    [
        ({"action": [0.5 / FPS]}, 1e-4),
        ({"action": [0.0, 0.01]}, 1e-4),
        ({TOP: [-1 / FPS, 0.4 / FPS]}, 1e-4),
        ({"action": [1 / FPS + 5e-5]}, 1e-6),
        ({"action": [math.nan]}, 1e-4),
        ({"action": [math.inf]}, 1e-4),
    ],
)
def test_delta_off_the_frame_grid_is_a_config_error(
    plain_root: Path, deltas: dict[str, list[float]], tolerance_s: float
) -> None:
    with pytest.raises(ConfigError) as err:
        MapDataset(plain_root, delta_timestamps=deltas, tolerance_s=tolerance_s)
    assert isinstance(err.value, ValueError)
    assert next(iter(deltas)) in str(err.value)


def test_unknown_delta_key_is_a_config_error(plain_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"observation\.nope"):
        MapDataset(plain_root, delta_timestamps={"observation.nope": [0.0]})
    with pytest.raises(ConfigError, match=r"observation\.state"):
        MapDataset(
            plain_root, fields=[Field("action")], delta_timestamps={"observation.state": [0.0]}
        )


def test_window_and_delta_for_one_field_conflict(plain_root: Path) -> None:
    with pytest.raises(ConfigError):
        MapDataset(
            plain_root,
            fields=[Field("action", window=[0, 1])],
            delta_timestamps={"action": [0.0]},
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"steps": (0,), "seconds": (0.0,)},
        {"steps": ()},
        {"seconds": ()},
        {"steps": 5},
        {"steps": "01"},
        {"steps": (0.5,)},
        {"steps": (2**70,)},
        {"seconds": ("a",)},
        {"seconds": 0.0},
        {"seconds": (0.0,), "tolerance_s": -1.0},
        {"seconds": (0.0,), "tolerance_s": math.nan},
    ],
)
def test_bad_windows(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="Window"):
        Window(**kwargs)


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        ({"action": ["a"]}, "numbers"),
        ({"action": [None]}, "numbers"),
        ({"action": 0.0}, "sequence"),
        ({"action": [1e20]}, "finite number"),
        ({"task": [0.0]}, "windows do not apply"),
        ([0.0], "must map keys"),
    ],
)
def test_malformed_delta_timestamps_are_config_errors(
    plain_root: Path, deltas: Any, expected: str
) -> None:
    """Values that are not lists of seconds are named, not a TypeError/OverflowError."""
    with pytest.raises(ConfigError, match=expected) as err:
        MapDataset(plain_root, delta_timestamps=deltas)
    if isinstance(deltas, dict):
        assert next(iter(deltas)) in str(err.value)


@pytest.mark.parametrize("window", [5, ["a"], [0.5], [2**70]])
def test_field_window_of_non_integers_is_a_config_error(plain_root: Path, window: Any) -> None:
    with pytest.raises(ConfigError, match=r"field 'action'.*steps"):
        MapDataset(plain_root, fields=[Field("action", window=window)])


def test_window_offsets() -> None:
    assert Window(steps=(-1, 0, 3)).offsets(30.0).tolist() == [-1, 0, 3]
    assert Window(seconds=(-0.1, 0.0, 0.5)).offsets(10.0).tolist() == [-1, 0, 5]
    assert Window(seconds=(1 / 15,)).offsets(30.0).tolist() == [2]


def test_windows_in_an_episode_subset(rollover_root: Path) -> None:
    """Clamping uses each episode's own bounds, whichever episodes are selected."""
    deltas = {"action": _seconds((-2, 0, 2)), TOP: _seconds((-1, 1))}
    with (
        MapDataset(rollover_root, delta_timestamps=deltas, episodes=[3, 1]) as sub,
        MapDataset(rollover_root, delta_timestamps=deltas) as full,
    ):
        for i in range(len(sub)):
            s = sub[i]
            ref = full[int(s["index"])]
            for key in ("action", "action_is_pad", TOP, f"{TOP}_is_pad"):
                assert torch.equal(s[key], ref[key]), (i, key)
