"""Map-style random access: framefeed against a decode-only PyAV ceiling, in one run.

The dataset: LeRobot v3, 2 cameras (640x480 and 320x240, AV1 g=2 crf 30, textured content),
20+ episodes, written once by framefeed's writer and reused. Samples are drawn shuffled with a
fixed seed, batch 32, ``num_workers=0``. For each configuration the program measures

* ``framefeed``: a torch DataLoader over `framefeed.MapDataset` (``collate_fn=framefeed.collate``);
* ``ceiling``: decode only. The packets of every file are read into memory before timing;
  for each batch the exact frames the same samples need are sorted per file and decoded with
  PyAV by feeding packets from the keyframe to the target and draining, then converted to RGB
  by one reused converter. One thread, nothing else: no metadata, no numeric columns, no
  tensors, no I/O;
* ``pyav_seek``: the usual PyAV loop for the same frames (container seek to the keyframe,
  decode forward, sorted targets, open containers), for context;

and prints JSON records with samples/s and the ratios. framefeed runs with one decode thread
(the like-for-like overhead measure) and with its default threads. Rounds interleave all runs
so that machine noise hits each; ``external_cpu_cores`` is the most CPU that other processes
used during any timed run.

Run: ``python benchmarks/map_random.py [--root DIR] [--batches N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from torch.utils.data import DataLoader

import framefeed
from framefeed.bench import cpu_busy_seconds
from framefeed.synth import CameraSpec, SynthConfig, write_lerobot_dataset

FPS = 30
CONFIG = SynthConfig(
    num_episodes=20,
    min_length=150,
    max_length=220,
    fps=FPS,
    cameras=(
        CameraSpec(key="observation.images.top", height=480, width=640),
        CameraSpec(key="observation.images.wrist", height=240, width=320),
    ),
    state_dim=14,
    action_dim=14,
    texture=True,
    seed=0,
)
CHUNK = {
    "observation.images.top": [-1 / FPS, 0.0],
    "observation.images.wrist": [-1 / FPS, 0.0],
    "observation.state": [-1 / FPS, 0.0],
    "action": [i / FPS for i in range(16)],
}


def _measure(run: Callable[[], int]) -> dict[str, float]:
    busy0, own0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    samples = run()
    wall = time.perf_counter() - t0
    external = max(0.0, (cpu_busy_seconds() - busy0) - (time.process_time() - own0))
    return {"samples_per_s": samples / wall, "seconds": wall, "external_cpu_cores": external / wall}


class _Targets:
    """The (file, pts) pairs a batch of samples needs, computed from metadata alone."""

    def __init__(self, ds: framefeed.Dataset, deltas: dict[str, list[float]] | None) -> None:
        self.ds = ds
        self.offsets = {
            key: np.rint(np.asarray((deltas or {}).get(key, [0.0])) * ds.fps).astype(np.int64)
            for key in ds.video_keys
        }
        self.time_base: dict[str, float] = {}
        for key in ds.video_keys:
            for path in set(ds.video_paths[key].tolist()):
                with av.open(ds.storage.url(path)) as container:
                    self.time_base[path] = float(container.streams.video[0].time_base)

    def __call__(self, positions: np.ndarray, frames: np.ndarray) -> dict[str, list[int]]:
        wanted: dict[str, set[int]] = {}
        lengths = self.ds.lengths[positions][:, None]
        for key in self.ds.video_keys:
            clamped = np.clip(frames[:, None] + self.offsets[key][None, :], 0, lengths - 1)
            times = self.ds.video_from[key][positions][:, None] + clamped / self.ds.fps
            for row, path in enumerate(self.ds.video_paths[key][positions].tolist()):
                ticks = np.rint(times[row] / self.time_base[path]).astype(np.int64)
                wanted.setdefault(path, set()).update(ticks.tolist())
        return {path: sorted(t) for path, t in wanted.items()}


class Ceiling:
    """Decode only: packets already in memory, fed from the keyframe to each target, drained.

    Targets are sorted per file; a target reachable from the previous one without passing a
    keyframe continues the same pass. One reused RGB converter, one thread, nothing else.
    """

    def __init__(self, ds: framefeed.Dataset, targets: _Targets) -> None:
        self.targets = targets
        self.packets: dict[str, list[Any]] = {}
        self.pts: dict[str, np.ndarray] = {}
        self.keys: dict[str, np.ndarray] = {}
        self.codecs: dict[str, Any] = {}
        self.scaler = VideoReformatter()
        for path in targets.time_base:
            with av.open(ds.storage.url(path)) as container:
                stream = container.streams.video[0]
                packets = [p for p in container.demux(stream) if p.size]
                self.codecs[path] = av.CodecContext.create(stream.codec_context.codec.name, "r")
                if stream.codec_context.extradata:
                    self.codecs[path].extradata = stream.codec_context.extradata
                self.codecs[path].thread_count = 1
            self.packets[path] = [(bytes(p), p.pts, p.dts) for p in packets]
            self.pts[path] = np.asarray([p.pts for p in packets], dtype=np.int64)
            self.keys[path] = np.flatnonzero([p.is_keyframe for p in packets])

    def batch(self, positions: np.ndarray, frames: np.ndarray) -> int:
        got = 0
        for path, targets in self.targets(positions, frames).items():
            got += self._decode_file(path, targets)
        return got

    def _decode_file(self, path: str, targets: list[int]) -> int:
        ctx, packets, pts, keys = (
            self.codecs[path],
            self.packets[path],
            self.pts[path],
            self.keys[path],
        )
        pending = set(targets)
        fed = -1
        got = 0
        for target in targets:
            at = int(np.flatnonzero(pts == target)[0])
            anchor = int(keys[np.searchsorted(keys, at, side="right") - 1])
            if anchor > fed:  # a keyframe lies between: drain and start again from it
                got += self._drain(ctx, pending)
                fed = anchor - 1
            for data, p_pts, p_dts in packets[fed + 1 : at + 1]:
                packet = av.Packet(data)
                packet.pts, packet.dts = p_pts, p_dts
                got += self._take(ctx.decode(packet), pending)
            fed = max(fed, at)
        return got + self._drain(ctx, pending)

    def _drain(self, ctx: Any, pending: set[int]) -> int:
        got = self._take(ctx.decode(None), pending)
        ctx.flush_buffers()
        return got

    def _take(self, decoded: list[Any], pending: set[int]) -> int:
        got = 0
        for frame in decoded:
            if frame.pts in pending:
                pending.discard(frame.pts)
                self.scaler.reformat(frame, format="rgb24", threads=1).to_ndarray()
                got += 1
        return got


class ThreadedCeiling:
    """The decode-only ceiling with ``threads`` decoders: each file's sorted targets of a batch
    are cut into ``threads`` contiguous parts, part k decoded by decoder set k in its thread."""

    def __init__(self, ds: framefeed.Dataset, targets: _Targets, threads: int) -> None:
        self.targets = targets
        self.parts = [Ceiling(ds, targets) for _ in range(threads)]
        self.pool = ThreadPoolExecutor(threads)

    def batch(self, positions: np.ndarray, frames: np.ndarray) -> int:
        work: list[list[tuple[str, list[int]]]] = [[] for _ in self.parts]
        for path, targets in self.targets(positions, frames).items():
            for k, chunk in enumerate(np.array_split(np.asarray(targets), len(self.parts))):
                if len(chunk):
                    work[k].append((path, chunk.tolist()))

        def run(k: int) -> int:
            return sum(self.parts[k]._decode_file(path, t) for path, t in work[k])

        return sum(self.pool.map(run, range(len(self.parts))))


class PyAVSeek:
    """The usual PyAV loop: seek the container to the keyframe, decode up to the target."""

    def __init__(self, ds: framefeed.Dataset, targets: _Targets) -> None:
        self.targets = targets
        self.containers = {p: av.open(ds.storage.url(p)) for p in targets.time_base}
        self.position = dict.fromkeys(self.containers, -1)
        self.keys: dict[str, np.ndarray] = {}
        for path, container in self.containers.items():
            stream = container.streams.video[0]
            keys = [p.pts for p in container.demux(stream) if p.size and p.is_keyframe]
            self.keys[path] = np.asarray(sorted(keys), dtype=np.int64)
            container.seek(0, stream=stream)
        self.scaler = VideoReformatter()

    def batch(self, positions: np.ndarray, frames: np.ndarray) -> int:
        got = 0
        for path, targets in self.targets(positions, frames).items():
            container = self.containers[path]
            stream = container.streams.video[0]
            keys = self.keys[path]
            for target in targets:
                anchor = int(keys[np.searchsorted(keys, target, side="right") - 1])
                if not (anchor <= self.position[path] < target):
                    container.seek(anchor, stream=stream, backward=True)
                for frame in container.decode(stream):
                    self.position[path] = frame.pts
                    if frame.pts >= target:
                        self.scaler.reformat(frame, format="rgb24", threads=1).to_ndarray()
                        got += 1
                        break
        return got


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_root = os.path.join(os.environ.get("TMPDIR", "/tmp"), "framefeed-bench", "map2cam")
    parser.add_argument("--root", default=default_root, help="dataset folder (written if absent)")
    parser.add_argument("--batches", type=int, default=30, help="batches per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--section",
        choices=["all", "dataloader", "loader"],
        default="all",
        help="torch DataLoader runs, framefeed Loader runs, or both",
    )
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.root, "meta", "info.json")):
        t0 = time.perf_counter()
        write_lerobot_dataset(args.root, CONFIG, progress=True, overwrite=True)
        _emit(bench="map_random.write", seconds=round(time.perf_counter() - t0, 1))
    ds = framefeed.open_dataset(args.root)
    _emit(
        bench="map_random.dataset", root=args.root, episodes=ds.num_segments, frames=ds.num_frames
    )
    n = args.batches * args.batch_size
    index = framefeed.SampleIndex.from_dataset(ds)
    if args.section in ("all", "loader"):
        _loader_section(ds, args)
    if args.section == "loader":
        return
    for label, deltas in (("none", None), ("chunk", CHUNK)):
        targets = _Targets(ds, deltas)
        baselines = {"ceiling": Ceiling(ds, targets), "pyav_seek": PyAVSeek(ds, targets)}
        runs: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds + 1):  # round 0 warms caches up and is not reported
            gen = torch.Generator().manual_seed(rnd)
            order = torch.randperm(ds.num_frames, generator=gen)[:n].numpy()
            for name, baseline in baselines.items():
                runs.setdefault(name, []).append(
                    _measure(_baseline_run(baseline, index, order, args.batch_size))
                )
            for threads in (1, None):
                mapds = framefeed.MapDataset(ds, delta_timestamps=deltas, decode_threads=threads)
                loader = DataLoader(
                    mapds,
                    batch_size=args.batch_size,
                    sampler=order.tolist(),
                    num_workers=0,
                    collate_fn=framefeed.collate,
                )
                name = f"framefeed_threads_{threads or 'auto'}"
                runs.setdefault(name, []).append(_measure(_loader_run(loader)))
                mapds.close()
        rates = {k: statistics.median(r["samples_per_s"] for r in v[1:]) for k, v in runs.items()}
        external = max(r["external_cpu_cores"] for v in runs.values() for r in v[1:])
        for threads in ("1", "auto"):
            ff = rates[f"framefeed_threads_{threads}"]
            _emit(
                bench="map_random",
                delta=label,
                decode_threads=threads,
                batch_size=args.batch_size,
                num_workers=0,
                samples=n,
                framefeed_samples_per_s=round(ff, 1),
                ceiling_samples_per_s=round(rates["ceiling"], 1),
                pyav_seek_samples_per_s=round(rates["pyav_seek"], 1),
                ratio_vs_ceiling=round(ff / rates["ceiling"], 3),
                ratio_vs_pyav_seek=round(ff / rates["pyav_seek"], 3),
                external_cpu_cores=round(external, 2),
            )


def _loader_section(ds: framefeed.Dataset, args: argparse.Namespace) -> None:
    """framefeed's own Loader: 1 vs 2 decode threads in one process, against the ceiling run
    with the same number of threads (issue 4's first target)."""
    n = args.batches * args.batch_size
    index = framefeed.SampleIndex.from_dataset(ds)
    targets = _Targets(ds, None)
    ceilings = {1: Ceiling(ds, targets), 2: ThreadedCeiling(ds, targets, 2)}
    runs: dict[str, list[float]] = {}
    for rnd in range(args.rounds + 1):
        gen = torch.Generator().manual_seed(100 + rnd)
        order = torch.randperm(ds.num_frames, generator=gen)[:n].numpy()
        for threads in (1, 2):
            rate = _measure(_baseline_run(ceilings[threads], index, order, args.batch_size))
            runs.setdefault(f"ceiling_{threads}", []).append(rate["samples_per_s"])
            mapds = framefeed.MapDataset(ds, decode_threads=threads)

            def run_loader(mapds: framefeed.MapDataset = mapds, order: np.ndarray = order) -> int:
                with framefeed.Loader(
                    mapds, batch_size=args.batch_size, sampler=order.tolist(), threads=1
                ) as loader:
                    return sum(len(b["index"]) for b in loader)

            rate = _measure(run_loader)
            runs.setdefault(f"loader_{threads}", []).append(rate["samples_per_s"])
            mapds.close()
    med = {k: statistics.median(v[1:]) for k, v in runs.items()}
    _emit(
        bench="map_random.loader",
        samples=n,
        loader_1_thread=round(med["loader_1"], 1),
        loader_2_threads=round(med["loader_2"], 1),
        ceiling_1_thread=round(med["ceiling_1"], 1),
        ceiling_2_threads=round(med["ceiling_2"], 1),
        speedup_2_over_1=round(med["loader_2"] / med["loader_1"], 3),
        ratio_vs_ceiling_same_threads=round(med["loader_2"] / med["ceiling_2"], 3),
    )


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _loader_run(loader: DataLoader[Any]) -> Callable[[], int]:
    def run() -> int:
        count = 0
        for batch in loader:
            count += len(batch["index"])
        return count

    return run


def _baseline_run(
    baseline: Ceiling | PyAVSeek, index: framefeed.SampleIndex, order: np.ndarray, batch_size: int
) -> Callable[[], int]:
    def run() -> int:
        count = 0
        for start in range(0, len(order), batch_size):
            positions, frames = index.locate(order[start : start + batch_size])
            baseline.batch(positions, frames)
            count += len(positions)
        return count

    return run


if __name__ == "__main__":
    main()
