"""Getting batches to the training step: the concurrent pipeline, collation, statistics."""

from __future__ import annotations

from .collate import collate
from .pipeline import Loader, PipelineError
from .stats import StageStats

__all__ = ["Loader", "PipelineError", "StageStats", "collate"]
