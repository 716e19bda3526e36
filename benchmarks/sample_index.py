"""SampleIndex at scale: build time and memory for 1,000,000 episodes / 100,000,000 frames.

Prints one JSON record per measurement. Run: ``python benchmarks/sample_index.py``.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from framefeed import SampleIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=1_000_000)
    parser.add_argument("--mean-length", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    half = args.mean_length // 2
    lengths = rng.integers(args.mean_length - half, args.mean_length + half + 1, args.episodes)
    tracemalloc.start()
    t0 = time.perf_counter()
    index = SampleIndex(lengths)
    build_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "bench": "sample_index.build",
                "episodes": args.episodes,
                "frames": len(index),
                "build_seconds": round(build_s, 4),
                "index_bytes": index.nbytes,
                "peak_alloc_bytes": peak,
            }
        )
    )
    queries = rng.integers(0, len(index), (200, args.batch))
    t0 = time.perf_counter()
    for q in queries:
        segs, frames = index.locate(q)
    per_batch = (time.perf_counter() - t0) / len(queries)
    back = index.global_index(segs, frames)
    if not np.array_equal(back, queries[-1]):
        raise SystemExit("round trip failed")
    print(
        json.dumps(
            {
                "bench": "sample_index.locate",
                "batch": args.batch,
                "microseconds_per_batch": round(per_batch * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
