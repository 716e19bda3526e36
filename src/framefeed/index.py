"""`SampleIndex`: global sample numbers <-> (segment, position), in O(segments) memory.

The index keeps only the positions of the selected segments, the cumulative count of samples
before each of them and, when windows are trimmed, each segment's first position, so a million
episodes of a hundred frames each cost a few tens of megabytes, and mapping a whole batch is one
vectorised ``searchsorted``. A position is a frame (LeRobot) or a step of a `Grid` (recordings:
``start + k * step`` on a sequence or fixed-rate time timeline).

`IndexSpec` chooses the timeline, the `FixedRateSampling` of a time timeline and what happens to
windows that leave a segment (``pad``: LeRobot's clamp and mask; ``trim``: only samples whose
whole window lies inside the segment, as Rerun's dataloader does).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .catalog import Dataset, TimelineKind
from .errors import ConfigError

__all__ = ["FixedRateSampling", "Grid", "IndexSpec", "SampleIndex"]

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class FixedRateSampling:
    """Samples every ``1 / rate_hz`` seconds from the start of each segment (time timelines)."""

    rate_hz: float
    """Sampling rate in Hz."""

    def __post_init__(self) -> None:
        rate: Any = self.rate_hz
        if not (isinstance(rate, numbers.Real) and math.isfinite(rate) and float(rate) > 0):
            raise ConfigError(f"FixedRateSampling: rate_hz must be positive, got {self.rate_hz!r}")
        if round(NS_PER_S / self.rate_hz) < 1:
            raise ConfigError(f"FixedRateSampling: {self.rate_hz} Hz is above 1 GHz")

    @property
    def step_ns(self) -> int:
        """Nanoseconds between samples (rounded to the nearest nanosecond)."""
        return round(NS_PER_S / self.rate_hz)


@dataclass(frozen=True, kw_only=True)
class IndexSpec:
    """How samples are addressed: the timeline, its sampling and the window mode."""

    timeline: str | None = None
    """Index timeline; default: ``frame_index`` for LeRobot, else the first sequence timeline."""
    sampling: FixedRateSampling | None = None
    """Grid on a time timeline (required there); sequence timelines use every step."""
    window_mode: Literal["pad", "trim"] = "pad"
    """``pad``: windows leaving a segment are clamped and masked (LeRobot). ``trim``: samples
    whose window would leave the segment are not in the index (Rerun)."""

    def __post_init__(self) -> None:
        if self.window_mode not in ("pad", "trim"):
            raise ConfigError(f"window_mode must be 'pad' or 'trim', not {self.window_mode!r}")


@dataclass(frozen=True, eq=False)
class Grid:
    """Index values of a recording's samples: ``start[segment] + k * step``."""

    timeline: str
    kind: TimelineKind
    start: np.ndarray
    """(segments,) int64 first index value of each segment."""
    end: np.ndarray
    """(segments,) int64 last index value of each segment (inclusive)."""
    step: int
    """Index units between samples (ns on a time timeline, 1 on a sequence timeline)."""

    @classmethod
    def for_dataset(cls, dataset: Dataset, spec: IndexSpec) -> Grid:
        name = spec.timeline or _default_timeline(dataset)
        timeline = dataset.timeline(name)
        if name not in dataset.ranges:
            raise ConfigError(f"{dataset.root}: timeline {name!r} has no per-segment ranges")
        start, end = dataset.ranges[name]
        if timeline.kind is TimelineKind.TIME:
            if spec.sampling is None:
                raise ConfigError(
                    f"{dataset.root}: timeline {name!r} counts time; sample it on a fixed-rate "
                    f"grid with IndexSpec(timeline={name!r}, sampling=FixedRateSampling(rate_hz))"
                )
            step = spec.sampling.step_ns
        else:
            if spec.sampling is not None:
                raise ConfigError(
                    f"{dataset.root}: timeline {name!r} is a sequence: every step is a sample, "
                    "so FixedRateSampling does not apply"
                )
            step = 1
        return cls(timeline=name, kind=timeline.kind, start=start, end=end, step=step)

    def counts(self) -> np.ndarray:
        """Grid points of each segment."""
        out: np.ndarray = (self.end - self.start) // self.step + 1
        return out

    def values(self, segments: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Index values of grid steps ``k`` of ``segments``."""
        out: np.ndarray = self.start[segments] + k * self.step
        return out


def _default_timeline(dataset: Dataset) -> str:
    for t in dataset.timelines:
        if t.kind is TimelineKind.SEQUENCE and t.name in dataset.ranges:
            return t.name
    names = [t.name for t in dataset.timelines]
    raise ConfigError(
        f"{dataset.root}: no sequence timeline to index by default; choose one of {names} with "
        "IndexSpec(timeline=..., sampling=FixedRateSampling(rate_hz)) for a time timeline"
    )


def episode_ids(episodes: object, what: str) -> np.ndarray:
    """Episode ids given by a user as int64, or a `ConfigError` that says what is wrong."""
    if isinstance(episodes, str | bytes) or not isinstance(episodes, Iterable):
        raise ConfigError(f"{what} must be a list of episode ids such as [0, 3], not {episodes!r}")
    ids = list(episodes)
    bad = [e for e in ids if isinstance(e, bool) or not isinstance(e, numbers.Integral)]
    if bad:
        raise ConfigError(f"{what} must be integer episode ids, got {bad[0]!r}")
    big = [e for e in ids if not -(2**63) <= int(e) < 2**63]
    if big:
        raise ConfigError(f"{what}: episode {big[0]} does not exist")
    return np.asarray([int(e) for e in ids], dtype=np.int64)


class SampleIndex:
    """Maps global sample numbers to ``(segment position, frame)`` and back.

    ``lengths[p]`` is the number of samples of segment ``p``; ``segments`` selects the segment
    positions to index (default: all), in the order given; ``firsts[p]`` is the position of the
    first sample of segment ``p`` (default 0; windows trimmed at the start raise it). Samples
    are numbered segment by segment, positions in order within a segment.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        segments: np.ndarray | None = None,
        firsts: np.ndarray | None = None,
    ) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1:
            raise ConfigError("lengths must be one-dimensional")
        if segments is None:
            segments = np.arange(lengths.shape[0], dtype=np.int64)
        segments = np.asarray(segments, dtype=np.int64)
        if segments.size and (segments.min() < 0 or segments.max() >= lengths.shape[0]):
            raise ConfigError(f"segment positions must lie in [0, {lengths.shape[0]})")
        self.segments = segments
        self.lengths = lengths[segments]
        if self.lengths.size and self.lengths.min() < 0:
            raise ConfigError("segment lengths must not be negative")
        self.firsts = (
            np.zeros(segments.shape[0], dtype=np.int64)
            if firsts is None
            else np.asarray(firsts, dtype=np.int64)[segments]
        )
        self.offsets = np.zeros(segments.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self._order: np.ndarray | None = None  # argsort of segments, built on first reverse lookup
        self.points: np.ndarray | None = None
        """Explicit position of every sample, when samples inside a segment have gaps."""

    @classmethod
    def from_dataset(cls, dataset: Dataset, episodes: Iterable[int] | None = None) -> SampleIndex:
        """Index every frame of ``dataset`` or of the episodes whose ids are listed.

        As in LeRobot, a subset is served in dataset order, whatever the order of ``episodes``.
        A view serves only its segments (``episodes`` must lie inside it).
        """
        selected = dataset.selected_positions
        if episodes is None:
            return cls(dataset.lengths, selected if dataset.selection is not None else None)
        wanted = np.unique(episode_ids(episodes, "episodes"))
        if wanted.size == 0:
            raise ConfigError(
                f"{dataset.root}: episodes=[] selects no episode; pass None for all of them"
            )
        found = np.isin(wanted, dataset.segment_ids)
        if not found.all():
            missing = wanted[~found][:10].tolist()
            raise ConfigError(
                f"{dataset.root}: episodes {missing} do not exist (the dataset has "
                f"{dataset.num_segments} episodes)"
            )
        positions = np.flatnonzero(np.isin(dataset.segment_ids, wanted))
        outside = np.setdiff1d(positions, selected)
        if outside.size:
            raise ConfigError(
                f"{dataset.root}: episodes {dataset.segment_ids[outside][:10].tolist()} are not "
                "in this view"
            )
        return cls(dataset.lengths, positions)

    def restricted(self, counts: np.ndarray, firsts: np.ndarray, what: str) -> SampleIndex:
        """This index with ``counts[p]`` samples per segment from position ``firsts[p]``.

        ``counts`` and ``firsts`` are per dataset segment position. Segments left with no sample
        drop out; if none is left, a `ConfigError` says so with ``what`` (the cause).
        """
        counts = np.asarray(counts, dtype=np.int64)
        keep = self.segments[counts[self.segments] > 0]
        if keep.size == 0:
            raise ConfigError(f"no samples left: {what}")
        return SampleIndex(np.maximum(counts, 0), keep, firsts)

    def within(self, ranges: dict[int, tuple[int, int]], what: str) -> SampleIndex:
        """Only positions ``[start, stop)`` of the segments named in ``ranges`` (by position)."""
        if not ranges:
            return self
        every = np.arange(len(self), dtype=np.int64)
        segs, positions = self.locate(every)
        keep = np.ones(len(self), dtype=bool)
        for seg, (start, stop) in ranges.items():
            sel = segs == seg
            keep[sel] = (positions[sel] >= start) & (positions[sel] < stop)
        return self.filtered(keep, what)

    def filtered(self, keep: np.ndarray, what: str) -> SampleIndex:
        """This index with only the samples where ``keep`` (one bool per sample) is true.

        The result stores the kept positions explicitly (memory grows with the samples).
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ConfigError(f"keep must have one entry per sample ({len(self)})")
        kept = np.flatnonzero(keep)
        if kept.size == 0:
            raise ConfigError(f"no samples left: {what}")
        segs, positions = self.locate(kept)
        counts = np.zeros(int(self.segments.max()) + 1, dtype=np.int64)
        np.add.at(counts, segs, 1)
        order = self.segments[counts[self.segments] > 0]
        out = SampleIndex(counts, order)
        out.points = positions  # kept in this index's order: segment by segment, ascending
        return out

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_segments(self) -> int:
        return int(self.segments.shape[0])

    @property
    def nbytes(self) -> int:
        extra = self.points.nbytes if self.points is not None else 0
        return int(self.segments.nbytes + self.lengths.nbytes + self.offsets.nbytes + extra)

    def locate(self, indices: np.ndarray | Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Segment positions and positions inside them of global sample numbers (negative:
        from the end)."""
        idx = np.asarray(
            indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64
        )
        n = len(self)
        wrapped = np.where(idx < 0, idx + n, idx)
        outside = (wrapped < 0) | (wrapped >= n)
        if outside.any():
            bad = int(idx[outside][0])
            raise IndexError(f"sample {bad} out of range for an index of {n} samples")
        idx = wrapped
        slot = np.searchsorted(self.offsets, idx, side="right") - 1
        if self.points is not None:
            return self.segments[slot], self.points[idx]
        return self.segments[slot], idx - self.offsets[slot] + self.firsts[slot]

    def global_index(self, segment: np.ndarray | int, frame: np.ndarray | int) -> np.ndarray:
        """Global sample numbers of ``(segment position, frame)`` pairs."""
        seg = np.atleast_1d(np.asarray(segment, dtype=np.int64))
        frm = np.atleast_1d(np.asarray(frame, dtype=np.int64))
        if self._order is None:
            self._order = np.argsort(self.segments, kind="stable")
        order = self._order
        where = np.searchsorted(self.segments, seg, sorter=order).clip(0, max(len(order) - 1, 0))
        slot = order[where] if len(order) else where
        if not np.array_equal(self.segments[slot], seg):
            raise IndexError("a segment position is not in this index")
        if self.points is not None:
            local = np.empty_like(frm)
            for i, (s, f) in enumerate(zip(slot.tolist(), frm.tolist(), strict=True)):
                part = self.points[self.offsets[s] : self.offsets[s + 1]]
                j = int(np.searchsorted(part, f))
                local[i] = j if j < len(part) and part[j] == f else -1
        else:
            local = frm - self.firsts[slot]
        if np.any((local < 0) | (local >= self.lengths[slot])):
            raise IndexError("frame outside its segment's samples")
        out: np.ndarray = self.offsets[slot] + local
        return out
