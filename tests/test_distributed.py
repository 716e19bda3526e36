"""A real torch.distributed run: 2 gloo ranks on 127.0.0.1, each with 2 DataLoader workers."""

from __future__ import annotations

import itertools
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


def _map_rank_main(rank: int, root: str, port: int, out: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        ds = framefeed.MapDataset(root)
        # No rank or world size given: the sampler takes them from torch.distributed.
        sampler = framefeed.EpisodeAwareSampler(ds.index, drop_first=1, drop_last=2, seed=3)
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=sampler,
            num_workers=2,
            multiprocessing_context="fork",
            collate_fn=framefeed.collate,
            timeout=60,
        )
        seen, steps = [], 0
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in loader:
                steps += 1
                seen.extend((epoch, int(i)) for i in batch["index"])
                dist.all_reduce(torch.ones(1))  # unequal step counts would hang here
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {"rank": sampler.rank, "world": sampler.world_size, "steps": steps, "seen": seen}
            )
        )
        dist.barrier()
        ds.close()
    finally:
        dist.destroy_process_group()


def test_gloo_map_style_ranks_share_the_episode_aware_order(
    rollover_root: Path, tmp_path: Path
) -> None:
    mp.spawn(
        _map_rank_main,
        args=(str(rollover_root), free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, WORLD), (1, WORLD)]
    assert results[0]["steps"] == results[1]["steps"]
    with framefeed.MapDataset(rollover_root) as ds:
        offsets = ds.index.offsets.tolist()
    kept = {i for start, stop in itertools.pairwise(offsets) for i in range(start + 1, stop - 2)}
    for epoch in range(2):
        per_rank = [[i for e, i in r["seen"] if e == epoch] for r in results]
        assert len(per_rank[0]) == len(per_rank[1]) == -(-len(kept) // WORLD)
        assert set(per_rank[0]) | set(per_rank[1]) == kept  # jointly complete, nothing dropped
        # disjoint, except the padding that wraps around to make the shares equal
        assert len(set(per_rank[0]) & set(per_rank[1])) == 2 * len(per_rank[0]) - len(kept)
    epochs = [[i for e, i in results[0]["seen"] if e == epoch] for epoch in range(2)]
    assert epochs[0] != epochs[1]  # set_epoch reshuffled
