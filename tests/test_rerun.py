"""Rerun recordings (.rrd) as a source: written with rerun-sdk, read back through `open_dataset`.

The recordings come from `framefeed.synth.rerun`, whose every logged value is known
(`recording_streams`), so each test compares what framefeed reads with what was logged.
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest
from conftest import tiny_rerun_config

import framefeed
from framefeed.catalog import ColumnKind, Dataset, TimelineKind
from framefeed.errors import ConfigError, FormatError
from framefeed.synth import read_marker
from framefeed.synth.rerun import (
    ACTION,
    H264,
    H264_KEYFRAME,
    JPEG,
    STATE,
    TASK,
    RerunSynthConfig,
    SynthStream,
    recording_file,
    recording_streams,
    write_rerun_recordings,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.rerun]

CONFIG = tiny_rerun_config(num_recordings=3, min_duration_s=1.0, max_duration_s=1.6, seed=7)
TIMELINES = ("log_time", "step")


@pytest.fixture(scope="module")
def rrd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("rerun")
    return write_rerun_recordings(tmp_path_factory.mktemp("rrd"), CONFIG)


@pytest.fixture(scope="module")
def dataset(rrd_dir: Path) -> Dataset:
    return framefeed.open_dataset(rrd_dir)


def _expected(recording: int) -> dict[str, SynthStream]:
    return recording_streams(CONFIG, recording)


def test_detected_and_described(dataset: Dataset, rrd_dir: Path) -> None:
    assert dataset.format_name == "rerun"
    assert dataset.is_recording
    assert dataset.num_segments == CONFIG.num_recordings
    assert {t.name: t.kind for t in dataset.timelines} == {
        "log_time": TimelineKind.TIME,
        "step": TimelineKind.SEQUENCE,
    }
    meta = dataset.metadata.to_pydict()
    assert meta["recording_id"] == [f"synth-{r:04d}" for r in range(CONFIG.num_recordings)]
    assert meta["_data_path"] == [recording_file(r) for r in range(CONFIG.num_recordings)]
    assert dataset.info["rerun.skipped_columns"] == []


def test_columns_keep_rerun_paths_kinds_and_shapes(dataset: Dataset) -> None:
    cols = dataset.columns
    assert set(cols) == {JPEG, H264, H264_KEYFRAME, STATE, ACTION, TASK}
    assert cols[JPEG].kind is ColumnKind.IMAGE
    assert cols[JPEG].info["media_type"] == "image/jpeg"
    assert cols[JPEG].shape == (48, 64, 3)
    assert cols[H264].kind is ColumnKind.PACKETS
    assert cols[H264].info["codec"] == "h264"
    assert cols[H264].info["keyframe_column"] == H264_KEYFRAME
    assert cols[H264].shape == (48, 64, 3)
    assert (cols[STATE].kind, cols[STATE].shape, cols[STATE].dtype) == (
        ColumnKind.NUMERIC,
        (CONFIG.state_dim,),
        "float64",
    )
    assert cols[ACTION].shape == (CONFIG.action_dim,)
    assert (cols[H264_KEYFRAME].kind, cols[H264_KEYFRAME].shape) == (ColumnKind.NUMERIC, (1,))
    assert cols[H264_KEYFRAME].dtype == "bool"
    assert cols[TASK].kind is ColumnKind.TEXT


def test_ranges_and_lengths_match_the_logged_rows(dataset: Dataset) -> None:
    for r in range(CONFIG.num_recordings):
        streams = _expected(r)
        for tl in TIMELINES:
            first = min(int(s.index[tl].min()) for s in streams.values())
            last = max(int(s.index[tl].max()) for s in streams.values())
            assert dataset.segment_range(tl, r) == (first, last)
        assert dataset.lengths[r] == max(len(s.rows) for s in streams.values())


@pytest.mark.parametrize("timeline", TIMELINES)
def test_read_returns_exactly_the_logged_values(dataset: Dataset, timeline: str) -> None:
    assert dataset.source is not None
    for r in range(CONFIG.num_recordings):
        want = _expected(r)
        got = dataset.source.read(r, list(dataset.columns), timeline)
        assert set(got) == set(dataset.columns)
        for path, rows in got.items():
            assert rows.index.dtype == np.int64
            np.testing.assert_array_equal(rows.index, want[path].index[timeline], err_msg=path)
        for path in (STATE, ACTION):
            values = got[path].values
            assert values.type == pa.list_(pa.float64(), CONFIG.state_dim if path == STATE else 7)
            flat = values.flatten().to_numpy().reshape(len(values), -1)
            np.testing.assert_array_equal(flat, want[path].values)
        assert got[TASK].values.to_pylist() == want[TASK].values
        assert got[H264_KEYFRAME].values.to_pylist() == want[H264_KEYFRAME].values.tolist()
        assert got[JPEG].values.type == pa.binary()
        from PIL import Image

        for i, blob in enumerate(got[JPEG].values.to_pylist()):
            image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
            assert read_marker(image) == (r, i)
        _check_h264(got[H264].values.to_pylist(), r)


def _check_h264(packets: list[bytes], recording: int) -> None:
    """Annex B access units, SPS/PPS in-band on every keyframe, decoding to frames (r, i)."""
    codec = av.CodecContext.create("h264", "r")
    markers = []
    for i, packet in enumerate(packets):
        assert packet.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")), i
        keyframe = i % CONFIG.h264_gop == 0
        nal_types = {b[0] & 0x1F for b in packet.split(b"\x00\x00\x01")[1:] if b}
        assert ({7, 8, 5} <= nal_types) == keyframe, (i, nal_types)
        markers += [
            read_marker(f.to_ndarray(format="rgb24")) for f in codec.decode(av.Packet(packet))
        ]
    markers += [read_marker(f.to_ndarray(format="rgb24")) for f in codec.decode(None)]
    assert markers == [(recording, i) for i in range(len(packets))]


def test_read_only_the_requested_columns(dataset: Dataset) -> None:
    assert dataset.source is not None
    got = dataset.source.read(1, [ACTION], "step")
    assert list(got) == [ACTION]
    with pytest.raises(ConfigError, match="no column '/nope:Scalars:scalars'"):
        dataset.source.read(1, ["/nope:Scalars:scalars"], "step")
    with pytest.raises(ConfigError, match="no timeline 'frame'"):
        dataset.source.read(1, [ACTION], "frame")


def test_source_pickles_for_worker_processes(dataset: Dataset) -> None:
    source = pickle.loads(pickle.dumps(dataset.source))
    got = source.read(2, [STATE], "log_time")
    np.testing.assert_array_equal(got[STATE].index, _expected(2)[STATE].index["log_time"])


def test_single_file_is_one_segment(rrd_dir: Path) -> None:
    ds = framefeed.open_dataset(rrd_dir / recording_file(1))
    assert ds.num_segments == 1
    assert ds.segment_range("step", 0) == (0, int(_expected(1)[STATE].index["step"].max()))


def _write_by_hand(path: Path) -> None:
    """Rows logged one by one, out of order, twice at one step, and with a gap in a column."""
    import rerun as rr

    rec = rr.RecordingStream("hand", recording_id="hand-0")
    rec.save(str(path))
    rec.set_log_time_enabled(False)  # else rec.log stamps log_time with the wall clock
    for step, value in ((5, 50.0), (1, 10.0), (3, 30.0), (3, 31.0), (9, 90.0)):
        rec.set_time("step", sequence=step)
        rec.set_time("log_time", timestamp=np.datetime64(1_000 + step, "ns"))
        rec.log("/arm", rr.Scalars([value, -value]))
        if step != 3:
            rec.log("/note", rr.TextLog(f"at {step}"))
    rec.flush()
    rec.disconnect()


def test_rows_logged_out_of_order_come_back_sorted(tmp_path: Path) -> None:
    pytest.importorskip("rerun")
    _write_by_hand(tmp_path / "hand.rrd")
    ds = framefeed.open_dataset(tmp_path)
    assert ds.columns["/arm:Scalars:scalars"].shape == (2,)
    assert ds.segment_range("step", 0) == (1, 9)
    assert ds.segment_range("log_time", 0) == (1_001, 1_009)
    assert ds.source is not None
    got = ds.source.read(0, ["/arm:Scalars:scalars", "/note:TextLog:text"], "step")
    arm = got["/arm:Scalars:scalars"]
    np.testing.assert_array_equal(arm.index, [1, 3, 3, 5, 9])
    # Two rows at step 3: the later one is last, so latest-at picks it, as Rerun's queries do.
    assert [v[0] for v in arm.values.to_pylist()] == [10.0, 30.0, 31.0, 50.0, 90.0]
    note = got["/note:TextLog:text"]
    np.testing.assert_array_equal(note.index, [1, 5, 9])
    assert note.values.to_pylist() == ["at 1", "at 5", "at 9"]


def test_varying_values_per_row_is_an_error(tmp_path: Path) -> None:
    rr = pytest.importorskip("rerun")
    rec = rr.RecordingStream("hand", recording_id="ragged")
    rec.save(str(tmp_path / "ragged.rrd"))
    for step, values in ((0, [1.0, 2.0]), (1, [3.0])):
        rec.set_time("step", sequence=step)
        rec.log("/ragged", rr.Scalars(values))
    rec.flush()
    rec.disconnect()
    ds = framefeed.open_dataset(tmp_path)
    assert ds.source is not None
    with pytest.raises(FormatError, match=r"ragged\.rrd.*'/ragged:Scalars:scalars'.*row 1 holds 1"):
        ds.source.read(0, ["/ragged:Scalars:scalars"], "step")


def test_a_bad_file_names_itself(tmp_path: Path) -> None:
    pytest.importorskip("rerun")
    (tmp_path / "broken.rrd").write_bytes(b"not an rrd file")
    with pytest.raises(FormatError, match=r"broken\.rrd: not a readable Rerun recording"):
        framefeed.open_dataset(tmp_path)


def test_missing_sdk_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.rrd").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "rerun", None)  # makes `import rerun` fail
    with pytest.raises(ImportError, match=r"pip install 'framefeed\[rerun\]'"):
        framefeed.open_dataset(tmp_path)


def test_synth_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="jitter_ms"):
        RerunSynthConfig(jitter_ms=6.0)  # over half the 100 Hz period
    with pytest.raises(ConfigError, match="step_rate_hz"):
        RerunSynthConfig(state_rate_hz=200.0)
    a = recording_streams(CONFIG, 1)
    b = recording_streams(CONFIG, 1)
    for path in a:
        for tl in TIMELINES:
            np.testing.assert_array_equal(a[path].index[tl], b[path].index[tl])
            assert np.all(np.diff(a[path].index[tl]) > 0)
