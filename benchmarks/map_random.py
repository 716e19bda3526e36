"""Map-style random access: framefeed against a decode-only PyAV ceiling, in one run.

The dataset: LeRobot v3, 2 cameras (640x480 and 320x240, AV1 g=2 crf 30, textured content),
20+ episodes, written once by framefeed's writer and reused. Samples are drawn shuffled with a
fixed seed, batch 32, ``num_workers=0``. For each configuration the program measures

* ``framefeed``: a torch DataLoader over `framefeed.MapDataset` (``collate_fn=framefeed.collate``);
* ``ceiling``: a loop that only seeks and decodes, with PyAV, exactly the frames the same
  samples need (containers kept open, targets sorted per batch and file, decoding forward
  inside a GOP, one reused RGB converter), and nothing else;

and prints JSON records with samples/s and the ratio framefeed / ceiling. Rounds alternate
between the two so that machine noise hits both; ``external_cpu_cores`` reports what other
processes used during each run.

Run: ``python benchmarks/map_random.py [--root DIR] [--batches N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from torch.utils.data import DataLoader

import framefeed
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


def _cpu_busy() -> float:
    """Busy CPU seconds of the whole machine (from /proc/stat)."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    ticks = [int(x) for x in parts]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _measure(run: Callable[[], int]) -> dict[str, float]:
    busy0, own0, t0 = _cpu_busy(), time.process_time(), time.perf_counter()
    samples = run()
    wall = time.perf_counter() - t0
    external = max(0.0, (_cpu_busy() - busy0) - (time.process_time() - own0))
    return {"samples_per_s": samples / wall, "seconds": wall, "external_cpu_cores": external / wall}


class Ceiling:
    """Seek-and-decode with plain PyAV: the frames, nothing else."""

    def __init__(self, ds: framefeed.Dataset, deltas: dict[str, list[float]] | None) -> None:
        self.ds = ds
        self.offsets = {
            key: np.rint(np.asarray((deltas or {}).get(key, [0.0])) * ds.fps).astype(np.int64)
            for key in ds.video_keys
        }
        self.containers: dict[str, Any] = {}
        self.keyframes: dict[str, np.ndarray] = {}
        self.position: dict[str, int] = {}
        self.scaler = VideoReformatter()
        for key in ds.video_keys:
            for path in set(ds.video_paths[key].tolist()):
                container = av.open(ds.storage.url(path))
                stream = container.streams.video[0]
                # Keyframe table, read once outside the timed loop (a PyAV user would cache it too).
                keys = [p.pts for p in container.demux(stream) if p.size and p.is_keyframe]
                self.keyframes[path] = np.asarray(sorted(keys), dtype=np.int64)
                container.seek(0, stream=stream)
                self.containers[path] = container
                self.position[path] = -1

    def batch(self, positions: np.ndarray, frames: np.ndarray) -> int:
        wanted: dict[str, set[int]] = {}
        for key in self.ds.video_keys:
            lengths = self.ds.lengths[positions][:, None]
            clamped = np.clip(frames[:, None] + self.offsets[key][None, :], 0, lengths - 1)
            times = self.ds.video_from[key][positions][:, None] + clamped / self.ds.fps
            paths = self.ds.video_paths[key][positions]
            for row, path in enumerate(paths.tolist()):
                stream = self.containers[path].streams.video[0]
                ticks = np.rint(times[row] / float(stream.time_base)).astype(np.int64)
                wanted.setdefault(path, set()).update(ticks.tolist())
        got = 0
        for path, targets in wanted.items():
            for target in sorted(targets):
                got += self._decode(path, target)
        return got

    def _decode(self, path: str, target: int) -> int:
        container = self.containers[path]
        stream = container.streams.video[0]
        keys = self.keyframes[path]
        anchor = int(keys[np.searchsorted(keys, target, side="right") - 1])
        if not (anchor <= self.position[path] < target):
            container.seek(anchor, stream=stream, backward=True)
        for frame in container.decode(stream):
            self.position[path] = frame.pts
            if frame.pts >= target:
                rgb = self.scaler.reformat(frame, format="rgb24")
                rgb.to_ndarray()
                return 1
        raise RuntimeError(f"{path}: no frame at pts {target}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "framefeed-bench", "map2cam"),
    )
    parser.add_argument("--batches", type=int, default=30, help="batches per timed run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per configuration"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.root, "meta", "info.json")):
        t0 = time.perf_counter()
        write_lerobot_dataset(args.root, CONFIG, progress=True, overwrite=True)
        print(
            json.dumps({"bench": "map_random.write", "seconds": round(time.perf_counter() - t0, 1)})
        )
    ds = framefeed.open_dataset(args.root)
    print(
        json.dumps(
            {
                "bench": "map_random.dataset",
                "root": args.root,
                "episodes": ds.num_segments,
                "frames": ds.num_frames,
            }
        )
    )
    n = args.batches * args.batch_size
    for label, deltas in (("none", None), ("chunk", CHUNK)):
        for threads in (1, None):
            results: dict[str, list[dict[str, float]]] = {"framefeed": [], "ceiling": []}
            for rnd in range(args.rounds + 1):  # round 0 is the warm-up
                order = torch.randperm(
                    len(ds.segment_ids) and ds.num_frames,
                    generator=torch.Generator().manual_seed(rnd),
                )[:n]
                mapds = framefeed.MapDataset(ds, delta_timestamps=deltas, decode_threads=threads)
                loader = DataLoader(
                    mapds,
                    batch_size=args.batch_size,
                    sampler=order.tolist(),
                    num_workers=0,
                    collate_fn=framefeed.collate,
                )

                def run_framefeed() -> int:
                    count = 0
                    for batch in loader:
                        count += len(batch["index"])
                    return count

                ceiling = Ceiling(ds, deltas)

                def run_ceiling() -> int:
                    idx = framefeed.SampleIndex.from_dataset(ds)
                    count = 0
                    for start in range(0, n, args.batch_size):
                        positions, frames = idx.locate(
                            order[start : start + args.batch_size].numpy()
                        )
                        ceiling.batch(positions, frames)
                        count += len(positions)
                    return count

                ff = _measure(run_framefeed)
                ce = _measure(run_ceiling)
                mapds.close()
                if rnd:
                    results["framefeed"].append(ff)
                    results["ceiling"].append(ce)
            ff_rate = statistics.median(r["samples_per_s"] for r in results["framefeed"])
            ce_rate = statistics.median(r["samples_per_s"] for r in results["ceiling"])
            print(
                json.dumps(
                    {
                        "bench": "map_random",
                        "delta": label,
                        "decode_threads": threads or "auto",
                        "batch_size": args.batch_size,
                        "num_workers": 0,
                        "samples": n,
                        "framefeed_samples_per_s": round(ff_rate, 1),
                        "ceiling_samples_per_s": round(ce_rate, 1),
                        "ratio": round(ff_rate / ce_rate, 3),
                        "external_cpu_cores": round(
                            max(r["external_cpu_cores"] for v in results.values() for r in v), 2
                        ),
                    }
                )
            )


if __name__ == "__main__":
    main()
