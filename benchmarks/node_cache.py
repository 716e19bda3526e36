"""Peak PSS of the process tree with 0, 2 and 4 DataLoader workers, column cache on and off.

A synthetic LeRobot dataset without video, 256 episodes of 2048 frames with 128-wide state and
action vectors (about 540 MB of float32 once loaded; ``--episodes`` and ``--length`` change
it), is written once. Each configuration runs
in a fresh Python process that builds an `IterableDataset` over the numeric columns
(``observation.state``, ``action``, ``index``), iterates one whole epoch through a DataLoader
(batches of 1024, so every row, hence every page, is touched) and records the peak PSS of its
process tree (itself, its workers and, with ``forkserver``, the server), sampled every 50 ms.

Modes: ``off`` (every process reads the columns into its own memory), ``prepare`` (``fork``
only: the parent loads the columns before the workers fork and they share its pages), ``on``
(the node-shared column cache, built once before the measured runs), ``on+prepare`` (``fork``
only: the cache, mapped by the parent with ``prepare()`` before the workers fork). Start
methods: ``fork``, ``spawn``, ``forkserver`` and ``forkserver+preload`` (the server imports
torch and framefeed once, so its children share those pages).

A spawned worker's interpreter (Python, torch, pyarrow, framefeed) costs ~160 MB of private
memory whatever the data. To separate that from the data, every configuration is also run on
eight episodes (``control``: the same code, 1/32 of the data); ``data_growth`` is the growth from
0 to 4 workers minus the control's growth, relative to the 0-worker PSS.

Run: ``flock /tmp/ffbench.lock python benchmarks/node_cache.py [--root DIR]``
Prints one JSON record per run, then one ``summary`` record per (method, mode).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

FIELDS = ("observation.state", "action", "index")
EPISODES = 256
LENGTH = 2048
DIM = 128
CONTROL_EPISODES = 8


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _write(root: str, episodes: int, length: int) -> float:
    from framefeed.synth import SynthConfig, write_lerobot_dataset

    info = os.path.join(root, "meta", "info.json")
    if os.path.exists(info):
        with open(info) as fh:
            meta = json.load(fh)
        if meta["total_frames"] == episodes * length and not meta.get("video_path"):
            return 0.0
        shutil.rmtree(root)
    t0 = time.perf_counter()
    config = SynthConfig(
        num_episodes=episodes,
        min_length=length,
        max_length=length,
        cameras=(),
        state_dim=DIM,
        action_dim=DIM,
    )
    write_lerobot_dataset(root, config, progress=False)
    return time.perf_counter() - t0


def _child(spec: dict[str, Any]) -> None:
    """One measured configuration, in this fresh process."""
    import multiprocessing

    import torch
    from torch.utils.data import DataLoader

    import framefeed
    from framefeed.bench import PeakMemory

    method = spec["method"]
    workers = int(spec["workers"])
    context: Any = None
    if workers:
        context = multiprocessing.get_context(method.split("+")[0])
        if method == "forkserver+preload":
            context.set_forkserver_preload(["torch", "framefeed"])
    cached = spec["mode"] in ("on", "on+prepare")
    cache = framefeed.ColumnCache(directory=spec["cache"]) if cached else None
    ds = framefeed.IterableDataset(
        spec["root"],
        fields=[framefeed.Field(f) for f in FIELDS],
        batch_size=1024,
        seed=0,
        episodes=spec["episodes"],
        column_cache=cache,
    )
    t0 = time.perf_counter()
    if spec["mode"] in ("prepare", "on+prepare"):
        ds.prepare()
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=context,
        timeout=600 if workers else 0,
    )
    rows = 0
    checksum = 0.0
    with PeakMemory() as peak:
        for batch in loader:
            rows += len(batch["index"])
            checksum += float(batch["action"][:, 0].sum(dtype=torch.float64))
    _emit(
        bench="node_cache",
        method=method,
        mode=spec["mode"],
        workers=workers,
        control=spec["episodes"] is not None,
        rows=rows,
        peak_pss_mb=round(peak.pss / 2**20, 1),
        peak_rss_mb=round(peak.rss / 2**20, 1),
        processes=len(peak.pids),
        epoch_s=round(time.perf_counter() - t0, 2),
        checksum=checksum,
    )


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    record: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/ffbench-nodecache")
    parser.add_argument("--methods", default="fork,spawn,forkserver,forkserver+preload")
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument(
        "--modes", default="off,on,prepare,on+prepare", help="prepare modes run with fork only"
    )
    parser.add_argument("--episodes", type=int, default=EPISODES)
    parser.add_argument("--length", type=int, default=LENGTH, help="frames per episode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    data = os.path.join(args.root, "ds")
    cache = os.path.join(args.root, "cache")
    write_s = _write(data, args.episodes, args.length)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    base = {"root": data, "cache": cache, "episodes": None}
    build = _run({**base, "method": "fork", "mode": "on", "workers": 0})  # builds the cache
    numeric = sum(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache))
    _emit(
        bench="node_cache",
        kind="setup",
        write_s=round(write_s, 1),
        cache_build_run_s=round(time.perf_counter() - t0, 1),
        cache_mb=round(numeric / 2**20, 1),
        build_peak_pss_mb=build["peak_pss_mb"],
    )
    workers = [int(w) for w in args.workers.split(",")]
    records = []
    for method in args.methods.split(","):
        modes = [m for m in args.modes.split(",") if "prepare" not in m or method == "fork"]
        for mode in modes:
            for w in workers:
                spec = {**base, "method": method, "mode": mode, "workers": w}
                records.append(_run(spec))
                if w in (min(workers), max(workers)):
                    records.append(_run({**spec, "episodes": list(range(CONTROL_EPISODES))}))
    for method in args.methods.split(","):
        for mode in ("off", "on", "prepare", "on+prepare"):
            got = {
                (r["workers"], r["control"]): r["peak_pss_mb"]
                for r in records
                if r["method"] == method and r["mode"] == mode
            }
            if not got:
                continue
            lo, hi = min(workers), max(workers)
            full0, full4 = got[(lo, False)], got[(hi, False)]
            ctrl0, ctrl4 = got[(lo, True)], got[(hi, True)]
            _emit(
                bench="node_cache",
                kind="summary",
                method=method,
                mode=mode,
                pss_mb={str(w): got[(w, False)] for w in workers},
                control_pss_mb={str(w): got[(w, True)] for w in (lo, hi)},
                growth=round(full4 / full0 - 1, 3),
                data_growth=round(((full4 - full0) - (ctrl4 - ctrl0)) / full0, 3),
            )


if __name__ == "__main__":
    main()
