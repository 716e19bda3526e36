"""`MapDataset`: random access to samples, one read plan per batch.

A torch ``DataLoader`` with a batch sampler calls ``__getitems__`` with the whole batch, so the
batch's numeric rows are gathered with one indexing operation per column and all of its video
frames, over every camera, are decoded by one call of the video engine (sorted per file, each
GOP once, spread over decoder threads). Frames stay uint8 CHW unless ``image_dtype="float32"``
asks for LeRobot's float output.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.data

from ..catalog import Dataset
from ..errors import ConfigError
from ..fields import Field
from ..index import IndexSpec
from ..nodecache import ColumnCache
from .serving import Serving

__all__ = ["MapDataset"]


class MapDataset(Serving, torch.utils.data.Dataset[dict[str, Any]]):
    """A map-style dataset over a LeRobot (or other framefeed-readable) dataset.

    ``source`` is a path, an fsspec URL or an opened `framefeed.Dataset`. With ``fields=None``
    a sample holds every feature as LeRobot returns it (cameras, numeric columns, ``task``);
    ``delta_timestamps`` adds LeRobot windows (seconds, checked against ``tolerance_s``);
    ``episodes`` restricts the samples to those episode ids (served in dataset order).
    ``decode_threads`` sets how many video decoders run at once (default: the number of cores
    in the main process and 1 inside DataLoader workers). ``column_cache`` (a `ColumnCache`, or
    ``True`` for the default one) keeps the tabular columns once per node in memory-mapped
    files shared by every worker and local rank (frame datasets; recordings stay in memory).
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
        index: IndexSpec | None = None,
        column_cache: ColumnCache | bool | None = None,
    ) -> None:
        self._setup(
            source,
            delta_timestamps=delta_timestamps,
            episodes=episodes,
            tolerance_s=tolerance_s,
            image_dtype=image_dtype,
            fields=fields,
            decode_threads=decode_threads,
            index=index,
            column_cache=column_cache,
        )

    def __repr__(self) -> str:
        keys = ", ".join(f.key for f in self.fields)
        return f"MapDataset({self.dataset.root!r}, samples={len(self)}, keys=[{keys}])"

    def __len__(self) -> int:
        return len(self.index)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """A collated batch: tensors with a leading batch dimension, lists for strings."""
        return self._fetch(indices)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return unbatch(self.get_batch(indices), len(indices))

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            number = operator.index(index)
        except TypeError:
            raise ConfigError(
                f"a sample index is an integer, not {type(index).__name__} {index!r}; use "
                "get_batch(indices) for several samples"
            ) from None
        return self.__getitems__([number])[0]

    def __enter__(self) -> MapDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unbatch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """The ``size`` samples of a collated batch (views of its tensors, no copies)."""
    samples: list[dict[str, Any]] = [{} for _ in range(size)]
    for key, value in batch.items():
        for sample, item in zip(samples, value, strict=True):
            sample[key] = item
    return samples
