"""The ``--vs naive`` baseline: per-sample seek-and-decode with plain PyAV, one sample at a time."""

from __future__ import annotations

from typing import Any

import av
import numpy as np

from ..catalog import Dataset

__all__ = ["NaiveLoader"]


class NaiveLoader:
    """Per-sample PyAV: seek each camera to each frame and decode it, one sample at a time."""

    def __init__(
        self, ds: Dataset, deltas: dict[str, list[float]] | None, batch_size: int, seed: int
    ) -> None:
        self.ds = ds
        self.batch_size = batch_size
        self.seed = seed
        self.offsets = {
            k: np.rint(np.asarray((deltas or {}).get(k, [0.0])) * ds.fps).astype(np.int64)
            for k in ds.video_keys
        }
        self.containers: dict[str, Any] = {}

    def _frame(self, path: str, t: float) -> np.ndarray:
        container = self.containers.get(path)
        if container is None:
            container = self.containers[path] = av.open(self.ds.storage.url(path))
        stream = container.streams.video[0]
        if stream.time_base is None:
            raise RuntimeError(f"{path}: the video stream has no time base")
        target = round(t / float(stream.time_base))
        container.seek(target, stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= target:
                return np.asarray(frame.to_ndarray(format="rgb24"))
        raise RuntimeError(f"{path}: no frame at {t}")

    def __iter__(self) -> Any:
        rng = np.random.default_rng(self.seed)
        starts = self.ds.start_rows
        order = rng.permutation(self.ds.num_frames)
        for b in range(0, len(order), self.batch_size):
            episodes = []
            for row in order[b : b + self.batch_size].tolist():
                pos = int(np.searchsorted(starts, row, side="right") - 1)
                frame = row - int(starts[pos])
                length = int(self.ds.lengths[pos])
                for key in self.ds.video_keys:
                    for off in self.offsets[key].tolist():
                        f = min(max(frame + off, 0), length - 1)
                        t = float(self.ds.video_from[key][pos]) + f / self.ds.fps
                        self._frame(str(self.ds.video_paths[key][pos]), t)
                episodes.append(int(self.ds.segment_ids[pos]))
            yield {"index": episodes, "episode_index": episodes}

    def close(self) -> None:
        """Close the open containers (idempotent)."""
        for container in self.containers.values():
            container.close()
        self.containers.clear()
