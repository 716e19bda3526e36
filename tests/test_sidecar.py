"""``framefeed index``: packet-index sidecars, resumable, used by readers when they match."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import framefeed
from framefeed.cli import main
from framefeed.storage import Storage
from framefeed.video.engine import build_index
from framefeed.video.sidecar import DEFAULT_DIR, from_bytes, load_sidecar, sidecar_path, to_bytes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def root(tmp_path: Path, rollover_root: Path) -> Path:
    return Path(shutil.copytree(rollover_root, tmp_path / "ds"))


def _videos(root: Path) -> list[str]:
    ds = framefeed.open_dataset(root)
    return sorted({str(p) for k in ds.video_keys for p in ds.video_paths[k].tolist()})


def test_index_command_writes_sidecars_and_resumes(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos = _videos(root)
    assert main(["index", str(root)]) == 0
    assert f"indexed {len(videos)} video files, 0 already done" in capsys.readouterr().out
    for rel in videos:
        assert (root / DEFAULT_DIR / sidecar_path(rel)).is_file()
    (root / DEFAULT_DIR / sidecar_path(videos[0])).unlink()
    assert main(["index", str(root)]) == 0  # resumes: only the missing one is redone
    assert f"indexed 1 video files, {len(videos) - 1} already done" in capsys.readouterr().out


def test_sidecar_round_trip_and_use(root: Path) -> None:
    storage = Storage(root)
    rel = _videos(root)[0]
    fresh = build_index(storage, rel, use_sidecar=False)
    size = storage.size(rel)
    back = from_bytes(to_bytes(fresh, size), fresh.path, size)
    assert back is not None
    for name in ("pts", "dts", "pos", "size", "keyframe"):
        assert np.array_equal(getattr(back, name), getattr(fresh, name))
    assert (back.codec, back.extradata, back.time_base) == (
        fresh.codec,
        fresh.extradata,
        fresh.time_base,
    )
    assert load_sidecar(storage, rel, size) is None  # nothing written yet
    main(["index", str(root)])
    assert load_sidecar(storage, rel, size) is not None
    assert load_sidecar(storage, rel, size + 1) is None  # describes another file: ignored


def test_out_folder_and_corrupt_sidecar(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sidecars"
    assert main(["index", str(root), "--out", str(out)]) == 0
    rel = _videos(root)[0]
    ds = framefeed.open_dataset(root, index_dir=out)
    size = ds.storage.size(rel)
    assert load_sidecar(ds.storage, rel, size) is not None
    (out / sidecar_path(rel)).write_bytes(b"garbage")
    assert load_sidecar(ds.storage, rel, size) is None  # unreadable: rebuilt from the video
    samples = framefeed.MapDataset(ds)
    from framefeed.synth import read_marker

    for i in range(0, len(samples), 7):
        s = samples[i]
        cam = s["observation.images.top"].numpy()
        assert read_marker(cam) == (int(s["episode_index"]), int(s["frame_index"]))
