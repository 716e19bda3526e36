"""Pipeline overhead: framefeed's Loader against ThreadPoolExecutor.map and torch's DataLoader.

A synthetic workload of N items (default 20,000), each doing about 2 ms of numpy work that
releases the GIL (sorting) and about 0.2 ms of Python, batched by 32, on the machine's cores.
All run the same work with the same parallelism: 2 threads, or 2 worker processes for the
DataLoader and for the Loader with ``executor=ProcessPoolExecutor(2)`` (``loader_processes``:
the Loader's fetch in worker processes, a batch of items per task, started inside the timed
run as the DataLoader's workers are). The machine is shared and its load drifts over minutes,
so the runners are interleaved for ``--rounds`` rounds (the order rotates each round) and
compared by their median; each run also records the CPU that other processes used meanwhile
(cores busy outside this process tree), so a disturbed run is visible. The record gives items/s
per round, the medians and each Loader's ratio to the better of the thread pool and the
DataLoader.

Run: ``python benchmarks/pipeline_overhead.py [--items N] [--threads T] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import framefeed
from framefeed.bench import cpu_busy_seconds, tree_cpu_seconds

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


def _time(run: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds of ``run()`` and the cores other processes kept busy meanwhile."""
    busy0, own0, t0 = cpu_busy_seconds(), tree_cpu_seconds(), time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    other = max(0.0, (cpu_busy_seconds() - busy0) - (tree_cpu_seconds() - own0))
    return wall, other / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
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

    def run_loader_processes() -> None:
        with (
            ProcessPoolExecutor(threads, mp_context=mp.get_context("fork")) as pool,
            framefeed.Loader(
                range(n), fetch=work, batch_size=batch, threads=threads, executor=pool
            ) as loader,
        ):
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
    runners = {
        "loader": run_loader,
        "loader_processes": run_loader_processes,
        "thread_pool_map": run_pool,
        "torch_dataloader": run_dataloader,
    }
    names = list(runners)
    rates: dict[str, list[float]] = {k: [] for k in names}
    other_cores: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, other = _time(runners[name])
            rates[name].append(round(n / wall, 1))
            other_cores[name].append(round(other, 2))
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    best_other = max(median["thread_pool_map"], median["torch_dataloader"])
    others = zip(rates["thread_pool_map"], rates["torch_dataloader"], strict=True)
    best_per_round = [max(pair) for pair in others]

    def per_round(name: str) -> list[float]:
        return [round(a / b, 3) for a, b in zip(rates[name], best_per_round, strict=True)]

    print(
        json.dumps(
            {
                "bench": "pipeline_overhead",
                "items": n,
                "threads": threads,
                "batch_size": batch,
                "rounds": args.rounds,
                "serial_ms_per_item": round(per_item_ms, 3),
                "items_per_s": rates,
                "other_cores_busy": other_cores,
                "median_items_per_s": median,
                "loader_over_best_other_per_round": per_round("loader"),
                "loader_over_best_other": round(median["loader"] / best_other, 3),
                "loader_processes_over_best_other_per_round": per_round("loader_processes"),
                "loader_processes_over_best_other": round(
                    median["loader_processes"] / best_other, 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
