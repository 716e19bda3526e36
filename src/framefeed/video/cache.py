"""Per-process cache of video indexes and idle decoders, bounded by count and bytes.

Decoders are checked out by one thread and checked back in, so two threads never share one.
Everything here belongs to the process that created it. Right after a ``fork`` a hook parks
every cache's inherited decoders in a list that is never freed: releasing FFmpeg objects that
own worker threads (a threaded scaler or codec) in a child, where the parent's threads do not
exist, hangs. Decoders are built single-threaded, so this is defence in depth; the child's
caches start empty. This registry is the one piece of module state in framefeed,
and it exists only to make ``fork`` safe.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

from .decoder import FrameDecoder
from .index import VideoIndex

__all__ = ["DecoderCache"]

# Objects inherited through fork are parked here so their finalizers never run in the child.
_INHERITED: list[object] = []
_LIVE: weakref.WeakSet[DecoderCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache._check_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class DecoderCache:
    """LRU of idle `FrameDecoder`s (bounded by count and bytes) and of `VideoIndex`es."""

    def __init__(self, *, max_decoders: int = 16, max_bytes: int = 1 << 30, max_indexes: int = 256):
        self.max_decoders = max_decoders
        self.max_bytes = max_bytes
        self.max_indexes = max_indexes
        self._lock = threading.Lock()
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._idle: OrderedDict[int, tuple[str, FrameDecoder]] = OrderedDict()
        self._indexes: OrderedDict[str, VideoIndex] = OrderedDict()
        self._bytes = 0

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            _INHERITED.append(self._idle)
            indexes = self._indexes  # plain arrays: safe to keep, and they spare a re-read
            self._lock = threading.Lock()
            self._reset()
            self._indexes = indexes

    def __len__(self) -> int:
        return len(self._idle)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def index(self, key: str, build: Callable[[], VideoIndex]) -> VideoIndex:
        """The cached index for ``key``, built with ``build()`` on a miss."""
        self._check_fork()
        with self._lock:
            hit = self._indexes.get(key)
            if hit is not None:
                self._indexes.move_to_end(key)
                return hit
        built = build()  # outside the lock: building reads the file
        with self._lock:
            self._indexes[key] = built
            while len(self._indexes) > self.max_indexes:
                self._indexes.popitem(last=False)
        return built

    def checkout(self, key: str, make: Callable[[], FrameDecoder]) -> FrameDecoder:
        """An idle decoder for ``key`` (removed from the cache), or a new one from ``make()``."""
        self._check_fork()
        with self._lock:
            for token, (k, dec) in reversed(self._idle.items()):
                if k == key:
                    del self._idle[token]
                    self._bytes -= dec.nbytes
                    return dec
        return make()

    def checkin(self, key: str, decoder: FrameDecoder) -> None:
        """Return ``decoder`` to the cache, evicting the least recently used over the bounds."""
        self._check_fork()
        if decoder.pid != os.getpid():
            return
        evicted: list[FrameDecoder] = []
        with self._lock:
            self._idle[id(decoder)] = (key, decoder)
            self._bytes += decoder.nbytes
            while self._idle and (
                len(self._idle) > self.max_decoders or self._bytes > self.max_bytes
            ):
                _, (_, old) = self._idle.popitem(last=False)
                self._bytes -= old.nbytes
                evicted.append(old)
        for old in evicted:
            old.close()

    def clear(self) -> None:
        self._check_fork()
        with self._lock:
            idle = [d for _, d in self._idle.values()]
            self._idle.clear()
            self._indexes.clear()
            self._bytes = 0
        for dec in idle:
            dec.close()
