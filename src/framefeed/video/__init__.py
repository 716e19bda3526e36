"""Video: container indexes, the frame decoder, its per-process cache and the batch engine."""

from __future__ import annotations

from .engine import VideoEngine
from .index import VideoIndex

__all__ = ["VideoEngine", "VideoIndex"]
