"""The ``framefeed`` command: ``inspect`` and ``demo``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAMERAS, TOP, WRIST, copy_dataset, read_info, write_info

import framefeed
from framefeed.cli import main

pytestmark = pytest.mark.timeout(60)


def _camera_line(out: str, key: str) -> str:
    lines = [line for line in out.splitlines() if line.strip().startswith(key + " ")]
    assert len(lines) == 1, out
    return lines[0]


def test_inspect_prints_a_summary(rollover_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(rollover_root)]) == 0
    out = capsys.readouterr().out
    ds = framefeed.open_dataset(rollover_root)
    assert str(rollover_root) in out
    assert "lerobot v3.0" in out
    assert re.search(rf"episodes\s+{ds.num_segments}\b", out)
    assert re.search(rf"frames\s+{ds.num_frames}\b", out)
    assert re.search(r"fps\s+30\b", out)
    for task in ds.tasks:
        assert task in out
    for col in ds.columns.values():
        if col.path in CAMERAS:
            continue
        line = next(x for x in out.splitlines() if x.split() and x.split()[0] == col.path)
        assert col.dtype in line
        assert str(list(col.shape)) in line
    data_files = len(set(ds.data_paths.tolist()))
    assert re.search(rf"data\s+{data_files} parquet files", out)
    for key, size in ((TOP, "64x48"), (WRIST, "48x32")):
        line = _camera_line(out, key)
        assert size in line
        assert f"{len(set(ds.video_paths[key].tolist()))} files" in line
        assert re.search(r"GOP max 2\b", line), line


def test_inspect_names_the_codec(rollover_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The camera line names the codec (as in info.json), not the FFmpeg decoder used."""
    assert main(["inspect", str(rollover_root)]) == 0
    out = capsys.readouterr().out
    assert read_info(rollover_root)["features"][TOP]["info"]["video.codec"] == "av1"
    for key in CAMERAS:
        line = _camera_line(out, key)
        assert re.search(r"\bav1\b", line), line


def test_inspect_h264_camera(h264_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(h264_root)]) == 0
    out = capsys.readouterr().out
    line = _camera_line(out, TOP)
    assert re.search(r"\bh264\b", line), line
    assert "64x48" in line
    assert re.search(r"GOP max 8\b", line), line


def test_inspect_without_video(rollover_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--no-video", str(rollover_root)]) == 0
    out = capsys.readouterr().out
    assert "GOP" not in out
    assert "64x48" in _camera_line(out, TOP)
    assert "av1" in _camera_line(out, TOP)


def test_inspect_bad_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-dataset"
    assert main(["inspect", str(missing)]) == 1
    captured = capsys.readouterr()
    assert "error" in captured.err
    assert str(missing) in captured.err
    assert captured.out == ""


def test_inspect_old_format(
    tmp_path: Path, plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_dataset(plain_root, tmp_path / "ds", meta_only=True)
    info = read_info(root)
    info["codebase_version"] = "v2.1"
    write_info(root, info)
    assert main(["inspect", "--no-video", str(root)]) == 1
    err = capsys.readouterr().err
    assert "v2.1" in err
    assert "info.json" in err


@pytest.mark.parametrize("missing", ["data", "video"])
def test_inspect_missing_file(
    tmp_path: Path, plain_root: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """A dataset with a missing file is reported as an error (status 1), not a traceback."""
    root = copy_dataset(plain_root, tmp_path / "ds")
    rel = (
        "data/chunk-000/file-000.parquet"
        if missing == "data"
        else f"videos/{TOP}/chunk-000/file-000.mp4"
    )
    (root / rel).unlink()
    assert main(["inspect", str(root)]) == 1
    err = capsys.readouterr().err
    assert "error" in err
    assert str(root / rel) in err


def test_usage_errors_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.timeout(150)
def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "demo"
    rc = main(["demo", "--root", str(root), "--episodes", "3", "--epochs", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert re.search(r"[\d.]+ samples/s", captured.out), captured.out
    assert framefeed.open_dataset(root).num_segments == 3


def test_module_entry_point(rollover_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "framefeed.cli", "inspect", "--no-video", str(rollover_root)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "episodes" in proc.stdout


def test_demo_refuses_a_folder_that_is_not_a_demo_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --root`` replaces the folder's contents: a folder of other files stays intact."""
    root = tmp_path / "precious"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    assert main(["demo", "--root", str(root), "--episodes", "2"]) == 1
    err = capsys.readouterr().err
    assert str(root) in err
    assert "new or empty folder" in err
    assert (root / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("option", "value"), [("--batch-size", "0"), ("--workers", "-1"), ("--epochs", "0")]
)
def test_demo_bad_options_exit_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    rc = main(["demo", "--root", str(tmp_path / "demo"), "--episodes", "2", option, value])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    assert option.lstrip("-").replace("-", "_") in err
    assert not (tmp_path / "demo").exists()  # checked before anything is written


def test_demo_root_that_cannot_be_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "demo"
    assert main(["demo", "--root", str(root), "--episodes", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot create" in err
    assert str(root) in err


def test_inspect_empty_video_file(
    tmp_path: Path, plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty MP4 is one error line naming it (was a PyAV OSError traceback)."""
    root = copy_dataset(plain_root, tmp_path / "ds")
    rel = f"videos/{TOP}/chunk-000/file-000.mp4"
    (root / rel).write_bytes(b"")
    assert main(["inspect", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("framefeed: error: ")
    assert str(root / rel) in err
