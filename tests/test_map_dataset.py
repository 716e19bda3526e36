"""`MapDataset`: every sample matches the files, with LeRobot's dtypes and shapes."""

from __future__ import annotations

import contextlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    ACTION_DIM,
    CAMERAS,
    IMAGE,
    STATE_DIM,
    TASKS,
    TOP,
    WRIST,
    column_values,
    data_table,
    sample_ids,
)
from torch.utils.data import default_collate

import framefeed
from framefeed import ConfigError, Field, MapDataset, VideoFrameDecoder
from framefeed.synth import read_marker

pytestmark = pytest.mark.timeout(90)

CAMERA_SHAPES = {TOP: (3, 48, 64), WRIST: (3, 32, 48)}
NUMERIC_KEYS = (
    "observation.state",
    "action",
    "next.reward",
    "next.done",
    "timestamp",
    "frame_index",
    "episode_index",
    "index",
    "task_index",
)


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert torch.equal(a, b), where
    else:
        assert type(a) is type(b), where
        assert a == b, where


def _assert_same_sample(a: dict[str, Any], b: dict[str, Any], where: str = "") -> None:
    assert list(a) == list(b), where
    for key in a:
        _assert_same(a[key], b[key], f"{where} {key}")


# --- frame identity: the decoded frame is the one that was written -------------------------------


def test_every_frame_of_every_camera_is_the_right_one(rollover_root: Path) -> None:
    """Each sample's camera frames carry the (episode, frame) of the sample, across rollovers."""
    ids = sample_ids(rollover_root)
    with MapDataset(rollover_root) as ds:
        assert len(ds) == len(ids)
        for i, (episode, frame) in enumerate(ids):
            sample = ds[i]
            assert (int(sample["episode_index"]), int(sample["frame_index"])) == (episode, frame)
            for cam in CAMERAS:
                assert read_marker(sample[cam].numpy()) == (episode, frame), (i, cam)


def test_rollover_dataset_has_independent_rollovers(rollover_root: Path) -> None:
    """The fixture really exercises rollovers: several files, split at different episodes."""
    ds = framefeed.open_dataset(rollover_root)
    splits = {}
    for name, paths in [("data", ds.data_paths)] + [(k, ds.video_paths[k]) for k in CAMERAS]:
        assert len(set(paths.tolist())) >= 2, name
        splits[name] = tuple(np.flatnonzero(paths[1:] != paths[:-1]).tolist())
    assert len(set(splits.values())) >= 2, splits
    for key in CAMERAS:  # timestamps restart in a new file
        assert (ds.video_from[key] == 0.0).sum() == len(set(ds.video_paths[key].tolist()))


@pytest.mark.parametrize("fixture", ["h264_root", "bframes_root", "texture_root"])
def test_frame_identity_in_batches(fixture: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(fixture)
    cameras = framefeed.open_dataset(root).video_keys
    ids = sample_ids(root)
    order = np.random.default_rng(0).permutation(len(ids))
    with MapDataset(root) as ds:
        for start in range(0, len(order), 16):
            idx = order[start : start + 16].tolist()
            samples = ds.__getitems__(idx)
            for i, sample in zip(idx, samples, strict=True):
                for cam in cameras:
                    assert read_marker(sample[cam].numpy()) == ids[i], (i, cam)


# --- values, dtypes and shapes -------------------------------------------------------------------


def test_numeric_values_equal_parquet_rows(rollover_root: Path) -> None:
    table = data_table(rollover_root)
    expected = {key: column_values(table, key) for key in NUMERIC_KEYS}
    with MapDataset(rollover_root) as ds:
        batch = framefeed.collate(ds.__getitems__(list(range(len(ds)))))
    for key in NUMERIC_KEYS:
        got = batch[key].numpy()
        want = expected[key]
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), key)
    assert batch["index"].tolist() == list(range(len(table)))
    tasks = framefeed.open_dataset(rollover_root).tasks
    assert batch["task"] == [tasks[i] for i in expected["task_index"].tolist()]


def test_synthetic_content_formula(plain_root: Path) -> None:
    """Values are the writer's documented content (guards the comparison above)."""
    with MapDataset(plain_root) as ds:
        for i in (0, 5, len(ds) - 1):
            s = ds[i]
            e, f = int(s["episode_index"]), int(s["frame_index"])
            j = torch.arange(STATE_DIM, dtype=torch.float32)
            assert torch.equal(s["observation.state"], e * 1000 + f + j / 8)
            assert torch.equal(s["action"], -(e * 1000 + f) - torch.arange(ACTION_DIM) / 8)
            assert float(s["next.reward"]) == f / 4
            assert s["task"] == TASKS[e % len(TASKS)]
            assert float(s["timestamp"]) == pytest.approx(f / 30, abs=1e-6)


def test_sample_dtypes_and_shapes(plain_root: Path) -> None:
    with MapDataset(plain_root) as ds:
        s = ds[7]
    expected = {
        TOP: (torch.uint8, CAMERA_SHAPES[TOP]),
        WRIST: (torch.uint8, CAMERA_SHAPES[WRIST]),
        IMAGE: (torch.uint8, (3, 48, 64)),
        "observation.state": (torch.float32, (STATE_DIM,)),
        "action": (torch.float32, (ACTION_DIM,)),
        "next.reward": (torch.float32, ()),
        "next.done": (torch.bool, ()),
        "timestamp": (torch.float32, ()),
        "frame_index": (torch.int64, ()),
        "episode_index": (torch.int64, ()),
        "index": (torch.int64, ()),
        "task_index": (torch.int64, ()),
    }
    assert set(s) == {*expected, "task"}
    assert list(s)[:2] == list(CAMERAS)  # LeRobot puts the video keys first
    for key, (dtype, shape) in expected.items():
        assert s[key].dtype == dtype, key
        assert tuple(s[key].shape) == shape, key
    assert isinstance(s["task"], str)


def test_png_image_feature(plain_root: Path) -> None:
    """Image features (PNG bytes in the parquet) decode to uint8 CHW with the right marker."""
    ids = sample_ids(plain_root)
    with MapDataset(plain_root) as ds:
        samples = ds.__getitems__(list(range(len(ds))))
    for (episode, frame), s in zip(ids, samples, strict=True):
        assert s[IMAGE].dtype == torch.uint8
        assert s[IMAGE].shape == (3, 48, 64)
        assert read_marker(s[IMAGE].numpy()) == (episode, frame)


def test_done_flag_marks_last_frame(plain_root: Path) -> None:
    table = data_table(plain_root)
    done = column_values(table, "next.done")
    with MapDataset(plain_root) as ds:
        batch = framefeed.collate(ds.__getitems__(list(range(len(ds)))))
    assert batch["next.done"].dtype == torch.bool
    assert batch["next.done"].tolist() == done.astype(bool).tolist()


def test_float32_frames_are_uint8_over_255(plain_root: Path) -> None:
    idx = [0, 3, 17, 30]
    with MapDataset(plain_root) as u8, MapDataset(plain_root, image_dtype="float32") as f32:
        a = u8.__getitems__(idx)
        b = f32.__getitems__(idx)
    for sa, sb in zip(a, b, strict=True):
        for cam in (*CAMERAS, IMAGE):
            assert sb[cam].dtype == torch.float32
            assert sb[cam].shape == sa[cam].shape
            assert float(sb[cam].min()) >= 0.0 and float(sb[cam].max()) <= 1.0
            assert torch.equal(sb[cam], sa[cam].float() / 255.0)
            assert read_marker(sb[cam].numpy()) == read_marker(sa[cam].numpy())
        # non-image values are untouched
        assert torch.equal(sa["observation.state"], sb["observation.state"])
        assert sb["index"].dtype == torch.int64


# --- batches and collation -----------------------------------------------------------------------


def test_getitems_equals_getitem(rollover_root: Path) -> None:
    idx = [40, 3, 3, 0, -1, 77, 12, 55, 21, 3]
    with MapDataset(rollover_root) as ds:
        batch = ds.__getitems__(idx)
        singles = [ds[i] for i in idx]
    assert len(batch) == len(idx)
    for i, a, b in zip(idx, batch, singles, strict=True):
        _assert_same_sample(a, b, f"sample {i}")


def test_negative_and_out_of_range_indices(plain_root: Path) -> None:
    with MapDataset(plain_root) as ds:
        n = len(ds)
        _assert_same_sample(ds[-1], ds[n - 1])
        assert int(ds[-1]["index"]) == n - 1
        with pytest.raises(IndexError):
            ds[n]
        with pytest.raises(IndexError):
            ds[-n - 1]


def test_collate_matches_default_collate_and_is_zero_copy(rollover_root: Path) -> None:
    idx = [5, 60, 1, 33, 33, 80]
    with MapDataset(rollover_root) as ds:
        samples = ds.__getitems__(idx)
    ours = framefeed.collate(samples)
    ref = default_collate(samples)
    assert list(ours) == list(ref)
    for key in ref:
        _assert_same(ours[key], ref[key], key)
        if isinstance(ours[key], torch.Tensor):
            first = samples[0][key]
            assert ours[key].untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            assert ours[key].data_ptr() == first.data_ptr(), key


def test_collate_of_independent_samples_copies(plain_root: Path) -> None:
    with MapDataset(plain_root) as ds:
        samples = [ds[0], ds[9]]  # two batches of one: different storages
    ours = framefeed.collate(samples)
    ref = default_collate(samples)
    for key in ref:
        _assert_same(ours[key], ref[key], key)
    assert framefeed.collate([]) == {}


def test_collate_handles_plain_values() -> None:
    samples = [
        {"x": torch.arange(3), "n": 1, "s": "a"},
        {"x": torch.arange(3) + 3, "n": 2, "s": "b"},
    ]
    out = framefeed.collate(samples)
    ref = default_collate(samples)
    assert torch.equal(out["x"], ref["x"])
    assert torch.equal(out["n"], ref["n"])
    assert out["s"] == ref["s"] == ["a", "b"]
    # Views of one storage that are not in order must not be fused into a batch.
    base = torch.arange(12).view(4, 3)
    shuffled = [{"x": base[2]}, {"x": base[0]}]
    assert framefeed.collate(shuffled)["x"].tolist() == [[6, 7, 8], [0, 1, 2]]


def test_get_batch_is_collated(plain_root: Path) -> None:
    idx = [4, 2, 9]
    with MapDataset(plain_root) as ds:
        batch = ds.get_batch(idx)
        ref = framefeed.collate(ds.__getitems__(idx))
    assert set(batch) == set(ref)
    for key in ref:
        _assert_same(batch[key], ref[key], key)


# --- episode subsets -----------------------------------------------------------------------------


def test_episode_subset_in_dataset_order(rollover_root: Path) -> None:
    meta = framefeed.open_dataset(rollover_root)
    lengths = dict(zip(meta.segment_ids.tolist(), meta.lengths.tolist(), strict=True))
    starts = dict(zip(meta.segment_ids.tolist(), meta.start_rows.tolist(), strict=True))
    with MapDataset(rollover_root, episodes=[2, 0]) as sub, MapDataset(rollover_root) as full:
        assert len(sub) == lengths[0] + lengths[2]
        expected_rows = list(range(starts[0], starts[0] + lengths[0])) + list(
            range(starts[2], starts[2] + lengths[2])
        )
        got = framefeed.collate(sub.__getitems__(list(range(len(sub)))))
        assert got["index"].tolist() == expected_rows
        assert got["episode_index"].tolist() == [0] * lengths[0] + [2] * lengths[2]
        for i in (0, lengths[0] - 1, lengths[0], len(sub) - 1):
            _assert_same_sample(sub[i], full[expected_rows[i]], f"subset sample {i}")
            for cam in CAMERAS:
                s = sub[i]
                assert read_marker(s[cam].numpy()) == (
                    int(s["episode_index"]),
                    int(s["frame_index"]),
                )


def test_episode_subset_accepts_duplicates(plain_root: Path) -> None:
    with MapDataset(plain_root, episodes=[1, 1]) as ds:
        assert len(ds) == int(framefeed.open_dataset(plain_root).lengths[1])


def test_unknown_episode_is_a_config_error(plain_root: Path) -> None:
    with pytest.raises(ConfigError, match="99"):
        MapDataset(plain_root, episodes=[0, 99])


# --- fields and construction ---------------------------------------------------------------------


def test_custom_fields_and_keys(plain_root: Path) -> None:
    fields = [Field("observation.state", key="state"), Field(TOP, key="rgb"), Field("index")]
    with MapDataset(plain_root, fields=fields) as ds, MapDataset(plain_root) as full:
        s = ds[11]
        ref = full[11]
    assert list(s) == ["state", "rgb", "index"]
    assert torch.equal(s["state"], ref["observation.state"])
    assert torch.equal(s["rgb"], ref[TOP])
    assert torch.equal(s["index"], ref["index"])


def test_resize_through_the_frame_decoder(plain_root: Path) -> None:
    fields = [Field(TOP, decode=VideoFrameDecoder(size=(24, 40))), Field("episode_index")]
    with MapDataset(plain_root, fields=fields) as ds:
        for i in (0, 13, len(ds) - 1):
            s = ds[i]
            assert s[TOP].shape == (3, 24, 40)
            assert s[TOP].dtype == torch.uint8
            assert read_marker(s[TOP].numpy())[0] == int(s["episode_index"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_dtype": "float16"},
        {"tolerance_s": 0.0},
        {"tolerance_s": -1e-4},
        {"decode_threads": 0},
        {"fields": [Field("no.such.column")]},
        {"fields": [Field("action"), Field("observation.state", key="action")]},
        {"tolerance_s": float("nan")},
        {"tolerance_s": "a"},
        {"decode_threads": "2"},
        {"index": "trim"},
        {"fields": ["action"]},
        {"fields": []},
        {"episodes": "12"},
        {"episodes": 5},
        {"episodes": [0.5]},
        {"episodes": [None]},
        {"episodes": [2**70]},
        {"episodes": []},
    ],
)
def test_bad_arguments_are_config_errors(plain_root: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        MapDataset(plain_root, **kwargs)
    assert next(iter(kwargs)).rstrip("s") in str(err.value)  # names the argument


@pytest.mark.parametrize(
    ("decode", "path", "expected"),
    [
        (VideoFrameDecoder(), "action", "VideoFrameDecoder reads video columns"),
        (framefeed.ImageDecoder(), "action", "ImageDecoder reads image columns"),
        (framefeed.TextDecoder(), "action", "TextDecoder reads text columns"),
        (framefeed.NumericDecoder(), TOP, "NumericDecoder reads numeric columns"),
        (framefeed.NumericDecoder(), "no.column", "the dataset has none"),
        (object(), "action", "must be a decoder"),
    ],
)
def test_decoder_that_does_not_fit_its_column(
    plain_root: Path, decode: Any, path: str, expected: str
) -> None:
    """Refused when the dataset is built, not an IndexError/AssertionError at the first batch."""
    with pytest.raises(ConfigError, match=expected) as err:
        MapDataset(plain_root, fields=[Field(path, decode=decode)])
    assert repr(path) in str(err.value)


@pytest.mark.parametrize("size", [(0, 0), (-4, 8), 7, (24.5, 40)])
def test_bad_resize_is_a_config_error(size: Any) -> None:
    with pytest.raises(ConfigError, match="height, width"):
        VideoFrameDecoder(size=size)


def test_index_types(plain_root: Path) -> None:
    with MapDataset(plain_root) as ds:
        n = len(ds)
        assert int(ds[np.int64(3)]["index"]) == 3
        assert int(ds[torch.tensor(3)]["index"]) == 3
        for bad in (1.5, "3", None, slice(1, 3), [1, 2]):
            with pytest.raises(ConfigError, match="a sample index is an integer"):
                ds[bad]  # type: ignore[index]
        with pytest.raises(IndexError, match=f"out of range for an index of {n} samples"):
            ds[10**30]
        assert ds.get_batch(torch.tensor([1, 2]))["index"].tolist() == [1, 2]
        for batch in ([1.5], ["a"], [True, False], [[1, 2]], 3):
            with pytest.raises(ConfigError, match="sample numbers"):
                ds.get_batch(batch)  # type: ignore[arg-type]
        with pytest.raises(IndexError, match="out of range"):
            ds.get_batch([0, 2**64])


def test_pickle_round_trip(plain_root: Path) -> None:
    with MapDataset(plain_root, delta_timestamps={"action": [0.0, 1 / 30]}) as ds:
        before = ds[6]
        clone = pickle.loads(pickle.dumps(ds))
    with clone:
        _assert_same_sample(clone[6], before)
        assert len(clone) == len(ds)


def test_close_is_idempotent_and_reusable(plain_root: Path) -> None:
    ds = MapDataset(plain_root, decode_threads=2)
    first = ds[3]
    ds.close()
    ds.close()
    _assert_same_sample(ds[3], first)
    ds.close()
    assert "samples=" in repr(ds)


def test_engine_stats_count_frames(plain_root: Path) -> None:
    with MapDataset(plain_root, fields=[Field(TOP)], decode_threads=1) as ds:
        ds.__getitems__([0, 1, 2, 3])
        stats = ds.engine.stats
        assert stats.frames_returned == 4
        assert stats.frames_decoded >= 4
        assert stats.bytes_read > 0


# --- concurrency and remote storage --------------------------------------------------------------


def test_concurrent_batches_from_threads(rollover_root: Path) -> None:
    deltas = {TOP: [-1 / 30, 0.0], "action": [0.0, 1 / 30]}
    n = len(MapDataset(rollover_root))
    batches = [list(range(s, min(s + 9, n))) for s in range(0, n, 9)]
    # First use races: planner, column store and decoders are created by concurrent calls.
    with (
        MapDataset(rollover_root, delta_timestamps=deltas, decode_threads=2) as cold,
        ThreadPoolExecutor(4) as pool,
    ):
        parallel = list(pool.map(cold.get_batch, batches))
    with MapDataset(rollover_root, delta_timestamps=deltas, decode_threads=1) as ref:
        sequential = [ref.get_batch(b) for b in batches]
    for a, b in zip(parallel, sequential, strict=True):
        assert set(a) == set(b)
        for key in b:
            _assert_same(a[key], b[key], key)


def test_fsspec_url(plain_root: Path) -> None:
    """A dataset behind an fsspec URL (here the in-memory filesystem) gives the same samples."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/framefeed-test-{uuid.uuid4().hex}"
    for path in plain_root.rglob("*"):
        if path.is_file():
            fs.pipe(f"{base}/{path.relative_to(plain_root).as_posix()}", path.read_bytes())
    try:
        remote = framefeed.open_dataset(f"memory://{base}")
        local = framefeed.open_dataset(plain_root)
        assert remote.num_frames == local.num_frames
        assert remote.data_paths.tolist() == local.data_paths.tolist()
        with MapDataset(remote) as a, MapDataset(local) as b:
            idx = list(range(0, len(a), 3))
            for sa, sb in zip(a.__getitems__(idx), b.__getitems__(idx), strict=True):
                _assert_same_sample(sa, sb)
    finally:
        fs.rm(base, recursive=True)


def test_close_stops_decode_threads(rollover_root: Path) -> None:
    import threading

    def decode_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("framefeed-decode")]

    before = set(decode_threads())
    ds = MapDataset(rollover_root, decode_threads=2)
    ds.__getitems__(list(range(0, len(ds), 5)))
    ds.close()
    assert set(decode_threads()) <= before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_dataset_dropped_without_close_releases_its_files(rollover_root: Path) -> None:
    """Datasets that are never closed (the common case) do not leave video files open."""
    import gc

    def open_videos() -> int:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(link.startswith(str(rollover_root)) for link in links)

    before = open_videos()
    for _ in range(3):
        ds = MapDataset(rollover_root, decode_threads=2)
        ds.get_batch(list(range(0, len(ds), 7)))
        assert open_videos() > before  # cached decoders keep their files open
        del ds
        gc.collect()
    assert open_videos() == before


def test_file_url(plain_root: Path) -> None:
    with MapDataset(f"file://{plain_root}") as a, MapDataset(plain_root) as b:
        assert a.dataset.root == b.dataset.root
        _assert_same_sample(a[3], b[3])
