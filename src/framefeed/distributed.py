"""Distributed training: one call that gives each rank its dataset, with per-node shared caches.

Under DDP every rank of a node needs the same tabular columns. `init` builds the rank's dataset
with the node-shared column cache (`framefeed.ColumnCache`) and fills the cache with one writer
per node: local rank 0 reads the columns and writes the cache files while the other local ranks
wait at a barrier, then map what it wrote. Without an initialised process group (ranks started
by hand, or a single process) the cache's file lock alone picks one writer per entry.

DataLoader workers need no ``worker_init_fn``: each worker builds its own video engine, decoders
and thread pools on first use, and maps the cache files the rank prepared.
"""

from __future__ import annotations

import os
import socket
from typing import Any, overload

import torch

from .catalog import Dataset
from .datasets import IterableDataset, MapDataset
from .errors import ConfigError
from .nodecache import ColumnCache

__all__ = ["init", "local_rank"]

Source = str | os.PathLike[str] | Dataset


def local_rank(group: Any = None) -> tuple[int, int]:
    """This process's rank among the ranks of its node, and how many ranks the node runs.

    From ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by ``torchrun``); else, with an initialised
    process group, by comparing host names across ranks (a collective: every rank must call
    it); else ``(0, 1)``.
    """
    env_rank, env_size = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if env_rank is not None and env_size is not None:
        rank, size = int(env_rank), int(env_size)
        if not 0 <= rank < size:
            raise ConfigError(f"LOCAL_RANK={rank} is not in [0, LOCAL_WORLD_SIZE={size})")
        return rank, size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        hosts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        me = dist.get_rank(group)
        mine = [r for r, host in enumerate(hosts) if host == hosts[me]]
        return mine.index(me), len(mine)
    return 0, 1


@overload
def init(
    source: Source,
    *,
    dataset_type: type[IterableDataset],
    column_cache: ColumnCache | bool = True,
    group: Any = None,
    **dataset_kwargs: Any,
) -> IterableDataset: ...


@overload
def init(
    source: Source,
    *,
    dataset_type: type[MapDataset] = ...,
    column_cache: ColumnCache | bool = True,
    group: Any = None,
    **dataset_kwargs: Any,
) -> MapDataset: ...


def init(
    source: Source,
    *,
    dataset_type: type[MapDataset] | type[IterableDataset] = MapDataset,
    column_cache: ColumnCache | bool = True,
    group: Any = None,
    **dataset_kwargs: Any,
) -> MapDataset | IterableDataset:
    """This rank's dataset, its tabular columns in the node's shared cache.

    Call it on every rank, after ``torch.distributed.init_process_group`` (or with
    ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` set). ``dataset_type`` is `MapDataset` (default) or
    `IterableDataset`, which takes its rank and world size from the process group;
    ``dataset_kwargs`` go to it. ``column_cache`` is on by default here (``False`` turns it off,
    a `ColumnCache` chooses the folder and bound). ``group`` is the process group used for the
    barrier (default: the whole world; every rank of it must call `init`).
    """
    if dataset_type not in (MapDataset, IterableDataset):
        raise ConfigError(f"dataset_type must be MapDataset or IterableDataset, not {dataset_type}")
    cache = ColumnCache.resolve(column_cache)
    dataset = dataset_type(source, column_cache=cache, **dataset_kwargs)
    if cache is None:
        return dataset
    rank, _ = local_rank(group)
    dist = torch.distributed
    synced = dist.is_available() and dist.is_initialized()
    if rank == 0 or not synced:
        _load_columns(dataset)  # the node's writer (without a group: whoever locks first)
    if synced:
        dist.barrier(group=group)
        if rank != 0:
            _load_columns(dataset)  # maps the files local rank 0 wrote
    return dataset


def _load_columns(dataset: MapDataset | IterableDataset) -> None:
    planner = dataset._plan()
    planner.store.load(planner.store_columns())
