"""``framefeed bench --plot``: throughput over time and a per-sample latency histogram.

matplotlib is an optional extra (``pip install 'framefeed[plot]'``). The figure is drawn with
matplotlib's object API on an Agg canvas, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PLOT_INSTALL", "Series", "require_matplotlib", "throughput", "write_plot"]

PLOT_INSTALL = "pip install 'framefeed[plot]'"
BUCKET_S = 0.5
"""Width of the throughput buckets, seconds."""


@dataclass(frozen=True, kw_only=True)
class Series:
    """What one measured loader did over the window, batch by batch."""

    label: str
    """Legend label (``framefeed``, ``naive``)."""
    arrivals_s: np.ndarray
    """Seconds from the start of the window to each batch's arrival."""
    sizes: np.ndarray
    """Samples in each batch."""
    sample_latency_s: np.ndarray
    """Each batch's latency divided by its number of samples."""


def require_matplotlib() -> None:
    """Raise `ImportError` with the install line when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"framefeed bench --plot needs matplotlib: {PLOT_INSTALL}") from exc


def throughput(series: Series, bucket_s: float = BUCKET_S) -> tuple[np.ndarray, np.ndarray]:
    """Bucket edges and samples/s in each whole bucket of ``bucket_s`` seconds.

    The window's last, partial bucket is left out (it would read low); a window shorter than
    one bucket gives one bucket as long as the window.
    """
    if series.arrivals_s.size == 0:
        return np.zeros(1), np.zeros(0)
    end = float(series.arrivals_s.max())
    whole = int(end // bucket_s)
    if whole == 0:
        edges = np.asarray([0.0, max(end, 1e-9)])
    else:
        edges = np.arange(whole + 1, dtype=np.float64) * bucket_s
    counts, _ = np.histogram(series.arrivals_s, bins=edges, weights=series.sizes)
    return edges, counts / np.diff(edges)


def write_plot(path: str | os.PathLike[str], series: Sequence[Series], title: str) -> None:
    """Write a PNG with throughput over time (top) and the per-sample latency histogram."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    for s in series:
        edges, rate = throughput(s)
        if rate.size:
            top.stairs(rate, edges, label=s.label)
    top.set_xlabel("seconds into the measured window")
    top.set_ylabel(f"samples/s (per {BUCKET_S:g} s)")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    top.legend()
    latencies = [(s.label, s.sample_latency_s * 1e3) for s in series if s.sample_latency_s.size]
    if latencies:
        low = min(float(lat.min()) for _, lat in latencies)
        high = max(float(np.percentile(lat, 99.5)) for _, lat in latencies)
        bins: Any = np.linspace(low, max(high, low + 1e-3), 60)
        for label, lat in latencies:
            bottom.hist(lat, bins=bins, alpha=0.6, label=label)
    bottom.set_xlabel("per-sample latency, ms (batch latency / batch size; p99.5 and below)")
    bottom.set_ylabel("batches")
    bottom.grid(alpha=0.3)
    bottom.legend()
    fig.suptitle(title)
    fig.savefig(os.fspath(path), dpi=100)
