"""The batch video engine, used directly: one decode per GOP, exact frames, bounded caches."""

from __future__ import annotations

import gc
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import FPS, TOP, WRIST

import framefeed
from framefeed import FrameTimestampError, MapDataset
from framefeed.storage import Storage
from framefeed.synth import read_marker
from framefeed.video.cache import DecoderCache
from framefeed.video.engine import FrameRequest, VideoEngine

pytestmark = pytest.mark.timeout(60)


def _file_frames(
    root: Path, key: str, file_no: int = 0
) -> tuple[str, list[tuple[int, int, float]]]:
    """A video file of ``key`` and its frames as (episode, frame, time in the file)."""
    ds = framefeed.open_dataset(root)
    path = sorted(set(ds.video_paths[key].tolist()))[file_no]
    frames = []
    for pos in np.flatnonzero(ds.video_paths[key] == path).tolist():
        start = float(ds.video_from[key][pos])
        for f in range(int(ds.lengths[pos])):
            frames.append((int(ds.segment_ids[pos]), f, start + f / FPS))
    return path, frames


def _out(n: int, height: int, width: int) -> np.ndarray:
    return np.zeros((n, 3, height, width), dtype=np.uint8)


def _gop_bound(engine: VideoEngine, path: str, times: np.ndarray) -> int:
    """Frames a keyframe-anchored decoder needs: each GOP from its keyframe to its last target."""
    index = engine.index(path)
    targets = np.unique(index.locate(times, 1e-4))
    keys = np.flatnonzero(index.keyframe)
    total = 0
    last_by_gop: dict[int, int] = {}
    for t in targets.tolist():
        key = int(keys[np.searchsorted(keys, t, side="right") - 1])
        last_by_gop[key] = max(last_by_gop.get(key, key), t)
    for key, last in last_by_gop.items():
        total += last - key + 1
    return total


def test_h264_fixtures_have_long_gops_and_b_frames(h264_root: Path, bframes_root: Path) -> None:
    for root in (h264_root, bframes_root):
        path, frames = _file_frames(root, TOP)
        with VideoEngine(Storage(root)) as engine:
            index = engine.index(path)
        assert index.codec == "h264"
        assert index.num_frames == len(frames)
        assert np.diff(np.flatnonzero(index.keyframe)).max() >= 6
        reordered = not np.array_equal(index.pts, np.sort(index.pts))
        assert reordered == (root == bframes_root)


@pytest.mark.parametrize("fixture", ["rollover_root", "h264_root", "bframes_root", "texture_root"])
def test_every_frame_of_a_file(fixture: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(fixture)
    path, frames = _file_frames(root, TOP)
    times = np.array([t for _, _, t in frames])
    out = _out(len(frames), 48, 64)
    with VideoEngine(Storage(root)) as engine:
        engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
        assert engine.stats.frames_decoded == len(frames)  # every frame decoded exactly once
        assert engine.stats.frames_returned == len(frames)
    for k, (episode, frame, _) in enumerate(frames):
        assert read_marker(out[k]) == (episode, frame)


@pytest.mark.parametrize("fixture", ["h264_root", "bframes_root"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_gop_is_decoded_once_per_batch(
    fixture: str, seed: int, request: pytest.FixtureRequest
) -> None:
    root: Path = request.getfixturevalue(fixture)
    path, frames = _file_frames(root, TOP)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(frames), size=10, replace=False)
    picks = np.concatenate([picks, picks[:5]])  # duplicates
    rng.shuffle(picks)  # unsorted
    times = np.array([frames[p][2] for p in picks.tolist()])
    out = _out(len(picks), 48, 64)
    with VideoEngine(Storage(root)) as engine:
        bound = _gop_bound(engine, path, times)
        engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
        decoded = engine.stats.frames_decoded
        assert engine.stats.frames_returned == len(picks)
    distinct = len(set(picks.tolist()))
    assert distinct <= decoded <= bound
    assert bound < len(frames)  # the test is meaningful: not the whole file
    for slot, p in enumerate(picks.tolist()):
        episode, frame, _ = frames[p]
        assert read_marker(out[slot]) == (episode, frame)


def test_requests_for_one_file_share_gops(h264_root: Path) -> None:
    """Two requests (e.g. two fields of one camera) in one batch decode a shared GOP once."""
    path, frames = _file_frames(h264_root, TOP)
    with VideoEngine(Storage(h264_root)) as engine:
        keys = np.flatnonzero(engine.index(path).keyframe)
        gaps = np.diff(np.append(keys, len(frames)))
        key = int(keys[int(np.argmax(gaps))])  # start of the longest GOP (>= 6 frames)
        a = np.array([frames[key + 1][2], frames[key + 2][2]])
        b = np.array([frames[key + 3][2], frames[key + 2][2]])
        out_a, out_b = _out(2, 48, 64), _out(2, 48, 64)
        bound = _gop_bound(engine, path, np.concatenate([a, b]))
        engine.decode(
            [
                FrameRequest(path=path, times=a, out=out_a),
                FrameRequest(path=path, times=b, out=out_b),
            ],
            tolerance_s=1e-4,
        )
        decoded = engine.stats.frames_decoded
    assert [read_marker(x)[1] for x in out_a] == [frames[key + 1][1], frames[key + 2][1]]
    assert [read_marker(x)[1] for x in out_b] == [frames[key + 3][1], frames[key + 2][1]]
    assert bound == 4
    assert decoded <= bound, f"decoded {decoded} frames; one pass over the GOP needs {bound}"


def test_two_fields_of_one_camera_share_gops(h264_root: Path) -> None:
    """The MapDataset-level version: two fields reading one camera decode each GOP once."""
    fields = [
        framefeed.Field(TOP, key="now"),
        framefeed.Field(TOP, key="before", window=[-1]),
    ]
    with MapDataset(h264_root, fields=fields, decode_threads=1) as ds:
        samples = ds.__getitems__([3, 4])
        decoded = ds.engine.stats.frames_decoded
        bound = _gop_bound(
            ds.engine, str(ds.dataset.video_paths[TOP][0]), np.array([2, 3, 4]) / FPS
        )
    assert [read_marker(s["now"].numpy())[1] for s in samples] == [3, 4]
    assert [read_marker(s["before"].numpy())[1] for s in samples] == [2, 3]
    assert decoded <= bound, f"decoded {decoded} frames; one pass over the GOP needs {bound}"


def test_slots_and_several_files(rollover_root: Path) -> None:
    path0, frames0 = _file_frames(rollover_root, TOP, 0)
    path1, frames1 = _file_frames(rollover_root, WRIST, 1)
    out_top = _out(6, 48, 64)
    out_wrist = _out(3, 32, 48)
    req_top = FrameRequest(
        path=path0,
        times=np.array([frames0[5][2], frames0[0][2], frames0[-1][2]]),
        out=out_top,
        slots=np.array([4, 1, 2]),
    )
    req_wrist = FrameRequest(
        path=path1, times=np.array([frames1[-1][2], frames1[0][2], frames1[7][2]]), out=out_wrist
    )
    with VideoEngine(Storage(rollover_root), threads=2) as engine:
        engine.decode([req_top, req_wrist], tolerance_s=1e-4)
    assert read_marker(out_top[4]) == frames0[5][:2]
    assert read_marker(out_top[1]) == frames0[0][:2]
    assert read_marker(out_top[2]) == frames0[-1][:2]
    assert not out_top[[0, 3, 5]].any()  # untouched slots
    assert [read_marker(x) for x in out_wrist] == [
        frames1[-1][:2],
        frames1[0][:2],
        frames1[7][:2],
    ]


@pytest.mark.parametrize("fixture", ["h264_root", "bframes_root", "texture_root"])
def test_threads_give_identical_bytes(fixture: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(fixture)
    path, frames = _file_frames(root, TOP)
    order = np.random.default_rng(1).permutation(len(frames))
    times = np.array([frames[p][2] for p in order.tolist()])
    outs = []
    for threads in (1, 2):
        out = _out(len(times), 48, 64)
        with VideoEngine(Storage(root), threads=threads) as engine:
            engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
            assert engine.stats.frames_decoded == len(frames)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


def test_resize_through_out_shape(plain_root: Path) -> None:
    path, frames = _file_frames(plain_root, TOP)
    times = np.array([t for _, _, t in frames[:10]])
    small, large = _out(10, 24, 32), _out(10, 96, 128)
    with VideoEngine(Storage(plain_root)) as engine:
        engine.decode([FrameRequest(path=path, times=times, out=small)], tolerance_s=1e-4)
        engine.decode([FrameRequest(path=path, times=times, out=large)], tolerance_s=1e-4)
    for k in range(10):
        assert read_marker(small[k]) == frames[k][:2]
        assert read_marker(large[k]) == frames[k][:2]
    assert small.any() and large.any()


def test_decoder_cache_is_bounded(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    cache = DecoderCache(max_decoders=1)
    files = [(k, p) for k in (TOP, WRIST) for p in sorted(set(ds.video_paths[k].tolist()))]
    assert len(files) >= 4
    with VideoEngine(Storage(rollover_root), cache=cache) as engine:
        for key, path in files:
            height, width = ds.columns[key].shape[:2]
            pos = int(np.flatnonzero(ds.video_paths[key] == path)[0])
            times = np.array([float(ds.video_from[key][pos])])
            out = _out(1, height, width)
            engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
            assert read_marker(out[0]) == (int(ds.segment_ids[pos]), 0)
            assert len(cache) <= 1
    assert len(cache) == 0  # close() clears it


def test_decoder_cache_byte_bound_and_reuse(plain_root: Path) -> None:
    path, frames = _file_frames(plain_root, TOP)
    times = np.array([frames[3][2]])
    tiny = DecoderCache(max_bytes=1)
    with VideoEngine(Storage(plain_root), cache=tiny) as engine:
        engine.decode([FrameRequest(path=path, times=times, out=_out(1, 48, 64))], tolerance_s=1e-4)
        assert len(tiny) == 0
        assert tiny.nbytes == 0
    roomy = DecoderCache()
    with VideoEngine(Storage(plain_root), cache=roomy) as engine:
        for _ in range(3):
            engine.decode(
                [FrameRequest(path=path, times=times, out=_out(1, 48, 64))], tolerance_s=1e-4
            )
        assert len(roomy) == 1  # one decoder, reused
        assert roomy.nbytes > 0


def test_index_cache_is_bounded(rollover_root: Path) -> None:
    ds = framefeed.open_dataset(rollover_root)
    paths = sorted(set(ds.video_paths[TOP].tolist()))
    cache = DecoderCache(max_indexes=1)
    with VideoEngine(Storage(rollover_root), cache=cache) as engine:
        first = engine.index(paths[0])
        assert engine.index(paths[0]) is first
        engine.index(paths[1])
        assert engine.index(paths[0]) is not first  # evicted, rebuilt


def test_tolerance_is_strict(plain_root: Path) -> None:
    path, frames = _file_frames(plain_root, TOP)
    with VideoEngine(Storage(plain_root)) as engine:
        out = _out(1, 48, 64)
        engine.decode(
            [FrameRequest(path=path, times=np.array([frames[4][2] + 5e-5]), out=out)],
            tolerance_s=1e-4,
        )
        assert read_marker(out[0]) == frames[4][:2]
        with pytest.raises(FrameTimestampError) as err:
            engine.decode(
                [FrameRequest(path=path, times=np.array([frames[4][2] + 0.5 / FPS]), out=out)],
                tolerance_s=1e-4,
            )
        assert path in str(err.value)
        with pytest.raises(FrameTimestampError, match="episode 7"):
            engine.decode(
                [
                    FrameRequest(
                        path=path,
                        times=np.array([frames[-1][2] + 10.0]),
                        out=out,
                        describe=lambda i: "episode 7",
                    )
                ],
                tolerance_s=1e-4,
            )


def test_bad_requests(plain_root: Path) -> None:
    path, frames = _file_frames(plain_root, TOP)
    with pytest.raises(ValueError):
        VideoEngine(Storage(plain_root), threads=0)
    with VideoEngine(Storage(plain_root)) as engine:
        times = np.array([frames[0][2]])
        with pytest.raises(ValueError):
            engine.decode(
                [FrameRequest(path=path, times=times, out=np.zeros((1, 48, 64, 3), np.uint8))],
                tolerance_s=1e-4,
            )
        with pytest.raises(ValueError):
            engine.decode(
                [FrameRequest(path=path, times=times, out=np.zeros((1, 3, 48, 64), np.float32))],
                tolerance_s=1e-4,
            )
        engine.decode(
            [FrameRequest(path=path, times=np.array([]), out=_out(0, 48, 64))], tolerance_s=1e-4
        )
        assert engine.stats.frames_decoded == 0


def test_close_is_idempotent(plain_root: Path) -> None:
    path, frames = _file_frames(plain_root, TOP)
    engine = VideoEngine(Storage(plain_root), threads=2)
    times = np.array([t for _, _, t in frames[:6]])
    out = _out(6, 48, 64)
    engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
    engine.close()
    engine.close()
    out2 = _out(6, 48, 64)
    engine.decode([FrameRequest(path=path, times=times, out=out2)], tolerance_s=1e-4)
    engine.close()
    assert np.array_equal(out, out2)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds_under(root: Path) -> int:
    """Descriptors of this process open on files under ``root``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(root))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_engine_dropped_without_close_releases_its_files(plain_root: Path) -> None:
    """Cached decoders hold a descriptor of their file; dropping the engine releases them."""
    path, frames = _file_frames(plain_root, TOP)
    times = np.array([t for _, _, t in frames[:4]])
    before = _fds_under(plain_root)
    for _ in range(3):
        engine = VideoEngine(Storage(plain_root), threads=1)
        engine.decode([FrameRequest(path=path, times=times, out=_out(4, 48, 64))], tolerance_s=1e-4)
        assert _fds_under(plain_root) > before  # the idle decoder keeps its file open
        del engine
        gc.collect()
    assert _fds_under(plain_root) == before


def test_close_stops_fetch_threads(plain_root: Path) -> None:
    """Remote storage fetches a batch's byte ranges on threads of their own; close stops them."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/framefeed-test-{uuid.uuid4().hex}"
    for file in plain_root.rglob("*.mp4"):
        fs.pipe(f"{base}/{file.relative_to(plain_root).as_posix()}", file.read_bytes())

    def fetch_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("framefeed-fetch")}

    path, frames = _file_frames(plain_root, TOP)
    times = np.array([t for _, _, t in frames[::4]])
    before = fetch_threads()
    try:
        engine = VideoEngine(Storage(f"memory://{base}"), threads=2)
        out = _out(len(times), 48, 64)
        engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
        assert fetch_threads() - before  # the batch's ranges were fetched on threads
        engine.close()
        assert not fetch_threads() - before
    finally:
        fs.rm(base, recursive=True)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_cached_decoders_start_no_threads(rollover_root: Path) -> None:
    """A single-threaded engine decodes in the caller's thread; idle decoders own no threads.

    Every cached decoder that held its own pool (for example FFmpeg's scaler with automatic
    threads, one thread per core) would multiply threads by cores x cached decoders x workers.
    """
    ds = framefeed.open_dataset(rollover_root)
    files = [(k, p) for k in (TOP, WRIST) for p in sorted(set(ds.video_paths[k].tolist()))]
    before = _os_threads()
    with VideoEngine(Storage(rollover_root), threads=1, codec_threads=1) as engine:
        for key, path in files:
            height, width = ds.columns[key].shape[:2]
            pos = int(np.flatnonzero(ds.video_paths[key] == path)[0])
            out = _out(2, height, width)
            times = float(ds.video_from[key][pos]) + np.array([0.0, 1.0]) / FPS
            engine.decode([FrameRequest(path=path, times=times, out=out)], tolerance_s=1e-4)
        assert len(engine.cache) == len(files)
        grown = _os_threads() - before
    assert grown < len(files), f"{grown} new OS threads for {len(files)} cached decoders"
