"""`MapDataset`: random access to samples, one read plan per batch.

A torch ``DataLoader`` with a batch sampler calls ``__getitems__`` with the whole batch, so the
batch's numeric rows are gathered with one indexing operation per column and all of its video
frames, over every camera, are decoded by one call of the video engine (sorted per file, each
GOP once, spread over decoder threads). Frames stay uint8 CHW unless ``image_dtype="float32"``
asks for LeRobot's float output.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.data

from ..catalog import ColumnKind, Dataset
from ..errors import ConfigError
from ..fields import Field
from ..formats import open_dataset
from ..index import SampleIndex
from ..plan import BatchPlanner, resolve_fields
from ..video.engine import VideoEngine

__all__ = ["MapDataset"]


def _auto_threads() -> int:
    """Decoder threads: every core in the main process, one inside a DataLoader worker."""
    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


class MapDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """A map-style dataset over a LeRobot (or other framefeed-readable) dataset.

    ``source`` is a path, an fsspec URL or an opened `framefeed.Dataset`. With ``fields=None``
    a sample holds every feature as LeRobot returns it (cameras, numeric columns, ``task``);
    ``delta_timestamps`` adds LeRobot windows (seconds, checked against ``tolerance_s``);
    ``episodes`` restricts the samples to those episode ids (served in dataset order).
    ``decode_threads`` sets how many video decoders run at once (default: the number of cores
    in the main process and 1 inside DataLoader workers).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Dataset,
        *,
        delta_timestamps: Mapping[str, Sequence[float]] | None = None,
        episodes: Sequence[int] | None = None,
        tolerance_s: float = 1e-4,
        image_dtype: Literal["uint8", "float32"] = "uint8",
        fields: Sequence[Field] | None = None,
        decode_threads: int | None = None,
    ) -> None:
        if image_dtype not in ("uint8", "float32"):
            raise ConfigError(f"image_dtype must be 'uint8' or 'float32', not {image_dtype!r}")
        if tolerance_s <= 0:
            raise ConfigError(f"tolerance_s must be positive, got {tolerance_s!r}")
        if decode_threads is not None and decode_threads < 1:
            raise ConfigError(f"decode_threads must be at least 1, got {decode_threads!r}")
        self.dataset = open_dataset(source)
        self.tolerance_s = float(tolerance_s)
        self.image_dtype = image_dtype
        self.index = SampleIndex.from_dataset(self.dataset, episodes)
        self.fields = resolve_fields(self.dataset, fields, delta_timestamps, self.tolerance_s)
        self._float_keys = [
            f.key
            for f in self.fields
            if f.column is not None and f.column.kind in (ColumnKind.VIDEO, ColumnKind.IMAGE)
        ]
        self._decode_threads = decode_threads
        self._planner: BatchPlanner | None = None
        self._pid = -1

    def __repr__(self) -> str:
        keys = ", ".join(f.key for f in self.fields)
        return f"MapDataset({self.dataset.root!r}, samples={len(self)}, keys=[{keys}])"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def engine(self) -> VideoEngine:
        """This process's video engine (its counters are in ``engine.stats``)."""
        return self._plan().engine

    def _plan(self) -> BatchPlanner:
        if self._planner is None or self._pid != os.getpid():
            threads = self._decode_threads or _auto_threads()
            engine = VideoEngine(self.dataset.storage, threads=threads)
            self._planner = BatchPlanner(
                self.dataset, self.index, self.fields, engine, self.tolerance_s
            )
            self._pid = os.getpid()
        return self._planner

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_planner"] = None  # each process builds its own engine and column store
        return state

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """A collated batch: tensors with a leading batch dimension, lists for strings."""
        values = self._plan().run(np.asarray(indices, dtype=np.int64))
        if self.image_dtype == "float32":
            for key in self._float_keys:
                values[key] = values[key].float().div_(255.0)
        return values

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        batch = self.get_batch(indices)
        samples: list[dict[str, Any]] = [{} for _ in range(len(indices))]
        for key, value in batch.items():
            for sample, item in zip(samples, value, strict=True):
                sample[key] = item
        return samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([int(index)])[0]

    def close(self) -> None:
        """Release decoders and decode threads (the dataset stays usable)."""
        if self._planner is not None and self._pid == os.getpid():
            self._planner.engine.close()
        self._planner = None

    def __enter__(self) -> MapDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
