"""Per-episode feature statistics and their aggregation, computed the way LeRobot 0.4.4 does.

Numeric features: ``{min, max, mean, std, count, q01, q10, q50, q90, q99}`` over the episode's
frames (per dimension). Image and video features: per-channel statistics in [0, 1], shaped
``(3, 1, 1)``, over a subsample of frames (about 100, evenly spaced) that are also subsampled in
space when large. Aggregation across episodes: elementwise min/max, count-weighted mean, pooled
std and count-weighted mean of the per-episode quantiles (format spec section 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUANTILES",
    "STAT_NAMES",
    "ImageStats",
    "aggregate_stats",
    "image_sample_indices",
    "numeric_stats",
]

QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
"""Quantile statistics and their levels."""
STAT_NAMES: tuple[str, ...] = ("min", "max", "mean", "std", "count", *QUANTILES)
"""Statistic names in the order of the ``stats/<feature>/<stat>`` episode columns."""

Stats = dict[str, npt.NDArray[np.generic]]


def numeric_stats(values: npt.NDArray[np.generic]) -> Stats:
    """Statistics of a ``(frames,)`` or ``(frames, dim)`` array; scalars give shape-(1,) stats.

    ``min``/``max`` keep the feature's dtype (int64 stays int64, bool stays bool); ``mean``,
    ``std`` and the quantiles are float64; ``count`` is ``[frames]`` as int64.
    """
    array = values[:, None] if values.ndim == 1 else values
    as_float = array.astype(np.float64)
    stats: Stats = {
        "min": array.min(axis=0),
        "max": array.max(axis=0),
        "mean": as_float.mean(axis=0),
        "std": as_float.std(axis=0),
        "count": np.array([len(array)], dtype=np.int64),
    }
    for name, level in QUANTILES.items():
        stats[name] = np.quantile(as_float, level, axis=0)
    return {name: stats[name] for name in STAT_NAMES}


def image_sample_indices(num_frames: int) -> list[int]:
    """Frames LeRobot samples for image statistics: about 100, evenly spaced."""
    num_samples = max(min(100, num_frames), min(int(num_frames**0.75), 10_000))
    return [int(i) for i in np.round(np.linspace(0, num_frames - 1, num_samples))]


def _spatial_step(height: int, width: int) -> int:
    """LeRobot's ``auto_downsample_height_width``: keep every k-th pixel of large images."""
    if max(height, width) < 300:
        return 1
    return max(1, int(max(height, width) / 150))


class ImageStats:
    """Accumulates per-channel statistics of one episode's sampled frames of one camera.

    Pixels are uint8, so per-channel histograms give exact min/max/mean/std and exactly the
    linear-interpolated quantiles ``np.quantile`` would return, without keeping the frames.
    """

    def __init__(self, num_frames: int) -> None:
        self._wanted = set(image_sample_indices(num_frames))
        self._seen: set[int] = set()
        self._histograms = np.zeros((3, 256), dtype=np.int64)
        self._count = 0

    def add(self, frame: int, image: npt.NDArray[np.uint8]) -> None:
        """Offer frame ``frame`` (HWC uint8 RGB); it counts once, and only if it is sampled."""
        if frame not in self._wanted or frame in self._seen:
            return
        self._seen.add(frame)
        step = _spatial_step(image.shape[0], image.shape[1])
        pixels = image[::step, ::step]
        for channel in range(3):
            self._histograms[channel] += np.bincount(pixels[:, :, channel].ravel(), minlength=256)
        self._count += 1

    def result(self) -> Stats:
        """The statistics in [0, 1], each ``(3, 1, 1)``; ``count`` is the number of frames."""
        levels = np.arange(256, dtype=np.float64)
        stats: Stats = {}
        mins, maxs, means, stds = [], [], [], []
        quantiles: dict[str, list[float]] = {name: [] for name in QUANTILES}
        for hist in self._histograms:
            total = int(hist.sum())
            present = np.flatnonzero(hist)
            mins.append(float(present[0]))
            maxs.append(float(present[-1]))
            mean = float((levels * hist).sum() / total)
            means.append(mean)
            stds.append(math.sqrt(float(((levels - mean) ** 2 * hist).sum() / total)))
            cumulative = np.cumsum(hist)
            for name, level in QUANTILES.items():
                quantiles[name].append(_histogram_quantile(cumulative, total, level))
        columns = {"min": mins, "max": maxs, "mean": means, "std": stds, **quantiles}
        for name in STAT_NAMES:
            if name == "count":
                stats[name] = np.array([self._count], dtype=np.int64)
            else:
                stats[name] = np.array(columns[name], dtype=np.float64).reshape(3, 1, 1) / 255.0
        return stats


def _histogram_quantile(cumulative: npt.NDArray[np.int64], total: int, level: float) -> float:
    """``np.quantile(values, level)`` (linear method) from the cumulative histogram of values."""
    position = level * (total - 1)
    lower = math.floor(position)
    upper = min(lower + 1, total - 1)
    lo_value = float(np.searchsorted(cumulative, lower, side="right"))
    hi_value = float(np.searchsorted(cumulative, upper, side="right"))
    return lo_value + (position - lower) * (hi_value - lo_value)


def aggregate_stats(per_episode: Sequence[Stats]) -> Stats:
    """Combine per-episode statistics of one feature into dataset statistics (spec section 6)."""
    counts = np.stack([s["count"] for s in per_episode]).astype(np.float64)  # (E, 1)
    means = np.stack([s["mean"] for s in per_episode]).astype(np.float64)
    variances = np.stack([s["std"] for s in per_episode]).astype(np.float64) ** 2
    weights = counts.reshape(counts.shape + (1,) * (means.ndim - counts.ndim))
    total = counts.sum(axis=0)
    mean = (means * weights).sum(axis=0) / total
    variance = ((variances + (means - mean) ** 2) * weights).sum(axis=0) / total
    result: Stats = {
        "min": np.stack([s["min"] for s in per_episode]).min(axis=0),
        "max": np.stack([s["max"] for s in per_episode]).max(axis=0),
        "mean": mean,
        "std": np.sqrt(variance),
        "count": total.astype(np.int64),
    }
    for name in QUANTILES:
        values = np.stack([s[name] for s in per_episode]).astype(np.float64)
        result[name] = (values * weights).sum(axis=0) / total
    return {name: result[name] for name in STAT_NAMES}
