"""`SampleIndex`: global sample numbers <-> (segment, frame), in O(segments) memory.

The index keeps only the positions of the selected segments and the cumulative count of samples
before each of them, so a million episodes of a hundred frames each cost a few tens of
megabytes, and mapping a whole batch is one vectorised ``searchsorted``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .catalog import Dataset
from .errors import ConfigError

__all__ = ["SampleIndex"]


class SampleIndex:
    """Maps global sample numbers to ``(segment position, frame)`` and back.

    ``lengths[p]`` is the number of frames of segment ``p``; ``segments`` selects the segment
    positions to index (default: all), in the order given. Samples are numbered segment by
    segment, frames in order within a segment.
    """

    def __init__(self, lengths: np.ndarray, segments: np.ndarray | None = None) -> None:
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
        self.offsets = np.zeros(segments.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self._order: np.ndarray | None = None  # argsort of segments, built on first reverse lookup

    @classmethod
    def from_dataset(cls, dataset: Dataset, episodes: Iterable[int] | None = None) -> SampleIndex:
        """Index every frame of ``dataset`` or of the episodes whose ids are listed.

        As in LeRobot, a subset is served in dataset order, whatever the order of ``episodes``.
        """
        if episodes is None:
            return cls(dataset.lengths)
        wanted = np.unique(np.fromiter((int(e) for e in episodes), dtype=np.int64))
        found = np.isin(wanted, dataset.segment_ids)
        if not found.all():
            missing = wanted[~found][:10].tolist()
            raise ConfigError(
                f"{dataset.root}: episodes {missing} do not exist (the dataset has "
                f"{dataset.num_segments} episodes)"
            )
        positions = np.flatnonzero(np.isin(dataset.segment_ids, wanted))
        return cls(dataset.lengths, positions)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_segments(self) -> int:
        return int(self.segments.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.segments.nbytes + self.lengths.nbytes + self.offsets.nbytes)

    def locate(self, indices: np.ndarray | Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Segment positions and frames of global sample numbers (negative: from the end)."""
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
        return self.segments[slot], idx - self.offsets[slot]

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
        lengths = self.lengths[slot]
        if np.any((frm < 0) | (frm >= lengths)):
            raise IndexError("frame outside its segment")
        out: np.ndarray = self.offsets[slot] + frm
        return out
