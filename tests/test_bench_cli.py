"""``framefeed bench``: runs a configuration and its baseline and prints typed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framefeed.bench import PeakMemory, tree_memory
from framefeed.cli import main

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
    for record in (ours, naive):
        assert record["samples"] > 0
        assert record["samples_per_s"] > 0
        assert record["frames_per_s"] == pytest.approx(
            record["samples_per_s"] * 2 * 2,
            rel=0.01,  # two cameras, two frames each
        )
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
