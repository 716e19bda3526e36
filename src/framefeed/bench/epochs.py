"""Batches of a loader epoch after epoch, and the `framefeed.Loader`'s stage table over a window.

A `framefeed.Loader` keeps per-stage statistics for its current iteration only; `Epochs` adds
up the epochs it has finished, so ``window_stats(start, end)`` gives the stages' work between
two points of a run that crosses epoch boundaries (the benchmark's measured window, without
its warm-up).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields, replace
from typing import Any

from ..loader import Loader, StageStats
from ..loader.stats import format_table

__all__ = ["Epochs", "format_stage_records", "stage_records", "window_stats"]


class Epochs:
    """Iterate ``loader`` epoch after epoch, calling ``set_epoch`` before each one.

    A `framefeed.Loader` passes ``set_epoch`` on to its source and sampler; for a torch
    ``DataLoader`` it is called on the dataset (framefeed's `IterableDataset` shares it with
    persistent workers) and on the sampler, when they have one.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch = 0
        self._finished: list[list[StageStats]] = []

    def __iter__(self) -> Iterator[Any]:
        while True:
            self._set_epoch(self.epoch)
            yield from self.loader
            if isinstance(self.loader, Loader):
                self._finished.append(self.loader.stats())
            self.epoch += 1

    def _set_epoch(self, epoch: int) -> None:
        if isinstance(self.loader, Loader):
            self.loader.set_epoch(epoch)
            return
        for owner in (getattr(self.loader, "dataset", None), getattr(self.loader, "sampler", None)):
            set_epoch = getattr(owner, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def stage_stats(self) -> list[StageStats] | None:
        """The Loader's stage statistics since the first epoch began (None: not a Loader).

        Call it between batches (the current epoch's counters are then not yet in the total).
        """
        if not isinstance(self.loader, Loader):
            return None
        return _total([*self._finished, self.loader.stats()])


def _weight(s: StageStats) -> int:
    return s.items + s.errors


def _total(parts: Sequence[Sequence[StageStats]]) -> list[StageStats]:
    """Stage by stage sums; ``queue_mean`` weighted by items, ``queue_max`` the largest."""
    out = []
    for stages in zip(*parts, strict=True):
        weight = sum(_weight(s) for s in stages)
        out.append(
            replace(
                stages[0],
                items=sum(s.items for s in stages),
                busy_s=sum(s.busy_s for s in stages),
                waited_s=sum(s.waited_s for s in stages),
                blocked_s=sum(s.blocked_s for s in stages),
                queue_mean=(
                    sum(s.queue_mean * _weight(s) for s in stages) / weight if weight else 0.0
                ),
                queue_max=max(s.queue_max for s in stages),
                errors=sum(s.errors for s in stages),
                skipped=sum(s.skipped for s in stages),
            )
        )
    return out


def window_stats(start: Sequence[StageStats], end: Sequence[StageStats]) -> list[StageStats]:
    """What each stage did between two `Epochs.stage_stats` snapshots.

    Counts and seconds are exact differences; ``queue_mean`` is the items-weighted mean over the
    window; ``queue_max`` is the largest seen since the start of the run (warm-up included).
    """
    out = []
    for a, b in zip(start, end, strict=True):
        weight = _weight(b) - _weight(a)
        queued = b.queue_mean * _weight(b) - a.queue_mean * _weight(a)
        out.append(
            replace(
                b,
                items=b.items - a.items,
                busy_s=b.busy_s - a.busy_s,
                waited_s=b.waited_s - a.waited_s,
                blocked_s=b.blocked_s - a.blocked_s,
                queue_mean=max(queued / weight, 0.0) if weight > 0 else 0.0,
                errors=b.errors - a.errors,
                skipped=b.skipped - a.skipped,
            )
        )
    return out


def stage_records(stats: Sequence[StageStats]) -> list[dict[str, Any]]:
    """JSON-ready rows (`StageStats` fields, seconds rounded, plus ``mean_ms``)."""
    rows = []
    for s in stats:
        row: dict[str, Any] = {
            k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(s).items()
        }
        row["mean_ms"] = round(s.mean_s * 1e3, 3)
        rows.append(row)
    return rows


def format_stage_records(rows: Sequence[dict[str, Any]]) -> str:
    """The table of `stage_records` rows, as `framefeed.Loader.stats_table` prints it."""
    names = {f.name for f in fields(StageStats)}
    return format_table([StageStats(**{k: v for k, v in r.items() if k in names}) for r in rows])
