"""Getting batches to the training step: collation (the concurrent loader comes next)."""

from __future__ import annotations

from .collate import collate

__all__ = ["collate"]
