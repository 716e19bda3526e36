"""The batch video engine: plan all frames a batch needs, decode each one once.

For every file a batch touches, the engine locates the requested times in the file's packet
index (strict tolerance check), sorts the distinct target frames in decode order, and merges
them into *runs*: a run starts at a target's anchor keyframe and continues through later
targets whose anchor it has already passed, so a GOP shared by several targets is decoded once.
Runs are independent, so they are spread over threads, each with its own decoder checked out of
the per-process `DecoderCache` (PyAV releases the GIL while decoding and scaling).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import DecodeError, FormatError, FramefeedError, FrameTimestampError
from ..storage import RangeReader, Storage
from ..tracing import in_current_context, with_tracing
from .cache import _INHERITED, DecoderCache
from .decoder import FrameDecoder, run_span
from .index import VideoIndex
from .mp4 import parse_mp4_index

__all__ = ["EngineStats", "FrameRequest", "VideoEngine"]


@dataclass(frozen=True, eq=False)
class FrameRequest:
    """Frames wanted from one file: ``times[i]`` (seconds in the file) goes to ``out[slots[i]]``."""

    path: str
    """File relative to the engine's storage root."""
    times: np.ndarray
    """float64 seconds, shape (N,)."""
    out: np.ndarray
    """uint8 destination, shape (M, 3, H, W); H, W other than the video's mean a resize."""
    slots: np.ndarray | None = None
    """Row of ``out`` for each time (default: ``out[i]`` for ``times[i]``)."""
    describe: Callable[[int], str] | None = None
    """Names the sample behind ``times[i]`` in error messages (episode, camera)."""
    segments: np.ndarray | None = None
    """Optional (N, 2) seconds ``[from, to)`` of the segment each time belongs to. With a
    segment cache (remote streaming), a segment's packets are fetched in one request."""
    declared: str | None = None
    """Where ``out``'s height and width come from when the caller did not ask for a size (the
    dataset's metadata): a video of another size is then a `FormatError`, not a resize."""


@dataclass
class EngineStats:
    """Counters of one engine (per process)."""

    frames_returned: int = 0
    frames_decoded: int = 0
    bytes_read: int = 0
    packet_bytes: int = 0
    index_seconds: float = 0.0
    decode_seconds: float = 0.0
    fetch_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {
            "frames_returned": self.frames_returned,
            "frames_decoded": self.frames_decoded,
            "bytes_read": self.bytes_read,
            "packet_bytes": self.packet_bytes,
            "index_seconds": self.index_seconds,
            "decode_seconds": self.decode_seconds,
            "fetch_seconds": self.fetch_seconds,
        }


_Fetch = tuple["_Task", tuple[int, int], tuple[int, int], tuple[str, int, int] | None]
"""A run to fetch: its task, the run, its byte span, and the cached segment holding it."""


@dataclass(frozen=True, eq=False)
class _Task:
    request: FrameRequest
    """The request of ``first_item`` (for error messages)."""
    path: str
    size: tuple[int, int]
    """Output height and width."""
    index: VideoIndex
    runs: list[tuple[int, int]]
    wanted: dict[int, list[np.ndarray]]
    cost: int
    segment_spans: list[tuple[int, int]] = field(default_factory=list)
    """Byte spans of the whole segments this task's targets belong to (if requested)."""
    fetched: dict[tuple[int, int], bytes | memoryview] = field(default_factory=dict)
    """Bytes of runs fetched ahead (remote storage), by run."""
    first_item: int = 0
    """Position in ``request.times`` of one target of this task (for error messages)."""


class VideoEngine:
    """Decodes the frames of many `FrameRequest`s with sorted, keyframe-anchored runs.

    ``threads`` decoders run at once (1 decodes inline in the caller's thread);
    ``codec_threads`` are FFmpeg's own threads per decoder (1 is best for random access).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        threads: int = 1,
        codec_threads: int = 1,
        cache: DecoderCache | None = None,
        segment_cache_bytes: int = 0,
    ) -> None:
        if threads < 1 or codec_threads < 1:
            raise ValueError("threads and codec_threads must be at least 1")
        self.storage = storage
        self.threads = threads
        self.codec_threads = codec_threads
        self.cache = cache if cache is not None else DecoderCache()
        self.stats = EngineStats()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self._io_pool: ThreadPoolExecutor | None = None
        self._io_pid = os.getpid()
        self.segment_cache_bytes = segment_cache_bytes
        self._segments: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._segments_size = 0
        self._touched: OrderedDict[tuple[str, int, int], None] = OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state.update(
            _segments=OrderedDict(),
            _segments_size=0,
            _touched=OrderedDict(),
            _pool=None,
            _io_pool=None,
            stats=EngineStats(),
            cache=DecoderCache(
                max_decoders=self.cache.max_decoders, max_bytes=self.cache.max_bytes
            ),
        )
        return state

    def close(self) -> None:
        """Stop the decode and fetch threads and close cached decoders (idempotent)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        if self._io_pool is not None and self._io_pid == os.getpid():
            self._io_pool.shutdown(wait=True)
        self._io_pool = None
        self.cache.clear()

    def __enter__(self) -> VideoEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def index(self, path: str) -> VideoIndex:
        """The packet index of ``path`` (cached)."""

        def build() -> VideoIndex:
            t0 = time.perf_counter()
            built = build_index(self.storage, path)
            with self.stats.lock:
                self.stats.index_seconds += time.perf_counter() - t0
            return built

        return self.cache.index(path, build)

    @with_tracing("framefeed.decode")
    def decode(self, requests: Sequence[FrameRequest], *, tolerance_s: float) -> None:
        """Fill every request's ``out`` with its frames; raises `DecodeError` naming the file."""
        # Requests for the same file and output size are planned together, so a GOP that two
        # fields (or two windows of one camera) need is decoded once.
        groups: dict[tuple[str, int, int], list[FrameRequest]] = {}
        for request in requests:
            if len(request.times):
                _check_out(request.out)
                key = (request.path, int(request.out.shape[2]), int(request.out.shape[3]))
                groups.setdefault(key, []).append(request)
        tasks: list[_Task] = []
        for (path, height, width), group in groups.items():
            tasks.extend(self._plan(path, (height, width), group, tolerance_s))
        if not tasks:
            return
        if not self.storage.is_local:
            self._fetch_ahead(tasks)
        tasks.sort(key=lambda t: -t.cost)
        if self.threads == 1 or len(tasks) == 1:
            results = [self._run(t) for t in tasks]
        else:
            pool = self._executor()
            run = in_current_context(self._run)  # read spans on pool threads nest under decode
            futures: list[Future[set[int]]] = [pool.submit(run, t) for t in tasks]
            results = [f.result() for f in futures]
        for task, done in zip(tasks, results, strict=True):
            missing = set(task.wanted) - done
            if missing:
                pts = min(missing)
                exc = DecodeError(
                    f"{task.index.path}: the decoder produced no frame with pts {pts} "
                    f"(t={pts * float(task.index.time_base):.6f} s); the file is corrupt or its "
                    "keyframe flags are wrong"
                )
                raise _in_context(exc, task.request, task.first_item)

    def _fetch_ahead(self, tasks: list[_Task]) -> None:
        """Fetch every run's bytes of a remote batch at once (bounded concurrency).

        Object stores answer one request in milliseconds but serve many in parallel, so the
        batch's ranges are requested together, before decoding, instead of one by one. With a
        segment cache, a run inside a whole segment's span is served from that segment's bytes,
        fetched once in one request and kept (LRU, bounded) while later batches need it.
        """
        t0 = time.perf_counter()
        plan: list[_Fetch] = []
        missing: dict[tuple[str, int, int], None] = {}
        for task in tasks:
            for run in task.runs:
                span = run_span(task.index, *run)
                if span is None:
                    continue
                home = next(
                    (
                        (task.path, a, b)
                        for a, b in task.segment_spans
                        if a <= span[0] and span[1] <= b
                    ),
                    None,
                )
                if home is not None and home not in self._segments and home not in self._touched:
                    # First batch to touch this segment: fetch only its runs, so the first
                    # batch does not wait for whole episodes; the next touch fetches it whole.
                    self._touched[home] = None
                    home = None
                plan.append((task, run, span, home))
                if home is not None and home not in self._segments:
                    missing[home] = None
        # Cached segments this batch uses, taken now: fetching may evict them below.
        have: dict[tuple[str, int, int], bytes] = {}
        for *_, home in plan:
            if home is not None and home in self._segments:
                self._segments.move_to_end(home)
                have[home] = self._segments[home]
        direct = [i for i, p in enumerate(plan) if p[3] is None]
        ranges = [(plan[i][0].path, *plan[i][2]) for i in direct] + list(missing)
        if len(ranges) > 1:
            read = in_current_context(self.storage.read_range)
            blobs = list(self._io_executor().map(lambda r: read(*r), ranges))
        else:
            blobs = [self.storage.read_range(*r) for r in ranges]
        for i, blob in zip(direct, blobs, strict=False):
            task, run = plan[i][0], plan[i][1]
            task.fetched[run] = blob
        for key, blob in zip(missing, blobs[len(direct) :], strict=True):
            self._remember(key, blob)
        fresh = dict(zip(missing, blobs[len(direct) :], strict=True))
        for task, run, span, home in plan:
            if home is not None:
                blob = have[home] if home in have else fresh[home]
                task.fetched[run] = memoryview(blob)[span[0] - home[1] : span[1] - home[1]]
        with self.stats.lock:
            self.stats.bytes_read += sum(len(b) for b in blobs)
            self.stats.fetch_seconds += time.perf_counter() - t0

    def _io_executor(self) -> ThreadPoolExecutor:
        if self._io_pool is None or self._io_pid != os.getpid():
            self._io_pool = ThreadPoolExecutor(
                self.storage.retry.max_concurrency, thread_name_prefix="framefeed-fetch"
            )
            self._io_pid = os.getpid()
        return self._io_pool

    def _remember(self, key: tuple[str, int, int], blob: bytes) -> None:
        """Keep a segment's bytes, evicting the least recently used over the byte bound."""
        if len(blob) > self.segment_cache_bytes:
            return
        self._segments[key] = blob
        self._segments_size += len(blob)
        self._touched.pop(key, None)
        while len(self._touched) > 4096:
            self._touched.popitem(last=False)
        while self._segments_size > self.segment_cache_bytes:
            _, old = self._segments.popitem(last=False)
            self._segments_size -= len(old)

    def executor(self) -> ThreadPoolExecutor | None:
        """This engine's decode threads (``None`` with one thread), for other batch decoders:
        they belong to the dataset and stop with `close`."""
        return self._executor() if self.threads > 1 else None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is not None and self._pool_pid != os.getpid():
            _INHERITED.append(self._pool)  # the parent's threads do not exist here
            self._pool = None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="framefeed-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def _plan(
        self,
        path: str,
        size: tuple[int, int],
        requests: list[FrameRequest],
        tolerance_s: float,
    ) -> list[_Task]:
        try:
            return self._plan_file(path, size, requests, tolerance_s)
        except FrameTimestampError:
            raise  # already names the sample
        except FramefeedError as exc:
            raise _in_context(exc, requests[0], 0) from exc

    def _plan_file(
        self,
        path: str,
        size: tuple[int, int],
        requests: list[FrameRequest],
        tolerance_s: float,
    ) -> list[_Task]:
        index = self.index(path)
        declared = next((r.declared for r in requests if r.declared is not None), None)
        if declared is not None and (index.height, index.width) != size:
            raise FormatError(
                f"{self.storage.url(path)}: the video is {index.height}x{index.width} pixels "
                f"(height x width) but {declared} declares {size[0]}x{size[1]}; fix the "
                "metadata, or decode at a size of your choice with VideoFrameDecoder(size=(H, W))"
            )
        wanted: dict[int, list[np.ndarray]] = {}
        item_of: dict[int, tuple[FrameRequest, int]] = {}
        all_packets = []
        segment_spans: set[tuple[int, int]] = set()
        for request in requests:
            if request.segments is not None and self.segment_cache_bytes > 0:
                for t0, t1 in np.unique(np.asarray(request.segments), axis=0).tolist():
                    span = _segment_span(index, t0, t1, tolerance_s)
                    if span is not None:
                        segment_spans.add(span)
            packets = index.locate(request.times, tolerance_s, request.describe)
            slots = request.slots if request.slots is not None else np.arange(len(packets))
            if len(slots) != len(packets):
                raise ValueError("slots and times must have the same length")
            pairs = zip(slots.tolist(), packets.tolist(), strict=True)
            for item, (slot, packet) in enumerate(pairs):
                wanted.setdefault(int(index.pts[packet]), []).append(request.out[slot])
                item_of.setdefault(packet, (request, item))
            all_packets.append(packets)
        runs: list[tuple[int, int]] = []
        for target in np.unique(np.concatenate(all_packets)).tolist():
            anchor = index.anchor(target)
            if runs and anchor <= runs[-1][1]:
                runs[-1] = (runs[-1][0], target)
            else:
                runs.append((anchor, target))
        tasks = []
        for group in _split(runs, self.threads):
            pts_in = {
                int(p)
                for first, last in group
                for p in index.pts[first : last + 1].tolist()
                if int(p) in wanted
            }
            request, item = item_of[group[0][1]]
            tasks.append(
                _Task(
                    request=request,
                    path=path,
                    size=size,
                    index=index,
                    runs=group,
                    wanted={p: wanted[p] for p in pts_in},
                    cost=sum(last - first + 1 for first, last in group),
                    segment_spans=sorted(segment_spans),
                    first_item=item,
                )
            )
        return tasks

    def _run(self, task: _Task) -> set[int]:
        path = task.path
        size = None if task.size == (task.index.height, task.index.width) else task.size
        t0 = time.perf_counter()
        decoder = self.cache.checkout(
            path,
            lambda: FrameDecoder(
                task.index, RangeReader(self.storage, path), threads=self.codec_threads
            ),
        )
        before, packets_before = decoder.bytes_read, decoder.packet_bytes
        try:
            produced, done = decoder.decode_runs(
                task.runs, task.wanted, size=size, fetched=task.fetched
            )
        except FramefeedError as exc:
            decoder.close()
            raise _in_context(exc, task.request, task.first_item) from exc
        self.cache.checkin(path, decoder)
        with self.stats.lock:
            self.stats.frames_decoded += produced
            self.stats.frames_returned += sum(len(v) for p, v in task.wanted.items() if p in done)
            self.stats.bytes_read += decoder.bytes_read - before
            self.stats.packet_bytes += decoder.packet_bytes - packets_before
            self.stats.decode_seconds += time.perf_counter() - t0
        return done


def build_index(storage: Storage, path: str, *, use_sidecar: bool = True) -> VideoIndex:
    """The packet index of ``path``: from its sidecar (``framefeed index``) if one matches, else
    from the MP4 sample tables when it is an MP4 (reads only the ``moov`` box), else by
    demuxing the container with PyAV."""
    url = storage.url(path)
    if path.lower().endswith((".mp4", ".m4v", ".mov")):
        reader = RangeReader(storage, path)
        try:
            if use_sidecar:
                from .sidecar import load_sidecar

                found = load_sidecar(storage, path, reader.size())
                if found is not None:
                    return found
            return parse_mp4_index(lambda at, n: reader.read(at, at + n), reader.size(), url)
        finally:
            reader.close()
    with storage.open(path) as fh:
        return VideoIndex.from_file(fh, url)


def _segment_span(
    index: VideoIndex, t0: float, t1: float, tolerance_s: float
) -> tuple[int, int] | None:
    """Byte span of the packets a segment ``[t0, t1)`` (seconds) needs: from the keyframe
    anchoring its first frame to its last frame; None if it is too scattered to fetch whole."""
    inside = index.packets_between(t0 - tolerance_s, t1 - tolerance_s)
    if inside.size == 0:
        return None
    first = min(index.anchor(int(inside[np.argmin(index.pts[inside])])), int(inside.min()))
    return run_span(index, first, int(inside.max()))


def _check_out(out: np.ndarray) -> None:
    if out.ndim != 4 or out.shape[1] != 3 or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 (N, 3, H, W), got {out.dtype} {out.shape}")


def _in_context(exc: FramefeedError, request: FrameRequest, item: int) -> FramefeedError:
    """``exc`` again, prefixed with the sample behind ``request.times[item]`` when known."""
    if request.describe is None:
        return exc
    t = float(request.times[item]) if len(request.times) > item else float("nan")
    return type(exc)(f"{request.describe(item)}, t={t:.6f} s: {exc}")


def _split(runs: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Split runs (kept in decode order) into at most ``parts`` groups of similar packet count."""
    if parts <= 1 or len(runs) <= 1:
        return [runs]
    costs = np.array([last - first + 1 for first, last in runs], dtype=np.int64)
    bounds = np.cumsum(costs)
    total = int(bounds[-1])
    cuts = np.searchsorted(bounds, [total * k / parts for k in range(1, parts)], side="left")
    groups: list[list[tuple[int, int]]] = []
    start = 0
    for cut in [*cuts.tolist(), len(runs) - 1]:
        stop = min(int(cut) + 1, len(runs))
        if stop > start:
            groups.append(runs[start:stop])
            start = stop
    if start < len(runs):
        groups.append(runs[start:])
    return groups
