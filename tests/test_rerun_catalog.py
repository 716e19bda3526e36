"""Rerun catalog server as a source: ``open_dataset("rerun+http://host:port/<dataset>")``.

A real `rerun.server.Server` on 127.0.0.1 serves a folder of recordings written by
`framefeed.synth.rerun`; everything read through the server must equal what the local ``.rrd``
reader reads from the same folder: columns, ranges, rows (byte for byte) and samples.
"""

from __future__ import annotations

import pickle
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_rerun_config
from torch.utils.data import DataLoader

import framefeed
from framefeed import Field, FixedRateSampling, IndexSpec, Window
from framefeed.catalog import Dataset
from framefeed.errors import ConfigError, FormatError, StorageError
from framefeed.synth import read_marker
from framefeed.synth.rerun import (
    ACTION,
    H264,
    H264_KEYFRAME,
    JPEG,
    STATE,
    TASK,
    recording_streams,
    write_rerun_recordings,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.rerun]

CONFIG = tiny_rerun_config(num_recordings=3, min_duration_s=1.0, max_duration_s=1.5, seed=11)
TIMELINES = ("log_time", "step")
TIME_30HZ = IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0))


def _serve(datasets: dict[str, Path]) -> Any:
    rr = pytest.importorskip("rerun")
    pytest.importorskip("datafusion")
    return rr.server.Server(host="127.0.0.1", datasets={k: str(v) for k, v in datasets.items()})


@pytest.fixture(scope="module")
def rrd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("rerun")
    return write_rerun_recordings(tmp_path_factory.mktemp("rrd-catalog"), CONFIG)


@pytest.fixture(scope="module")
def server(rrd_dir: Path) -> Iterator[Any]:
    srv = _serve({"synth": rrd_dir})
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture(scope="module")
def remote(server: Any) -> Dataset:
    return framefeed.open_dataset(f"{server.url()}/synth")


@pytest.fixture(scope="module")
def local(rrd_dir: Path) -> Dataset:
    return framefeed.open_dataset(rrd_dir)


def test_the_url_names_server_and_dataset(remote: Dataset, server: Any) -> None:
    assert server.url().startswith("rerun+http://127.0.0.1:")
    assert remote.root == f"{server.url()}/synth"
    assert remote.format_name == "rerun" and remote.is_recording
    assert remote.info["rerun.server"] == server.url()
    assert remote.info["rerun.dataset"] == "synth"
    assert remote.num_segments == CONFIG.num_recordings
    meta = remote.metadata.to_pydict()
    assert meta["recording_id"] == [f"synth-{r:04d}" for r in range(CONFIG.num_recordings)]
    assert all(size > 0 for size in meta["size_bytes"])


def test_columns_ranges_and_lengths_equal_the_local_reader(remote: Dataset, local: Dataset) -> None:
    def described(ds: Dataset) -> dict[str, Any]:
        return {p: (c.kind, c.dtype, c.shape, c.info) for p, c in ds.columns.items()}

    assert described(remote) == described(local)
    assert set(remote.columns) == {JPEG, H264, H264_KEYFRAME, STATE, ACTION, TASK}
    assert remote.timelines == local.timelines
    for tl in TIMELINES:
        for got, want in zip(remote.ranges[tl], local.ranges[tl], strict=True):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(remote.lengths, local.lengths)
    assert remote.info["rerun.skipped_columns"] == local.info["rerun.skipped_columns"] == []


@pytest.mark.parametrize("timeline", TIMELINES)
def test_read_equals_the_local_reader_byte_for_byte(
    remote: Dataset, local: Dataset, timeline: str
) -> None:
    assert remote.source is not None and local.source is not None
    paths = list(remote.columns)
    for r in range(CONFIG.num_recordings):
        got = remote.source.read(r, paths, timeline)
        want = local.source.read(r, paths, timeline)
        assert list(got) == paths
        for p in paths:
            assert got[p].index.dtype == np.int64
            assert got[p].index.tobytes() == want[p].index.tobytes(), p
            assert got[p].values.type == want[p].values.type, p
            assert got[p].values.equals(want[p].values), p
        logged = recording_streams(CONFIG, r)
        np.testing.assert_array_equal(got[STATE].index, logged[STATE].index[timeline])
        assert got[TASK].values.to_pylist() == logged[TASK].values


def test_read_asks_for_the_requested_columns_only(remote: Dataset) -> None:
    assert remote.source is not None
    got = remote.source.read(1, [ACTION, ACTION], "step")
    assert list(got) == [ACTION]
    with pytest.raises(ConfigError, match=r"segment 'synth-0001': no column '/nope:Scalars"):
        remote.source.read(1, ["/nope:Scalars:scalars"], "step")
    with pytest.raises(ConfigError, match="no timeline 'frame'"):
        remote.source.read(1, [ACTION], "frame")
    with pytest.raises(IndexError):
        remote.source.read(CONFIG.num_recordings, [ACTION], "step")


def _fields() -> list[Field]:
    return [
        Field(STATE),
        Field(ACTION, window=Window(seconds=(-0.2, -0.1, 0.0, 0.1))),
        Field(JPEG),
        Field(H264),
        Field(TASK),
    ]


def _assert_same_batches(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize(
    "index", [TIME_30HZ, IndexSpec(timeline="step")], ids=["log_time-30Hz", "step"]
)
def test_samples_through_the_server_equal_samples_of_the_files(
    remote: Dataset, local: Dataset, index: IndexSpec
) -> None:
    fields = _fields()
    if index.timeline == "step":
        fields[1] = Field(ACTION, window=Window(steps=(-15, 0, 5)))
    through_server = framefeed.MapDataset(remote, index=index, fields=fields)
    from_files = framefeed.MapDataset(local, index=index, fields=fields)
    assert len(through_server) == len(from_files)
    picks = np.random.default_rng(5).permutation(len(from_files))[:48]
    a = through_server.get_batch(picks)
    b = from_files.get_batch(picks)
    _assert_same_batches(a, b)
    # The frames really are the recordings' (not, say, two equal blank batches).
    segments = a["episode_index"].tolist()
    for camera in (JPEG, H264):
        assert {read_marker(img.numpy())[0] for img in a[camera]} == set(segments)


def test_rows_logged_at_one_index_value_all_come_back(tmp_path: Path) -> None:
    """Two rows at one step: the server source keeps both, in logging order, like the files."""
    rr = pytest.importorskip("rerun")
    rec = rr.RecordingStream("dup", recording_id="dup-0")
    rec.save(str(tmp_path / "dup.rrd"))
    rec.set_log_time_enabled(False)
    for step, value in ((4, 40.0), (2, 20.0), (2, 21.0), (7, 70.0)):
        rec.set_time("step", sequence=step)
        rec.log("/arm", rr.Scalars([value]))
    rec.flush()
    rec.disconnect()
    srv = _serve({"dup": tmp_path})
    try:
        remote = framefeed.open_dataset(f"{srv.url()}/dup")
        local = framefeed.open_dataset(tmp_path)
        assert remote.source is not None and local.source is not None
        got = remote.source.read(0, ["/arm:Scalars:scalars"], "step")["/arm:Scalars:scalars"]
        want = local.source.read(0, ["/arm:Scalars:scalars"], "step")["/arm:Scalars:scalars"]
        np.testing.assert_array_equal(got.index, [2, 2, 4, 7])
        assert got.values.to_pylist() == [20.0, 21.0, 40.0, 70.0]
        np.testing.assert_array_equal(got.index, want.index)
        assert got.values.equals(want.values)
    finally:
        srv.shutdown()


def test_source_pickles_and_reconnects(remote: Dataset, local: Dataset) -> None:
    source = pickle.loads(pickle.dumps(remote.source))
    assert source._entry is None  # nothing of the connection travels
    got = source.read(2, [STATE], "log_time")[STATE]
    assert local.source is not None
    want = local.source.read(2, [STATE], "log_time")[STATE]
    np.testing.assert_array_equal(got.index, want.index)
    assert got.values.equals(want.values)


def _loader_batches(m: framefeed.MapDataset, **kwargs: Any) -> dict[str, torch.Tensor]:
    loader = DataLoader(m, batch_size=16, collate_fn=framefeed.collate, **kwargs)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in (STATE, "index", "log_time")}


def test_spawned_dataloader_workers_connect_on_their_own(remote: Dataset, local: Dataset) -> None:
    fields = [Field(STATE), Field(ACTION)]
    m = framefeed.MapDataset(remote, index=TIME_30HZ, fields=fields)
    got = _loader_batches(m, num_workers=1, multiprocessing_context="spawn")
    want = _loader_batches(framefeed.MapDataset(local, index=TIME_30HZ, fields=fields))
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_forked_workers_need_prepare(remote: Dataset, local: Dataset) -> None:
    """After ``import rerun`` a forked process cannot reach the server: a clear error, not a
    hang; with ``prepare()`` the forked workers inherit the rows and read nothing."""
    fields = [Field(STATE), Field(H264)]
    cold = framefeed.MapDataset(remote, index=TIME_30HZ, fields=fields)
    with pytest.raises(ConfigError, match=r"forked.*prepare\(\).*spawn"):
        _loader_batches(cold, num_workers=1, multiprocessing_context="fork")
    warm = framefeed.MapDataset(remote, index=TIME_30HZ, fields=fields)
    warm.prepare()
    got = _loader_batches(warm, num_workers=2, multiprocessing_context="fork")
    want = _loader_batches(framefeed.MapDataset(local, index=TIME_30HZ, fields=fields))
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_an_unreachable_server_is_a_storage_error_naming_it() -> None:
    pytest.importorskip("rerun")
    pytest.importorskip("datafusion")
    url = f"rerun+http://127.0.0.1:{_closed_port()}"
    expected = re.escape(f"{url}: cannot reach the Rerun catalog server")
    with pytest.raises(StorageError, match=expected):
        framefeed.open_dataset(f"{url}/synth")


def test_an_unknown_dataset_lists_the_datasets(server: Any) -> None:
    with pytest.raises(FormatError, match=r"no dataset 'nope'.*datasets are: synth"):
        framefeed.open_dataset(f"{server.url()}/nope")
    with pytest.raises(FormatError, match=r"the URL names no dataset.*datasets are: synth"):
        framefeed.open_dataset(server.url())


def test_bad_catalog_arguments_are_config_errors(server: Any) -> None:
    with pytest.raises(ConfigError, match=r"\?query"):
        framefeed.open_dataset(f"{server.url()}/synth?segment_id=x")
    with pytest.raises(ConfigError, match="not to a Rerun catalog server"):
        framefeed.open_dataset(f"{server.url()}/synth", storage_options={"anon": True})


def test_missing_datafusion_says_how_to_install(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datafusion", None)  # makes `import datafusion` fail
    with pytest.raises(ImportError, match=r"datafusion.*pip install 'framefeed\[rerun\]'"):
        framefeed.open_dataset(f"{server.url()}/synth")
