"""Process-tree measurements from /proc: memory (RSS and PSS) and machine CPU use."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["PeakMemory", "cpu_busy_seconds", "tree_cpu_seconds", "tree_memory"]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree_memory(
    root_pid: int, exclude: frozenset[int] = frozenset(), pids: set[int] | None = None
) -> tuple[int, int]:
    """Resident and proportional set size (bytes) of ``root_pid`` and its descendants.

    ``pids``, when given, receives the process ids that were counted.
    """
    children = _children()
    rss = pss = 0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        if pids is not None:
            pids.add(pid)
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(pid, []))
    return rss, pss


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds() -> float:
    """User + system CPU of this process, its exited children and its live children."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total + ticks / os.sysconf("SC_CLK_TCK")


class PeakMemory:
    """Samples this process tree's RSS and PSS every ``interval_s`` in a thread; keeps peaks."""

    def __init__(self, exclude: frozenset[int] = frozenset(), interval_s: float = 0.05) -> None:
        self.exclude = exclude
        self.interval_s = interval_s
        self.rss = 0
        self.pss = 0
        self.samples: list[tuple[float, int]] = []
        """(monotonic time, tree RSS) of every sample, to see whether memory grows."""
        self.pids: set[int] = set()
        """Every process of the tree seen by a sample (worker processes that came and went)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="framefeed-peakmem", daemon=True)

    def sample(self) -> None:
        rss, pss = tree_memory(os.getpid(), self.exclude, self.pids)
        self.samples.append((time.monotonic(), rss))
        self.rss = max(self.rss, rss)
        self.pss = max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def rss_trend(samples: list[tuple[float, int]], start: float, stop: float) -> tuple[int, int]:
    """Mean tree RSS over the first and over the last quarter of ``[start, stop]``."""
    span = max(stop - start, 1e-9)
    first = [r for t, r in samples if start <= t <= start + span / 4]
    last = [r for t, r in samples if stop - span / 4 <= t <= stop]
    if samples and not first:  # a short window: the sample nearest its start
        first = [min(samples, key=lambda s: abs(s[0] - start))[1]]
    if samples and not last:
        last = [min(samples, key=lambda s: abs(s[0] - stop))[1]]
    return _mean(first), _mean(last)


def _mean(values: list[int]) -> int:
    return int(sum(values) / len(values)) if values else 0
