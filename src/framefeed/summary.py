"""``framefeed inspect``: a readable summary of a dataset, from metadata and video headers."""

from __future__ import annotations

import os

import numpy as np

from .catalog import ColumnKind, Dataset, TimelineKind
from .formats import open_dataset
from .video.index import VideoIndex

__all__ = ["inspect_dataset"]


def _mb(n: int) -> str:
    if n < 1_000_000:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.1f} MB"


def inspect_dataset(path: str | os.PathLike[str] | Dataset, *, video: bool = True) -> str:
    """The summary ``framefeed inspect`` prints (episodes, frames, columns, cameras, files)."""
    ds = open_dataset(path)
    if ds.is_recording:
        return _recording(ds)
    lengths = ds.lengths
    lines = [
        f"dataset   {ds.root}",
        f"format    {ds.format_name} {ds.version}",
        f"episodes  {ds.num_segments}   frames {ds.num_frames}   fps {ds.fps:g}",
    ]
    if ds.num_segments:
        lines.append(
            f"lengths   min {int(lengths.min())}  mean {float(lengths.mean()):.1f}  "
            f"max {int(lengths.max())} frames"
        )
    lines.append(
        f"tasks     {len(ds.tasks)}: "
        + "; ".join(ds.tasks[:5])
        + (" ..." if len(ds.tasks) > 5 else "")
    )
    lines.append("columns")
    width = max((len(c) for c in ds.columns), default=0)
    for col in ds.columns.values():
        if col.kind is ColumnKind.VIDEO:
            continue
        lines.append(
            f"  {col.path:<{width}}  {col.kind.value:<7}  {col.dtype:<8}  {list(col.shape)}"
        )
    data_files = sorted(set(ds.data_paths.tolist()))
    data_bytes = sum(ds.storage.size(p) for p in data_files)
    lines.append(f"data      {len(data_files)} parquet files, {_mb(data_bytes)}")
    if ds.video_keys:
        lines.append("cameras")
    for key in ds.video_keys:
        col = ds.columns[key]
        files = sorted(set(ds.video_paths[key].tolist()))
        size = sum(ds.storage.size(p) for p in files)
        height, width_px = col.shape[0], col.shape[1]
        codec = str(col.info.get("video.codec", "?"))
        extra = ""
        if video and files:
            with ds.storage.open(files[0]) as fh:
                idx = VideoIndex.from_file(fh, ds.storage.url(files[0]))
            keys = np.flatnonzero(idx.keyframe)
            gop = np.diff(np.append(keys, idx.num_frames))
            if idx.codec != codec:
                codec = f"{codec} (decoder {idx.codec})"
            extra = f"  GOP max {int(gop.max())} mean {float(gop.mean()):.1f} (file 0)"
            height, width_px = idx.height, idx.width
        lines.append(
            f"  {key}  {codec} {width_px}x{height}  {len(files)} files, {_mb(size)}{extra}"
        )
    return "\n".join(lines)


def _recording(ds: Dataset) -> str:
    """A recording: its timelines (span of each segment) and its columns, with their kinds."""
    lines = [
        f"dataset   {ds.root}",
        f"format    {ds.format_name} {ds.version}",
        f"segments  {ds.num_segments}   rows of the densest column: {int(ds.lengths.sum())}",
        "timelines",
    ]
    for t in ds.timelines:
        if t.name not in ds.ranges:
            continue
        start, end = ds.ranges[t.name]
        span = end - start
        if t.kind is TimelineKind.TIME:
            first = np.datetime64(int(start.min()), "ns")
            lines.append(
                f"  {t.name:<12} time      from {first}  segments {span.min() / 1e9:.2f}-"
                f"{span.max() / 1e9:.2f} s (total {span.sum() / 1e9:.1f} s)"
            )
        else:
            lines.append(
                f"  {t.name:<12} sequence  segments {int(span.min()) + 1}-{int(span.max()) + 1} "
                "steps"
            )
    lines.append("columns")
    width = max((len(c) for c in ds.columns), default=0)
    for col in ds.columns.values():
        extra = f"  {col.info['codec']}" if "codec" in col.info else ""
        lines.append(
            f"  {col.path:<{width}}  {col.kind.value:<7}  {col.dtype:<8}  {list(col.shape)}{extra}"
        )
    return "\n".join(lines)
