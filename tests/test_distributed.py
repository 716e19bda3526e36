"""A real torch.distributed run: 2 gloo ranks on 127.0.0.1, each with 2 DataLoader workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, init_gloo
from torch.utils.data import DataLoader

import framefeed

pytestmark = pytest.mark.timeout(240)
WORLD = 2


def _rank_main(rank: int, root: str, port: int, out: str, uneven: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        # No rank or world size given: the dataset takes them from torch.distributed.
        ds = framefeed.IterableDataset(
            root, episode_pool_size=2, fetch_size=8, seed=1, uneven=uneven
        )
        loader = DataLoader(
            ds, batch_size=4, num_workers=2, multiprocessing_context="fork", timeout=60
        )
        seen, steps = [], 0
        for epoch in range(2):
            ds.set_epoch(epoch)
            for batch in loader:
                steps += 1
                seen.extend((epoch, int(i)) for i in batch["index"])
                # A collective per step, as DDP does: unequal step counts would hang here.
                if uneven == "pad":
                    dist.all_reduce(torch.ones(1))
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"rank": ds.rank, "world": ds.world_size, "steps": steps, "seen": seen})
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("uneven", ["pad", "uneven"])
def test_gloo_ranks_are_disjoint_complete_and_in_step(
    rollover_root: Path, tmp_path: Path, uneven: str
) -> None:
    mp.spawn(
        _rank_main,
        args=(str(rollover_root), free_port(), str(tmp_path), uneven),
        nprocs=WORLD,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, WORLD), (1, WORLD)]
    total = framefeed.open_dataset(rollover_root).num_frames
    for epoch in range(2):
        per_rank = [{i for e, i in r["seen"] if e == epoch} for r in results]
        assert per_rank[0].isdisjoint(per_rank[1])  # padding repeats a rank's own samples
        assert per_rank[0] | per_rank[1] == set(range(total))
        if uneven == "uneven":
            counts = sum(sum(1 for e, _ in r["seen"] if e == epoch) for r in results)
            assert counts == total  # every sample exactly once
    if uneven == "pad":
        assert results[0]["steps"] == results[1]["steps"]
