"""Datasets that serve samples to PyTorch: map-style (random access) for now."""

from __future__ import annotations

from .map import MapDataset

__all__ = ["MapDataset"]
