"""Start methods, persistent workers and DDP ranks: exact samples, nothing inherited is reused.

Every test uses the node-shared column cache, so workers and ranks also map one cache file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FPS, TOP, assert_same_batches, free_port, init_gloo
from torch.utils.data import DataLoader

import framefeed
from framefeed import ColumnCache, IterableDataset, MapDataset
from framefeed.distributed import local_rank

pytestmark = pytest.mark.timeout(240)

DELTAS = {TOP: [-1 / FPS, 0.0], "action": [0.0, 1 / FPS]}
BATCH_TIMEOUT = 120  # seconds per batch; spawned workers import torch first on a loaded machine


@pytest.fixture(scope="module")
def reference(rollover_root: Path) -> list[dict[str, Any]]:
    """Batches of 8 served in this process, without workers and without the cache."""
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as ds:
        return [ds.get_batch(range(i, min(i + 8, len(ds)))) for i in range(0, len(ds), 8)]


def _probe(samples: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collate, plus what this worker's dataset runs on (checked by the test)."""
    info = torch.utils.data.get_worker_info()
    assert info is not None
    ds = info.dataset
    planner = ds._plan()
    engine = planner.engine
    mapped = planner.store.cached("action")
    facts = {
        "pid": os.getpid(),
        "planner_pid": ds._pid,
        "engine_id": id(engine),
        "pool_pid": engine._pool_pid,
        "decoder_cache_pid": engine.cache._pid,
        "cache_inode": mapped.inode if mapped is not None else None,
        "built": planner.store.cache_stats["built"],
    }
    return framefeed.collate(samples), facts


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_start_method_serves_exact_samples(
    method: str, rollover_root: Path, tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    with MapDataset(rollover_root, delta_timestamps=DELTAS, column_cache=cache) as ds:
        ds.get_batch([0, len(ds) - 1])  # the parent has decoders, threads and a mapping now
        parent_engine = id(ds.engine)
        parent_inode = ds._plan().store.cached("action").inode  # type: ignore[union-attr]
        loader = DataLoader(
            ds,
            batch_size=8,
            num_workers=2,
            multiprocessing_context=method,
            collate_fn=_probe,
            timeout=BATCH_TIMEOUT,
        )
        got = list(loader)
    assert_same_batches([batch for batch, _ in got], reference)
    facts = [f for _, f in got]
    assert len({f["pid"] for f in facts}) == 2
    for f in facts:
        assert f["pid"] != os.getpid()
        # Everything the worker decodes with was made in the worker, never the parent's.
        assert f["planner_pid"] == f["pool_pid"] == f["decoder_cache_pid"] == f["pid"]
        if method == "fork":
            assert f["engine_id"] != parent_engine
        assert f["cache_inode"] == parent_inode  # the same file, mapped; nothing rebuilt
        assert f["built"] == 0
    assert len(list((tmp_path / "cache").glob("*.ffc"))) == len(cache.entries()) > 0


def _pid_and_batch(batch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return os.getpid(), batch


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_persistent_workers_follow_set_epoch(
    method: str, rollover_root: Path, tmp_path: Path
) -> None:
    fields = [framefeed.Field("index"), framefeed.Field("action"), framefeed.Field(TOP)]
    cache = ColumnCache(directory=str(tmp_path / "cache"))
    ds = IterableDataset(
        rollover_root,
        fields=fields,
        batch_size=4,
        episode_pool_size=2,
        seed=5,
        uneven="uneven",  # every sample exactly once per epoch
        column_cache=cache,
    )
    with MapDataset(rollover_root, fields=fields) as plain:
        total = len(plain)

        def expected(epoch: int) -> list[list[int]]:
            """Batches of a fresh, non-persistent loader for ``epoch``."""
            ds.set_epoch(epoch)
            fresh = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
            return [b["index"].tolist() for b in fresh]

        want = {epoch: expected(epoch) for epoch in (0, 1)}
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context=method,
            collate_fn=_pid_and_batch,
            timeout=BATCH_TIMEOUT,
        )
        pids: dict[int, set[int]] = {}
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            got = list(loader)
            pids[epoch] = {pid for pid, _ in got}
            assert [b["index"].tolist() for _, b in got] == want[epoch]
            for _, batch in got:  # values are the main process's values for those samples
                ref = plain.get_batch(batch["index"].tolist())
                assert torch.equal(batch["action"], ref["action"])
                assert torch.equal(batch[TOP], ref[TOP])
        del loader
    assert pids[0] == pids[1] and len(pids[0]) == 2  # the same two worker processes
    assert want[0] != want[1]
    for epoch in (0, 1):
        assert sorted(i for b in want[epoch] for i in b) == list(range(total))


_INIT_MARK = "framefeed-test-worker-init"


def _user_init(worker_id: int) -> None:
    os.environ[_INIT_MARK] = str(worker_id)
    info = torch.utils.data.get_worker_info()
    assert info is not None
    info.dataset.prepare()  # user code may warm the worker's dataset; not needed for correctness


def _marks(samples: list[dict[str, Any]]) -> list[str | None]:
    return [os.environ.get(_INIT_MARK)] * len(samples)


def test_user_worker_init_fn_runs(rollover_root: Path) -> None:
    with MapDataset(rollover_root, fields=[framefeed.Field("action")]) as ds:
        loader = DataLoader(
            ds,
            batch_size=8,
            num_workers=2,
            multiprocessing_context="fork",
            worker_init_fn=_user_init,
            collate_fn=_marks,
            timeout=BATCH_TIMEOUT,
        )
        marks = {m for batch in loader for m in batch}
    assert marks == {"0", "1"}


# -- DDP -----------------------------------------------------------------------------------------

WORLD = 2


def _worker_inode(samples: list[dict[str, Any]]) -> list[Any]:
    info = torch.utils.data.get_worker_info()
    assert info is not None
    store = info.dataset._plan().store
    mapped = store.cached("action")
    return [(mapped.inode if mapped else None, store.cache_stats["built"])] * len(samples)


def _rank_main(rank: int, root: str, cache_dir: str, port: int, out: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        where = local_rank()
        ds = framefeed.distributed.init(
            root, column_cache=ColumnCache(directory=cache_dir), delta_timestamps=DELTAS
        )
        store = ds._plan().store
        mapped = store.cached("action")
        assert mapped is not None
        loader = DataLoader(
            ds,
            batch_size=8,
            num_workers=2,
            multiprocessing_context="fork",
            collate_fn=_worker_inode,
            timeout=60,
        )
        workers = sorted({tuple(x) for batch in loader for x in batch})
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "local": list(where),
                    "stats": store.cache_stats,
                    "inode": mapped.inode,
                    "creator": mapped.header["creator"]["pid"],
                    "workers": workers,
                    "action": ds.get_batch([0, 5, 9])["action"].tolist(),
                }
            )
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_share_one_cache_written_by_local_rank_0(
    rollover_root: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    mp.spawn(
        _rank_main,
        args=(str(rollover_root), str(cache_dir), free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["local"] == [0, 2] and r1["local"] == [1, 2]  # one node, found by host name
    assert r0["stats"]["built"] > 0 and r0["stats"]["mapped"] == 0
    assert r1["stats"]["built"] == 0 and r1["stats"]["mapped"] == r0["stats"]["built"]
    assert r0["inode"] == r1["inode"] and r0["creator"] == r1["creator"] == r0["pid"]
    assert r0["workers"] == r1["workers"] == [[r0["inode"], 0]]  # workers map it too
    with MapDataset(rollover_root, delta_timestamps=DELTAS) as plain:
        want = plain.get_batch([0, 5, 9])["action"].tolist()
    assert r0["action"] == r1["action"] == want
    entries = ColumnCache(directory=str(cache_dir)).entries()
    assert len(entries) == r0["stats"]["built"]  # one file per column, nothing duplicated


def test_local_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_rank() == (0, 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_rank() == (3, 4)
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(framefeed.ConfigError):
        local_rank()


def test_init_without_a_process_group(rollover_root: Path, tmp_path: Path) -> None:
    cache = ColumnCache(directory=str(tmp_path))
    ds = framefeed.distributed.init(
        rollover_root, dataset_type=IterableDataset, column_cache=cache, seed=1
    )
    assert isinstance(ds, IterableDataset)
    assert ds._plan().store.cache_stats["built"] > 0  # columns are ready before any worker
    again = framefeed.distributed.init(rollover_root, column_cache=cache)
    assert isinstance(again, MapDataset)
    assert again._plan().store.cache_stats == {"built": 0, "mapped": len(cache.entries())}
    with pytest.raises(framefeed.ConfigError):
        framefeed.distributed.init(rollover_root, dataset_type=dict)  # type: ignore[call-overload]


def _record_hook(worker_id: int, dataset: Any) -> None:
    # Runs in the worker: what the hook saw travels back through the dataset's samples.
    os.environ["FRAMEFEED_TEST_HOOK"] = f"{worker_id}:{type(dataset).__name__}"


class _HookProbe(torch.utils.data.Dataset[Any]):
    def __init__(self, root: Path) -> None:
        self.inner = framefeed.MapDataset(root, fields=[framefeed.Field("action")])
        self.prepared = False

    def prepare(self) -> None:
        self.inner.prepare()
        self.prepared = True

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (os.environ.get("FRAMEFEED_TEST_HOOK"), self.prepared)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_init_runs_hooks_and_prepare(plain_root: Path, context: str) -> None:
    init = framefeed.worker_init(_record_hook, prepare=True)
    loader = DataLoader(
        _HookProbe(plain_root),
        batch_size=None,
        num_workers=1,
        worker_init_fn=init,
        multiprocessing_context=context,
    )
    assert [tuple(x) for x in loader] == [("0:_HookProbe", True)] * 2
    assert "FRAMEFEED_TEST_HOOK" not in os.environ  # it ran in the worker, not here
    with pytest.raises(framefeed.ConfigError, match="callables"):
        framefeed.worker_init("not a function")  # type: ignore[arg-type]
    with pytest.raises(framefeed.ConfigError, match="inside DataLoader worker"):
        init(0)
