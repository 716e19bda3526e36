"""``framefeed bench``: measure a dataset configuration over a fixed window after a warm-up.

Reports samples/s and frames/s, first-batch latency, per-batch latency percentiles (and per
sample), peak RSS and PSS of the process tree, shuffle randomness (distinct episodes per batch /
batch size), the fetch / index / decode split of the video engine (without workers), how much
CPU other processes used during the window (a busy machine shows) and, with
``loader="framefeed"``, the per-stage table of `framefeed.Loader` over the window.
``vs="naive"`` runs a plain per-sample PyAV loop over the same samples in the same invocation
and reports the ratio; ``plot`` writes throughput over time and a latency histogram to a PNG.
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..catalog import Dataset
from ..datasets import IterableDataset, MapDataset
from ..errors import ConfigError
from ..formats import open_dataset
from ..loader import Loader, collate
from ..sampling import ShardedShuffleSampler
from .epochs import Epochs, stage_records, window_stats
from .naive import NaiveLoader
from .plot import Series, require_matplotlib, write_plot
from .proc import PeakMemory, cpu_busy_seconds, rss_trend, tree_cpu_seconds

__all__ = ["BenchConfig", "run_bench"]

TORCH_STAGES_NOTE = (
    "per-stage table: not available with the torch DataLoader (its stages run inside "
    "DataLoader{where}); shown instead: batch latency percentiles{engine}. Use --loader framefeed "
    "(one process, no workers) for the table."
)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark run."""

    path: str
    """Dataset folder or URL."""
    mode: Literal["map", "stream"] = "map"
    """Map-style (shuffled sampler) or streaming (episode pool)."""
    loader: Literal["torch", "framefeed"] = "torch"
    """torch ``DataLoader`` (with ``workers`` processes) or `framefeed.Loader` (one process: in
    map mode ``loader_threads`` fetch threads over ``MapDataset.get_batch``; in stream mode the
    Loader pulls the streaming dataset's batches, which decodes and prefetches them itself)."""
    workers: int = 0
    """DataLoader worker processes (persistent across epochs)."""
    loader_threads: int = 1
    """`framefeed.Loader` fetch threads (each reads whole batches)."""
    batch_size: int = 32
    delta: Literal["none", "chunk"] = "none"
    """``chunk``: cameras and state at [-1/fps, 0], action at 16 future steps."""
    pool_size: int = 16
    """Episode pool (streaming)."""
    decode_threads: int | None = None
    seconds: float = 10.0
    """Length of the measured window."""
    warmup_s: float = 2.0
    seed: int = 0
    vs: Literal["naive"] | None = None
    """Baseline to run in the same invocation."""
    plot: str | None = None
    """PNG to write: throughput over time and the per-sample latency histogram."""


def _check(cfg: BenchConfig) -> None:
    if cfg.loader not in ("torch", "framefeed"):
        raise ConfigError(f"loader must be 'torch' or 'framefeed', got {cfg.loader!r}")
    if cfg.loader == "framefeed" and cfg.workers:
        raise ConfigError(
            f"--loader framefeed runs in one process (threads), got --workers {cfg.workers}: "
            "use --loader-threads and --threads instead"
        )
    if cfg.workers < 0 or cfg.loader_threads < 1 or cfg.batch_size < 1:
        raise ConfigError(
            f"workers must be >= 0, loader threads and batch size >= 1; got {cfg.workers}, "
            f"{cfg.loader_threads}, {cfg.batch_size}"
        )
    if not (math.isfinite(cfg.seconds) and cfg.seconds > 0):
        raise ConfigError(f"--seconds must be a positive number, got {cfg.seconds}")
    if not (math.isfinite(cfg.warmup_s) and cfg.warmup_s >= 0):
        raise ConfigError(f"--warmup must be a number >= 0, got {cfg.warmup_s}")
    if cfg.plot is not None:
        require_matplotlib()  # before the run, not after it
        folder = os.path.dirname(os.path.abspath(cfg.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ConfigError(f"--plot {cfg.plot}: the folder {folder} is not a writable folder")


def _deltas(ds: Dataset, delta: str) -> dict[str, list[float]] | None:
    if delta == "none":
        return None
    step = 1.0 / ds.fps
    out = {key: [-step, 0.0] for key in ds.video_keys}
    for key in ("observation.state",):
        if key in ds.columns:
            out[key] = [-step, 0.0]
    if "action" in ds.columns:
        out["action"] = [i * step for i in range(16)]
    return out


def _percentiles(values: np.ndarray, scale: float, digits: int) -> dict[str, float]:
    return {
        q: round(float(np.percentile(values, p)) * scale, digits)
        for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
    }


def _measure(
    loader: Any, cfg: BenchConfig, frames_per_sample: int, label: str
) -> tuple[dict[str, Any], Series]:
    epochs = Epochs(loader)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        it = iter(epochs)
        first = next(it)
        first_s = time.perf_counter() - t0
        del first
        warm_end = time.perf_counter() + cfg.warmup_s
        for _ in it:
            if time.perf_counter() >= warm_end:
                break
        stages_start = epochs.stage_stats()
        busy0, own0 = cpu_busy_seconds(), tree_cpu_seconds()
        window_start = time.monotonic()
        start = last = time.perf_counter()
        arrivals: list[float] = []
        latencies: list[float] = []
        sizes: list[int] = []
        randomness: list[float] = []
        for batch in it:
            now = time.perf_counter()
            latencies.append(now - last)
            arrivals.append(now - start)
            last = now
            n = len(batch["index"])
            sizes.append(n)
            episodes = np.asarray(batch["episode_index"])
            randomness.append(len(np.unique(episodes)) / n)
            if now - start >= cfg.seconds:
                break
        wall = time.perf_counter() - start
        window_stop = time.monotonic()
        external = max(0.0, (cpu_busy_seconds() - busy0) - (tree_cpu_seconds() - own0)) / wall
        stages_end = epochs.stage_stats()
        del it
    rss_first, rss_last = rss_trend(mem.samples, window_start, window_stop)
    samples = int(sum(sizes))
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    per_sample = lat / np.maximum(np.asarray(sizes), 1) if sizes else lat
    record: dict[str, Any] = {
        "samples": samples,
        "batches": len(sizes),
        "epochs_started": epochs.epoch + 1,
        "seconds": round(wall, 2),
        "samples_per_s": round(samples / wall, 1),
        "frames_per_s": round(samples * frames_per_sample / wall, 1),
        "first_batch_s": round(first_s, 3),
        "batch_latency_ms": _percentiles(lat, 1e3, 2),
        "sample_latency_ms": _percentiles(per_sample, 1e3, 3),
        "peak_rss_tree_mb": round(mem.rss / 2**20, 1),
        "peak_pss_tree_mb": round(mem.pss / 2**20, 1),
        "rss_tree_mb_first_quarter": round(rss_first / 2**20, 1),
        "rss_tree_mb_last_quarter": round(rss_last / 2**20, 1),
        "processes_seen": len(mem.pids),
        "episodes_per_batch_ratio": round(float(np.mean(randomness)) if randomness else 0.0, 3),
        "external_cpu_cores": round(external, 2),
    }
    if stages_start is not None and stages_end is not None:
        record["stages"] = stage_records(window_stats(stages_start, stages_end))
    series = Series(
        label=label,
        arrivals_s=np.asarray(arrivals, dtype=np.float64),
        sizes=np.asarray(sizes, dtype=np.int64),
        sample_latency_s=np.asarray(per_sample if sizes else [], dtype=np.float64),
    )
    return record, series


def _make_loader(cfg: BenchConfig, served: MapDataset | IterableDataset) -> Any:
    if cfg.loader == "framefeed":
        if not isinstance(served, MapDataset):
            # the dataset decodes and prefetches on its own threads; the Loader's threads
            # take its batches in turn (its iterator is pulled under the source lock)
            return Loader(served, threads=cfg.loader_threads)
        sampler = ShardedShuffleSampler(len(served), seed=cfg.seed)
        return Loader(
            served,
            sampler=sampler,
            batch_size=cfg.batch_size,
            threads=cfg.loader_threads,
        )
    kwargs: dict[str, Any] = {"num_workers": cfg.workers}
    if cfg.workers:
        # persistent: one set of workers for the whole run, instead of new ones forking at
        # every epoch boundary while the old ones still hold their memory
        kwargs.update(multiprocessing_context="fork", persistent_workers=True)
    if isinstance(served, MapDataset):
        gen = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(
            served,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate,
            **kwargs,
        )
    return DataLoader(served, batch_size=None, **kwargs)


def _serve(cfg: BenchConfig, ds: Dataset) -> MapDataset | IterableDataset:
    deltas = _deltas(ds, cfg.delta)
    if cfg.mode == "map":
        return MapDataset(ds, delta_timestamps=deltas, decode_threads=cfg.decode_threads)
    served = IterableDataset(
        ds,
        batch_size=cfg.batch_size,
        episode_pool_size=cfg.pool_size,
        seed=cfg.seed,
        delta_timestamps=deltas,
        decode_threads=cfg.decode_threads,
    )
    if cfg.workers:
        served.prepare()
    return served


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` (and its baseline); one record per measured loader, then the ratio."""
    _check(cfg)
    ds = open_dataset(cfg.path)
    if ds.is_recording and (cfg.delta != "none" or cfg.vs is not None):
        raise ConfigError(
            f"{cfg.path} is a recording ({ds.format_name}): --delta chunk and --vs naive need a "
            "LeRobot dataset (frames at a fixed rate, cameras in MP4 files)"
        )
    if cfg.vs == "naive" and not ds.video_keys:
        raise ConfigError(
            f"{cfg.path} has no MP4 cameras: --vs naive seeks and decodes MP4 frames, so it "
            "would measure nothing here"
        )
    deltas = _deltas(ds, cfg.delta)
    served = _serve(cfg, ds)
    t_cams = served.frames_per_sample()
    loader = _make_loader(cfg, served)
    record: dict[str, Any] = {
        "bench": "framefeed",
        "mode": cfg.mode,
        "loader": cfg.loader,
        "workers": cfg.workers,
        "delta": cfg.delta,
    }
    if cfg.loader == "framefeed":
        record["loader_threads"] = cfg.loader_threads
    try:
        measured, series = _measure(loader, cfg, t_cams, "framefeed")
    finally:
        if isinstance(loader, Loader):
            loader.close()
        del loader  # persistent DataLoader workers exit with their loader
        gc.collect()
    record.update(measured)
    if "stages" not in record:
        where = " worker processes" if cfg.workers else ", in the main thread"
        engine = "" if cfg.workers else " and the video engine's fetch / index / decode split"
        record["stages_note"] = TORCH_STAGES_NOTE.format(where=where, engine=engine)
    if cfg.workers == 0:
        stats = served.engine.stats
        record["engine"] = {
            "frames_decoded": stats.frames_decoded,
            "frames_returned": stats.frames_returned,
            "fetch_seconds": round(stats.fetch_seconds, 3),
            "index_seconds": round(stats.index_seconds, 3),
            "decode_seconds": round(stats.decode_seconds, 3),
            "bytes_read": stats.bytes_read,
        }
    served.close()
    records = [record]
    all_series = [series]
    if cfg.vs == "naive":
        baseline: dict[str, Any] = {"bench": "naive", "mode": "map", "workers": 0}
        baseline["delta"] = cfg.delta
        naive = NaiveLoader(ds, deltas, cfg.batch_size, cfg.seed)
        try:
            mp4_frames = sum(len((deltas or {}).get(k, [0.0])) for k in ds.video_keys)
            measured, naive_series = _measure(naive, cfg, mp4_frames, "naive")
        finally:
            naive.close()
        baseline.update(measured)
        records.append(baseline)
        all_series.append(naive_series)
        records.append(
            {
                "bench": "ratio",
                "framefeed_over_naive": round(
                    record["samples_per_s"] / max(baseline["samples_per_s"], 1e-9), 3
                ),
            }
        )
    if cfg.plot is not None:
        title = (
            f"framefeed bench {os.path.basename(cfg.path.rstrip('/'))}: {cfg.mode}, "
            f"{cfg.loader} loader, workers {cfg.workers}, batch {cfg.batch_size}, "
            f"delta {cfg.delta}"
        )
        write_plot(cfg.plot, all_series, title)
    return records
