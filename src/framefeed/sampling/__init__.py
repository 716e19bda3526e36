"""Orders: which samples come next, as pure functions of (seed, epoch, rank, world, worker)."""

from __future__ import annotations

from .partition import Uneven, balanced_split, equalize
from .pool import pool_order

__all__ = ["Uneven", "balanced_split", "equalize", "pool_order"]
