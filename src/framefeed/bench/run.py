"""``framefeed bench``: measure a dataset configuration over a fixed window after a warm-up.

Reports samples/s and frames/s, first-batch latency, per-batch latency percentiles (and per
sample), peak RSS and PSS of the process tree, shuffle randomness (distinct episodes per batch /
batch size), the fetch / index / decode split of the video engine (without workers), and how
much CPU other processes used during the window (a busy machine shows). ``vs="naive"`` runs a
plain per-sample PyAV loop over the same samples in the same invocation and reports the ratio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..catalog import Dataset
from ..datasets import IterableDataset, MapDataset
from ..formats import open_dataset
from ..loader import collate
from .proc import PeakMemory, cpu_busy_seconds, rss_trend

__all__ = ["BenchConfig", "run_bench"]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark run."""

    path: str
    """Dataset folder or URL."""
    mode: Literal["map", "stream"] = "map"
    """Map-style (shuffled sampler) or streaming (episode pool)."""
    workers: int = 0
    """DataLoader worker processes."""
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


def _tree_cpu_seconds() -> float:
    """User + system CPU of this process, its exited children and its live children."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total + ticks / os.sysconf("SC_CLK_TCK")


def _forever(loader: Any) -> Any:
    """Batches of ``loader`` epoch after epoch (``set_epoch`` when the dataset has it)."""
    epoch = 0
    while True:
        set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1


def _measure(batches: Any, cfg: BenchConfig, frames_per_sample: int) -> dict[str, Any]:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        it = iter(_forever(batches))
        first = next(it)
        first_s = time.perf_counter() - t0
        del first
        warm_end = time.perf_counter() + cfg.warmup_s
        for _ in it:
            if time.perf_counter() >= warm_end:
                break
        busy0, own0 = cpu_busy_seconds(), _tree_cpu_seconds()
        window_start = time.monotonic()
        start = last = time.perf_counter()
        latencies: list[float] = []
        samples = 0
        randomness: list[float] = []
        for batch in it:
            now = time.perf_counter()
            latencies.append(now - last)
            last = now
            n = len(batch["index"])
            samples += n
            episodes = np.asarray(batch["episode_index"])
            randomness.append(len(np.unique(episodes)) / n)
            if now - start >= cfg.seconds:
                break
        wall = time.perf_counter() - start
        window_stop = time.monotonic()
        external = max(0.0, (cpu_busy_seconds() - busy0) - (_tree_cpu_seconds() - own0)) / wall
        del it
    rss_first, rss_last = rss_trend(mem.samples, window_start, window_stop)
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    per_sample = lat / cfg.batch_size
    return {
        "samples": samples,
        "seconds": round(wall, 2),
        "samples_per_s": round(samples / wall, 1),
        "frames_per_s": round(samples * frames_per_sample / wall, 1),
        "first_batch_s": round(first_s, 3),
        "batch_latency_ms": {
            q: round(float(np.percentile(lat, p)) * 1e3, 2)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "sample_latency_ms": {
            q: round(float(np.percentile(per_sample, p)) * 1e3, 3)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "peak_rss_tree_mb": round(mem.rss / 2**20, 1),
        "peak_pss_tree_mb": round(mem.pss / 2**20, 1),
        "rss_tree_mb_first_quarter": round(rss_first / 2**20, 1),
        "rss_tree_mb_last_quarter": round(rss_last / 2**20, 1),
        "episodes_per_batch_ratio": round(float(np.mean(randomness)) if randomness else 0.0, 3),
        "external_cpu_cores": round(external, 2),
    }


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` (and its baseline); one record per measured loader, then the ratio."""
    ds = open_dataset(cfg.path)
    deltas = _deltas(ds, cfg.delta)
    t_cams = sum(len((deltas or {}).get(k, [0.0])) for k in ds.video_keys)
    kwargs: dict[str, Any] = {"num_workers": cfg.workers}
    if cfg.workers:
        kwargs.update(multiprocessing_context="fork", persistent_workers=False)
    served: MapDataset | IterableDataset
    if cfg.mode == "map":
        served = MapDataset(ds, delta_timestamps=deltas, decode_threads=cfg.decode_threads)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader: Any = DataLoader(
            served,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate,
            **kwargs,
        )
    else:
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
        loader = DataLoader(served, batch_size=None, **kwargs)
    record: dict[str, Any] = {
        "bench": "framefeed",
        "mode": cfg.mode,
        "workers": cfg.workers,
        "delta": cfg.delta,
    }
    record.update(_measure(loader, cfg, t_cams))
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
    if cfg.vs == "naive":
        baseline: dict[str, Any] = {"bench": "naive", "mode": "map", "workers": 0}
        baseline["delta"] = cfg.delta
        baseline.update(_measure(_NaiveLoader(ds, deltas, cfg), cfg, t_cams))
        records.append(baseline)
        records.append(
            {
                "bench": "ratio",
                "framefeed_over_naive": round(
                    record["samples_per_s"] / max(baseline["samples_per_s"], 1e-9), 3
                ),
            }
        )
    return records


class _NaiveLoader:
    """Per-sample PyAV: seek each camera to each frame and decode it, one sample at a time."""

    def __init__(
        self, ds: Dataset, deltas: dict[str, list[float]] | None, cfg: BenchConfig
    ) -> None:
        self.ds = ds
        self.cfg = cfg
        self.offsets = {
            k: np.rint(np.asarray((deltas or {}).get(k, [0.0])) * ds.fps).astype(np.int64)
            for k in ds.video_keys
        }
        self.containers: dict[str, Any] = {}

    def _frame(self, path: str, t: float) -> np.ndarray:
        container = self.containers.get(path)
        if container is None:
            container = self.containers[path] = av.open(self.ds.storage.url(path))
        stream = container.streams.video[0]
        if stream.time_base is None:
            raise RuntimeError(f"{path}: the video stream has no time base")
        target = round(t / float(stream.time_base))
        container.seek(target, stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= target:
                return np.asarray(frame.to_ndarray(format="rgb24"))
        raise RuntimeError(f"{path}: no frame at {t}")

    def __iter__(self) -> Any:
        rng = np.random.default_rng(self.cfg.seed)
        starts = self.ds.start_rows
        order = rng.permutation(self.ds.num_frames)
        for b in range(0, len(order), self.cfg.batch_size):
            episodes = []
            for row in order[b : b + self.cfg.batch_size].tolist():
                pos = int(np.searchsorted(starts, row, side="right") - 1)
                frame = row - int(starts[pos])
                length = int(self.ds.lengths[pos])
                for key in self.ds.video_keys:
                    for off in self.offsets[key].tolist():
                        f = min(max(frame + off, 0), length - 1)
                        t = float(self.ds.video_from[key][pos]) + f / self.ds.fps
                        self._frame(str(self.ds.video_paths[key][pos]), t)
                episodes.append(int(self.ds.segment_ids[pos]))
            yield {"index": episodes, "episode_index": episodes}
