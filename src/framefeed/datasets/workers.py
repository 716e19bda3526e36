"""`worker_init`: an optional DataLoader ``worker_init_fn`` for user hooks.

framefeed needs no ``worker_init_fn``: every process builds its own planner, decoders and file
handles on first use. `worker_init` is for what users want to run in each worker: their own
hooks, called with the worker id and the worker's dataset copy, and optionally the dataset's
``prepare()`` (load the columns and video indexes before the first batch instead of during it).
It pickles, so it works with ``spawn`` and ``forkserver`` workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.data

from ..errors import ConfigError

__all__ = ["WorkerInit", "worker_init"]

Hook = Callable[[int, Any], None]
"""A user hook: ``hook(worker_id, dataset)``; it must be picklable for spawned workers."""


class WorkerInit:
    """Calls ``prepare()`` on the worker's dataset (if asked), then each hook in order."""

    def __init__(self, hooks: tuple[Hook, ...], prepare: bool) -> None:
        self.hooks = hooks
        self.prepare = prepare

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise ConfigError("worker_init runs inside DataLoader worker processes only")
        dataset = info.dataset
        if self.prepare:
            prepare = getattr(dataset, "prepare", None)
            if prepare is None:
                raise ConfigError(
                    f"worker_init(prepare=True): {type(dataset).__name__} has no prepare()"
                )
            prepare()
        for hook in self.hooks:
            hook(worker_id, dataset)


def worker_init(*hooks: Hook, prepare: bool = False) -> WorkerInit:
    """A ``worker_init_fn`` running ``hooks(worker_id, dataset)`` in every worker.

    ``prepare=True`` loads the dataset's columns and packet indexes in each worker before its
    first batch (useful with ``spawn`` workers; with ``fork``, call ``prepare()`` in the parent
    instead and the workers inherit what it loaded).
    """
    for hook in hooks:
        if not callable(hook):
            raise ConfigError(f"worker_init hooks must be callables, got {hook!r}")
    return WorkerInit(tuple(hooks), prepare)
