"""Per-stage statistics of the `Loader` pipeline: where the time goes, and which stage starves.

Every stage thread owns a `StageCounter` and reports to it as it works; `StageCounter.snapshot`
gives an immutable `StageStats` and `format_table` prints a list of them. Reading the table: the
stage with the largest ``busy_s`` per thread is the bottleneck; stages after it show large
``waited_s`` (starved of input), stages before it large ``blocked_s`` (their output is full).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StageCounter", "StageStats", "format_table"]


@dataclass(frozen=True, kw_only=True)
class StageStats:
    """What one pipeline stage did during the latest iteration of a `Loader`."""

    name: str
    """The stage: ``source``, ``fetch``, ``collate``, ``transfer`` or ``sink`` (the consumer)."""
    threads: int
    """How many threads ran the stage (``busy_s`` is summed over them)."""
    items: int
    """Items the stage finished successfully (for ``sink``: items handed to the consumer)."""
    busy_s: float
    """Seconds spent working on items (for ``sink``: the consumer's time between items)."""
    waited_s: float
    """Seconds spent waiting for input from the stage before (starvation)."""
    blocked_s: float
    """Seconds spent waiting for room in the next stage's buffer (back-pressure)."""
    queue_mean: float
    """Mean occupancy of the stage's input buffer, sampled whenever the stage took an item.

    The fetch threads pull from the source directly: for ``fetch`` this is the items pulled and
    not yet out of the reordering (at most ``threads + buffer_size``); for ``collate`` the
    chunks of reordered items waiting for it (a batch's worth each when batching)."""
    queue_max: int
    """Largest occupancy of the stage's input buffer seen."""
    errors: int
    """Items whose processing raised an exception in this stage."""
    skipped: int
    """Of those, items dropped because of ``on_error="skip"``."""

    @property
    def mean_s(self) -> float:
        """Mean seconds of work per item (successful or failed)."""
        done = self.items + self.errors
        return self.busy_s / done if done else 0.0


class StageCounter:
    """Thread-safe accumulator behind one `StageStats`."""

    def __init__(self, name: str, threads: int = 1) -> None:
        self.name = name
        self.threads = threads
        self._lock = threading.Lock()
        self._items = 0
        self._busy = 0.0
        self._waited = 0.0
        self._blocked = 0.0
        self._queue_sum = 0
        self._queue_samples = 0
        self._queue_max = 0
        self._errors = 0
        self._skipped = 0

    def work(self, seconds: float, *, ok: bool = True) -> None:
        """One item processed in ``seconds``; ``ok=False`` counts the time but not the item."""
        with self._lock:
            self._busy += seconds
            if ok:
                self._items += 1

    def waited(self, seconds: float) -> None:
        with self._lock:
            self._waited += seconds

    def blocked(self, seconds: float) -> None:
        with self._lock:
            self._blocked += seconds

    def queue(self, occupancy: int) -> None:
        with self._lock:
            self._queue_sum += occupancy
            self._queue_samples += 1
            self._queue_max = max(self._queue_max, occupancy)

    def error(self, *, skipped: bool) -> None:
        with self._lock:
            self._errors += 1
            if skipped:
                self._skipped += 1

    def snapshot(self) -> StageStats:
        with self._lock:
            samples = self._queue_samples
            return StageStats(
                name=self.name,
                threads=self.threads,
                items=self._items,
                busy_s=self._busy,
                waited_s=self._waited,
                blocked_s=self._blocked,
                queue_mean=self._queue_sum / samples if samples else 0.0,
                queue_max=self._queue_max,
                errors=self._errors,
                skipped=self._skipped,
            )


_COLUMNS = (
    "stage",
    "threads",
    "items",
    "busy_s",
    "mean_ms",
    "waited_s",
    "blocked_s",
    "queue_mean",
    "queue_max",
    "errors",
    "skipped",
)


def format_table(stats: Sequence[StageStats]) -> str:
    """A fixed-width text table, one row per stage, in pipeline order."""
    rows = [list(_COLUMNS)]
    for s in stats:
        rows.append(
            [
                s.name,
                str(s.threads),
                str(s.items),
                f"{s.busy_s:.3f}",
                f"{s.mean_s * 1e3:.2f}",
                f"{s.waited_s:.3f}",
                f"{s.blocked_s:.3f}",
                f"{s.queue_mean:.2f}",
                str(s.queue_max),
                str(s.errors),
                str(s.skipped),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
