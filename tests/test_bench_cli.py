"""``framefeed bench``: runs a configuration and its baseline and prints typed records."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framefeed.bench import PeakMemory, tree_memory
from framefeed.bench.epochs import Epochs, window_stats
from framefeed.bench.plot import Series, throughput
from framefeed.cli import main
from framefeed.loader import Loader

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("mode", ["map", "stream"])
def test_bench_json_records(
    plain_root: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    argv = ["bench", str(plain_root), "--mode", mode, "--batch-size", "4", "--seconds", "0.5"]
    argv += ["--warmup", "0", "--json", "--vs", "naive", "--delta", "chunk"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ours, naive, ratio = records
    assert ours["bench"] == "framefeed" and ours["mode"] == mode
    # framefeed decodes two MP4 cameras, two frames each, and the PNG image; naive only the MP4s
    for record, frames in ((ours, 2 * 2 + 1), (naive, 2 * 2)):
        assert record["samples"] > 0
        assert record["samples_per_s"] > 0
        assert record["frames_per_s"] == pytest.approx(record["samples_per_s"] * frames, rel=0.01)
        assert set(record["batch_latency_ms"]) == {"p50", "p95", "p99"}
        assert record["peak_rss_tree_mb"] >= record["peak_pss_tree_mb"] > 0
        assert record["peak_rss_tree_mb"] >= record["rss_tree_mb_last_quarter"] > 0
        assert 0 < record["episodes_per_batch_ratio"] <= 1
    assert ours["engine"]["frames_returned"] >= ours["samples"]
    assert ratio["framefeed_over_naive"] == pytest.approx(
        ours["samples_per_s"] / naive["samples_per_s"], rel=0.01
    )


def test_tree_memory_counts_this_process() -> None:
    rss, pss = tree_memory(__import__("os").getpid())
    assert rss > 10 << 20 and 0 < pss <= rss
    with PeakMemory() as mem:
        block = bytearray(64 << 20)
        block[::4096] = b"x" * len(block[::4096])
        mem.sample()
    assert mem.rss >= rss + (32 << 20)
    del block


def _records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_bench_framefeed_loader_reports_the_stage_table_over_the_window(
    plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(plain_root), "--loader", "framefeed", "--batch-size", "4"]
    argv += ["--seconds", "0.6", "--warmup", "0.2", "--json"]
    assert main(argv) == 0
    (record,) = _records(capsys)
    assert record["loader"] == "framefeed" and record["loader_threads"] == 1
    assert "stages_note" not in record
    stages = {row["name"]: row for row in record["stages"]}
    assert list(stages) == ["source", "fetch", "collate", "transfer", "sink"]
    # the sink counts a batch when the consumer comes back for the next one: over the window
    # that is exactly the window's batches, across epoch boundaries (4 episodes: many epochs)
    assert record["epochs_started"] > 1
    assert stages["sink"]["items"] == record["batches"]
    # fetch may run ahead of the consumer by at most threads + buffer_size (+1 in hand)
    assert abs(stages["fetch"]["items"] - record["batches"]) <= 6
    assert stages["fetch"]["busy_s"] > 0 and stages["fetch"]["mean_ms"] > 0
    assert stages["fetch"]["busy_s"] <= record["seconds"] + 0.5  # the window, not the warm-up
    assert record["samples"] > 0 and record["engine"]["frames_returned"] > 0

    argv.remove("--json")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-stage table (measured window):" in out
    for name in stages:
        assert f"    {name} " in out


def test_bench_torch_loader_says_what_it_shows_instead(
    plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(plain_root), "--batch-size", "4", "--seconds", "0.3", "--warmup", "0"]
    assert main([*argv, "--json"]) == 0
    (record,) = _records(capsys)
    assert "stages" not in record
    assert "not available with the torch DataLoader" in record["stages_note"]
    assert "(its stages run inside DataLoader, in the main thread)" in record["stages_note"]
    assert "--loader framefeed" in record["stages_note"]


def test_bench_workers_are_persistent_and_gone_after_the_run(
    plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(plain_root), "--workers", "1", "--batch-size", "4"]
    argv += ["--seconds", "1.0", "--warmup", "0", "--json"]
    assert main(argv) == 0
    (record,) = _records(capsys)
    assert record["workers"] == 1 and record["samples"] > 0
    assert record["epochs_started"] > 1
    assert record["processes_seen"] == 2  # this process and one worker, over every epoch
    assert "worker processes" in record["stages_note"]
    assert multiprocessing.active_children() == []


def test_bench_refuses_framefeed_loader_with_worker_processes(
    plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(plain_root), "--loader", "framefeed", "--workers", "2"]
    assert main([*argv, "--seconds", "0.1"]) == 1
    assert "--loader framefeed" in capsys.readouterr().err


def test_bench_framefeed_loader_over_the_streaming_dataset(
    plain_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(plain_root), "--loader", "framefeed", "--mode", "stream"]
    argv += ["--batch-size", "4", "--pool", "2", "--seconds", "0.6", "--warmup", "0.2", "--json"]
    assert main(argv) == 0
    (record,) = _records(capsys)
    assert record["mode"] == "stream" and record["loader"] == "framefeed"
    assert record["samples"] > 0 and record["epochs_started"] > 1
    stages = {row["name"]: row for row in record["stages"]}
    assert stages["sink"]["items"] == record["batches"]
    assert stages["source"]["busy_s"] > 0  # the dataset's own work is pulled as the source


@pytest.fixture(scope="module")
def rrd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("rerun")
    from conftest import tiny_rerun_config

    from framefeed.synth.rerun import write_rerun_recordings

    root = tmp_path_factory.mktemp("bench-rrd")
    config = tiny_rerun_config(num_recordings=2, min_duration_s=1.0, max_duration_s=1.2)
    write_rerun_recordings(root, config)
    return root


@pytest.mark.rerun
@pytest.mark.parametrize("mode", ["map", "stream"])
def test_bench_counts_image_and_packet_frames_of_recordings(
    rrd_root: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    argv = ["bench", str(rrd_root), "--mode", mode, "--batch-size", "4", "--seconds", "0.3"]
    assert main([*argv, "--warmup", "0", "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["samples"] > 0
    # one JPEG camera and one H.264 packet camera per sample, no windows
    assert record["frames_per_s"] == pytest.approx(2 * record["samples_per_s"], rel=0.01)


@pytest.mark.rerun
@pytest.mark.parametrize("extra", [["--delta", "chunk"], ["--vs", "naive"]])
def test_bench_refuses_lerobot_only_options_on_recordings(
    rrd_root: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert main(["bench", str(rrd_root), *extra, "--seconds", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "is a recording" in err and "--delta chunk and --vs naive" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seconds", "nan"], "--seconds must be a positive number"),
        (["--seconds", "0"], "--seconds must be a positive number"),
        (["--warmup", "-1"], "--warmup must be a number >= 0"),
        (["--plot", "/nonexistent-folder/x.png"], "is not a writable folder"),
    ],
)
def test_bench_refuses_bad_windows_and_plot_paths_before_running(
    plain_root: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["bench", str(plain_root), "--seconds", "0.1", *extra]) == 1
    assert message in capsys.readouterr().err


def test_epochs_call_set_epoch_and_sum_stage_stats_across_epochs() -> None:
    class Source:
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Iterator[int]:
            return iter(range(self.epoch * 10, self.epoch * 10 + 3))

    with Loader(Source(), threads=2) as loader:
        epochs = Epochs(loader)
        it = iter(epochs)
        assert isinstance(it, Generator)
        got = [next(it) for _ in range(2)]
        start = epochs.stage_stats()
        got += [next(it) for _ in range(6)]
        end = epochs.stage_stats()
        it.close()
    assert got == [0, 1, 2, 10, 11, 12, 20, 21]
    assert start is not None and end is not None
    window = {s.name: s for s in window_stats(start, end)}
    assert window["sink"].items == 6  # batches 2..7 were handed back during the window
    assert {s.name: s.items for s in end}["sink"] == 7
    assert all(s.busy_s >= 0 and s.waited_s >= 0 for s in window.values())
    assert epochs.epoch == 2


def test_throughput_buckets_leave_out_the_partial_last_bucket() -> None:
    series = Series(
        label="x",
        arrivals_s=np.asarray([0.1, 0.3, 0.6, 1.2]),
        sizes=np.asarray([32, 32, 32, 16]),
        sample_latency_s=np.zeros(4),
    )
    edges, rate = throughput(series, bucket_s=0.5)
    assert edges.tolist() == [0.0, 0.5, 1.0]
    assert rate.tolist() == [128.0, 64.0]
    short = Series(
        label="y", arrivals_s=np.asarray([0.2]), sizes=np.asarray([8]), sample_latency_s=np.zeros(1)
    )
    edges, rate = throughput(short, bucket_s=0.5)
    assert edges.tolist() == [0.0, 0.2] and rate.tolist() == pytest.approx([40.0])


def test_bench_plot_writes_a_png(
    plain_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "bench.png"
    argv = ["bench", str(plain_root), "--batch-size", "4", "--seconds", "1.2", "--warmup", "0"]
    assert main([*argv, "--vs", "naive", "--json", "--plot", str(out)]) == 0
    assert len(_records(capsys)) == 3  # stdout stays JSON records only
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = image.imread(out).shape[:2]
    assert (width, height) == (900, 700)


def test_bench_plot_without_matplotlib_names_the_extra(
    plain_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "bench.png"
    started = time.monotonic()
    assert main(["bench", str(plain_root), "--seconds", "30", "--plot", str(out)]) == 1
    assert time.monotonic() - started < 10  # refused before the run
    captured = capsys.readouterr()
    assert "pip install 'framefeed[plot]'" in captured.err
    assert captured.out == "" and not out.exists()
