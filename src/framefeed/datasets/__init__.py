"""Datasets that serve samples to PyTorch: map-style (random access) and streaming."""

from __future__ import annotations

from .iterable import IterableDataset, merge_worker_states
from .map import MapDataset

__all__ = ["IterableDataset", "MapDataset", "merge_worker_states"]
