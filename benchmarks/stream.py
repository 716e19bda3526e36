"""Streaming: framefeed's IterableDataset from local disk and from a loopback S3 server.

Same dataset as ``map_random.py`` (written if absent). For each source (local, S3) and
``num_workers`` in (0, 2) it measures samples/s over a fixed number of batches (batch 32),
first-batch latency, peak RSS of the process tree (this process and its DataLoader workers;
the S3 server runs in a separate process that is not counted), and bytes fetched per sample.
It also runs map-style local random access (the reference the streaming target is stated
against) and reports the shuffle randomness of the episode pool (distinct episodes per batch
divided by batch size) at pool sizes 1, 16 and 256, next to a global shuffle.

Run: ``python benchmarks/stream.py [--root DIR] [--batches N]``. Needs ``moto[server]`` and
``s3fs`` (the test extra) for the S3 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import framefeed
from framefeed.bench import PeakMemory
from framefeed.sampling.stream import StreamOrder

sys.path.insert(0, os.path.dirname(__file__))
from map_random import CONFIG

BUCKET = "framefeed-bench"


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _run(loader: Any, batches: int, exclude: set[int]) -> dict[str, float]:
    with PeakMemory(frozenset(exclude)) as mem:
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        first_s = time.perf_counter() - t0
        n = len(first["index"])
        t1 = time.perf_counter()
        for _ in range(batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            n_batch = len(batch["index"])
            n += n_batch
        steady = time.perf_counter() - t1
        del it
    return {
        "samples_per_s": round((n - len(first["index"])) / steady, 1),
        "first_batch_s": round(first_s, 3),
        "peak_rss_tree_mb": round(mem.rss / 2**20, 1),
        "peak_pss_tree_mb": round(mem.pss / 2**20, 1),
    }


def _start_s3(root: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.1)
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            key = "ds/" + os.path.relpath(path, root).replace(os.sep, "/")
            client.upload_file(path, BUCKET, key)
    return proc, endpoint


def _randomness(ds: framefeed.Dataset, batch: int) -> None:
    index = framefeed.SampleIndex.from_dataset(ds)
    episode_of = np.repeat(np.arange(ds.num_segments), ds.lengths)
    rows: dict[str, float] = {}
    for pool in (1, 16, 256):
        order = StreamOrder(
            offsets=index.offsets, seed=0, epoch=0, rank=0, world_size=1, pool_size=pool
        ).consumer_orders(1)[0]
        eps = episode_of[order]
        per = [
            len(set(eps[i : i + batch].tolist())) / batch for i in range(0, len(eps) - batch, batch)
        ]
        rows[f"pool_{pool}"] = round(float(np.mean(per)), 3)
    glob = np.random.default_rng(0).permutation(len(episode_of))
    eps = episode_of[glob]
    per = [len(set(eps[i : i + batch].tolist())) / batch for i in range(0, len(eps) - batch, batch)]
    rows["global_shuffle"] = round(float(np.mean(per)), 3)
    _emit(bench="stream.shuffle_randomness", batch_size=batch, episodes=ds.num_segments, **rows)


def _case(args: argparse.Namespace) -> None:
    """One measurement, in a fresh process so that memory is its own."""
    exclude = {int(p) for p in args.exclude.split(",") if p}
    kind, source, workers_s = args.case.split(":")
    if kind == "epoch":
        _epoch_bytes(args, source)
        return
    workers = int(workers_s)
    if source == "local":
        ds = framefeed.open_dataset(args.root)
    else:
        options = {"client_kwargs": {"endpoint_url": args.endpoint}}
        ds = framefeed.open_dataset(f"s3://{BUCKET}/ds", storage_options=options)
    if kind == "map":
        gen = torch.Generator().manual_seed(0)
        mapds = framefeed.MapDataset(ds)
        loader: Any = DataLoader(
            mapds,
            batch_size=args.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=framefeed.collate,
            num_workers=workers,
        )
        result = _run(loader, args.batches, exclude)
        _emit(bench="stream.map_reference", source=source, num_workers=workers, **result)
        return
    stream = framefeed.IterableDataset(
        ds, batch_size=args.batch_size, episode_pool_size=16, fetch_size=64, seed=0
    )
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers}
    prepare_s = 0.0
    if workers:
        kwargs.update(multiprocessing_context="fork", prefetch_factor=2)
        t0 = time.perf_counter()
        stream.prepare()  # columns and packet indexes once, inherited by the forked workers
        prepare_s = time.perf_counter() - t0
    result = _run(DataLoader(stream, **kwargs), args.batches, exclude)
    result["prepare_s"] = round(prepare_s, 3)
    result["first_batch_incl_prepare_s"] = round(result["first_batch_s"] + prepare_s, 3)
    extra: dict[str, Any] = {}
    if workers == 0:
        stats = stream._plan().engine.stats
        served = max(1, stats.frames_returned // max(1, len(ds.video_keys)))
        extra = {
            "video_bytes_fetched_per_sample": round(stats.bytes_read / served),
            "packet_bytes_per_sample": round(stats.packet_bytes / served),
            "fetched_over_packets": round(stats.bytes_read / max(1, stats.packet_bytes), 3),
        }
        if not ds.storage.is_local:
            extra["all_bytes_fetched"] = ds.storage.stats["bytes_read"]
    _emit(bench="stream", source=source, num_workers=workers, **result, **extra)


def _epoch_bytes(args: argparse.Namespace, source: str) -> None:
    """Bytes fetched over one whole streaming epoch against the packet bytes decoded."""
    options = {"client_kwargs": {"endpoint_url": args.endpoint}}
    ds = framefeed.open_dataset(f"s3://{BUCKET}/ds", storage_options=options)
    stream = framefeed.IterableDataset(
        ds, batch_size=args.batch_size, episode_pool_size=16, fetch_size=64, seed=0
    )
    t0 = time.perf_counter()
    samples = sum(len(b["index"]) for b in DataLoader(stream, batch_size=None))
    wall = time.perf_counter() - t0
    stats = stream._plan().engine.stats
    _emit(
        bench="stream.epoch_bytes",
        source=source,
        samples=samples,
        samples_per_s=round(samples / wall, 1),
        video_bytes_fetched_per_sample=round(stats.bytes_read / samples),
        packet_bytes_decoded_per_sample=round(stats.packet_bytes / samples),
        fetched_over_packets=round(stats.bytes_read / max(1, stats.packet_bytes), 3),
        all_bytes_fetched_incl_metadata_and_parquet=ds.storage.stats["bytes_read"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_root = os.path.join(os.environ.get("TMPDIR", "/tmp"), "framefeed-bench", "map2cam")
    parser.add_argument("--root", default=default_root)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--exclude", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _case(args)
        return
    if not os.path.exists(os.path.join(args.root, "meta", "info.json")):
        from framefeed.synth import write_lerobot_dataset

        write_lerobot_dataset(args.root, CONFIG, progress=True, overwrite=True)
    _randomness(framefeed.open_dataset(args.root), args.batch_size)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = _start_s3(args.root)
    records = []
    try:
        cases = ["map:local:0", "map:local:2"]
        cases += [f"stream:{src}:{w}" for src in ("local", "s3") for w in (0, 2)]
        cases += ["epoch:s3:0"]
        for case in cases:
            cmd = [sys.executable, __file__, "--case", case, "--root", args.root]
            cmd += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
            cmd += ["--endpoint", endpoint, "--exclude", str(proc.pid)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                _emit(bench="stream.error", case=case, stderr=out.stderr[-2000:])
                continue
            print(lines[-1], flush=True)
            records.append(json.loads(lines[-1]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Against local map-style with the same number of workers (like for like) and against the
    # best local map-style run (0 workers on this machine).
    maps = {r["num_workers"]: r for r in records if r["bench"] == "stream.map_reference"}
    best = max((r["samples_per_s"] for r in maps.values()), default=0.0)
    for r in records:
        if r["bench"] == "stream" and "num_workers" in r and r["num_workers"] in maps:
            same = maps[r["num_workers"]]["samples_per_s"]
            _emit(
                bench="stream.ratio",
                source=r["source"],
                num_workers=r["num_workers"],
                ratio_vs_map_local_same_workers=round(r["samples_per_s"] / same, 3),
                ratio_vs_best_map_local=round(r["samples_per_s"] / best, 3),
            )


if __name__ == "__main__":
    main()
