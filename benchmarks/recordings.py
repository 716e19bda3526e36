"""Multi-rate recordings: map-style and streaming throughput, and batch-planned packet video.

Recordings (Rerun ``.rrd``, written by `framefeed.synth.rerun`): a 320x240 JPEG camera at
30 Hz, a 320x240 H.264 camera at 30 Hz with a GOP of 30, a 14-dim state at 100 Hz and a 7-dim
action at 10 Hz, with jittered timestamps. Samples lie on a fixed 30 Hz grid of ``log_time``;
each holds both cameras, the state (latest-at) and a 10-step action window. Batches of 32.

Records (one JSON line each, warm-up excluded):
- ``map``: `MapDataset.get_batch` over shuffled batches (one read plan per batch);
- ``stream``: `IterableDataset(batch_size=32)` with an episode pool (shuffled);
- ``gop_shuffled`` / ``gop_pool4``: the H.264 camera alone, a batch served by one plan (each GOP
  decoded once up to its last target) against the same samples served one by one (each decoded
  from its keyframe), with the ratio; batches drawn uniformly from the whole dataset, or in the
  order the streaming dataset serves them with a pool of 4 episodes, or all 32 from one 5-second
  stretch of one recording (``gop_dense150``: many targets share a GOP).

Run: ``flock /tmp/ffbench.lock python benchmarks/recordings.py``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import framefeed
from framefeed import Field, FixedRateSampling, IndexSpec, Window
from framefeed.sampling.stream import StreamOrder
from framefeed.synth.rerun import (
    ACTION,
    H264,
    JPEG,
    STATE,
    RerunSynthConfig,
    write_rerun_recordings,
)

BATCH = 32


def _dataset(root: str, recordings: int, seconds: float) -> str:
    marker = os.path.join(root, f".done-{recordings}-{seconds:g}")
    if not os.path.exists(marker):
        config = RerunSynthConfig(
            num_recordings=recordings,
            min_duration_s=seconds,
            max_duration_s=seconds,
            texture=True,
            text_rate_hz=0.0,
        )
        write_rerun_recordings(root, config)
        open(marker, "w").close()
    return root


def _fields(cameras: tuple[str, ...]) -> list[Field]:
    return [
        *(Field(c) for c in cameras),
        Field(STATE),
        Field(ACTION, window=Window(steps=tuple(range(10)))),
    ]


def _timed(batches: int, warmup: int, step: Callable[[int], int]) -> tuple[float, int]:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    n = 0
    for i in range(warmup, warmup + batches):
        n += step(i)
    return time.perf_counter() - start, n


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = _dataset(args.root, args.recordings, args.seconds)
    ds = framefeed.open_dataset(root)
    spec = IndexSpec(timeline="log_time", sampling=FixedRateSampling(30.0))
    records: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)

    m = framefeed.MapDataset(ds, index=spec, fields=_fields((JPEG, H264)))
    orders = [rng.choice(len(m), BATCH, replace=False) for _ in range(args.batches + 2)]
    seconds, n = _timed(args.batches, 2, lambda i: len(m.get_batch(orders[i])["index"]))
    records.append(
        {"case": "map", "samples": n, "seconds": round(seconds, 3), "samples_s": n / seconds}
    )
    m.close()

    it = framefeed.IterableDataset(
        ds, index=spec, fields=_fields((JPEG, H264)), batch_size=BATCH, episode_pool_size=4
    )
    stream = iter(it)
    seconds, n = _timed(args.batches, 2, lambda i: len(next(stream)["index"]))
    records.append(
        {"case": "stream", "samples": n, "seconds": round(seconds, 3), "samples_s": n / seconds}
    )
    it.close()

    video = framefeed.MapDataset(ds, index=spec, fields=[Field(H264)], decode_threads=1)
    shuffled = [rng.choice(len(video), BATCH, replace=False) for _ in range(args.gop_batches + 1)]
    pooled = StreamOrder(
        offsets=video.index.offsets, seed=0, epoch=0, rank=0, world_size=1, pool_size=4
    ).consumer_orders(1)[0]
    records.append(_gop(video, "gop_shuffled", shuffled, args.gop_batches, ds.num_segments))
    stream_batches = [pooled[i * BATCH : (i + 1) * BATCH] for i in range(args.gop_batches + 1)]
    records.append(_gop(video, "gop_pool4", stream_batches, args.gop_batches, ds.num_segments))
    # Dense: each batch's 32 targets lie in one 5-second stretch (150 frames, 5 GOPs) of one
    # recording, as with a sequence sampler or a clip-based curriculum.
    offsets = video.index.offsets
    dense = []
    for _ in range(args.gop_batches + 1):
        seg = int(rng.integers(0, len(offsets) - 1))
        first = int(rng.integers(offsets[seg], offsets[seg + 1] - 150))
        dense.append(first + rng.choice(150, BATCH, replace=False))
    records.append(_gop(video, "gop_dense150", dense, args.gop_batches, ds.num_segments))
    video.close()
    return records


def _gop(
    video: framefeed.MapDataset, case: str, picks: list[Any], batches: int, segments: int
) -> dict[str, Any]:
    """One plan per batch against one plan per sample, over the same batches."""
    batch_s, frames = _timed(batches, 1, lambda i: len(video.get_batch(picks[i])[H264]))

    def one_by_one(i: int) -> int:
        for j in picks[i].tolist():
            video.get_batch([j])
        return BATCH

    single_s, single = _timed(batches, 1, one_by_one)
    check = picks[0][:4]
    together = video.get_batch(check)[H264]
    alone = [video.get_batch([j])[H264][0] for j in check.tolist()]
    assert all(bool((together[k] == alone[k]).all()) for k in range(len(alone)))
    return {
        "case": case,
        "batch_frames_s": frames / batch_s,
        "per_sample_frames_s": single / single_s,
        "speedup": (frames / batch_s) / (single / single_s),
        "segments": segments,
        "gop": 30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/ffbench/recordings")
    parser.add_argument("--recordings", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--gop-batches", type=int, default=4)
    args = parser.parse_args()
    for record in run(args):
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()})
        )


if __name__ == "__main__":
    main()
