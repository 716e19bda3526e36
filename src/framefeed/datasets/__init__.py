"""Datasets that serve samples to PyTorch: map-style (random access) and streaming."""

from __future__ import annotations

from .iterable import IterableDataset, merge_worker_states
from .map import MapDataset
from .mixture import Mixture, MixturePart
from .workers import worker_init

__all__ = [
    "IterableDataset",
    "MapDataset",
    "Mixture",
    "MixturePart",
    "merge_worker_states",
    "worker_init",
]
