"""Pipeline overhead: framefeed's Loader against ThreadPoolExecutor.map and torch's DataLoader.

A synthetic workload of N items (default 20,000), each doing about 2 ms of numpy work that
releases the GIL (sorting) and about 0.2 ms of Python, batched by 32, on the machine's cores.
All three run the same work with the same parallelism (2 threads, or 2 worker processes for
the DataLoader); the record gives items/s and the Loader's ratio to the best of the other two.

Run: ``python benchmarks/pipeline_overhead.py [--items N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import framefeed

_DATA = np.random.default_rng(0).random(280_000)


def work(i: int) -> dict[str, Any]:
    """~2 ms of GIL-free sorting plus ~0.2 ms of Python."""
    out = np.sort(_DATA)  # numpy releases the GIL while sorting floats
    acc = 0
    for k in range(3000):
        acc += k ^ i
    return {"i": i, "v": float(out[i % len(out)]) + acc * 0.0}


class _Items(Dataset[dict[str, Any]]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return work(i)


def _time(run: Any) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    n, threads, batch = args.items, args.threads, args.batch_size
    t0 = time.perf_counter()
    for i in range(200):
        work(i)
    per_item_ms = (time.perf_counter() - t0) / 200 * 1e3

    def run_loader() -> None:
        with framefeed.Loader(range(n), fetch=work, batch_size=batch, threads=threads) as loader:
            count = sum(len(b["i"]) for b in loader)
        assert count == n

    def run_pool() -> None:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(work, range(n)))
        batches = [framefeed.collate(results[s : s + batch]) for s in range(0, n, batch)]
        assert sum(len(b["i"]) for b in batches) == n

    def run_dataloader() -> None:
        loader = DataLoader(_Items(n), batch_size=batch, num_workers=threads)
        assert sum(len(b["i"]) for b in loader) == n

    torch.set_num_threads(1)
    seconds = {
        "loader": _time(run_loader),
        "thread_pool_map": _time(run_pool),
        "torch_dataloader": _time(run_dataloader),
    }
    rates = {k: round(n / v, 1) for k, v in seconds.items()}
    best_other = max(rates["thread_pool_map"], rates["torch_dataloader"])
    print(
        json.dumps(
            {
                "bench": "pipeline_overhead",
                "items": n,
                "threads": threads,
                "batch_size": batch,
                "serial_ms_per_item": round(per_item_ms, 3),
                "items_per_s": rates,
                "loader_over_best_other": round(rates["loader"] / best_other, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
