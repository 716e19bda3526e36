"""The threads of one `Loader` iteration: source -> fetch -> collate -> transfer -> consumer.

``threads`` fetch threads pull work items from the source themselves, one at a time under a
lock that also numbers them, and run ``fetch`` on them (an ``async def`` fetch runs on a
per-thread event loop); they put the results back in input order (when asked) under a second
lock and hand them to the collate thread a chunk at a time (a batch's worth when batching), so
it wakes once per chunk rather than once per item. One thread collates, one pins and moves
tensors to the device on its own CUDA stream. At most ``threads + buffer_size`` items are
between the source and the end of the reordering, so a slow item never lets the reorder buffer
grow without bound; stages after it are joined by bounded queues.

Errors travel down the pipeline with the item that caused them (`Failure`) and the consumer
re-raises them in input order. Every wait polls a stop event, so `Run.close`, the consumer
leaving early and errors all stop the threads promptly.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

import torch

from .packets import END, End, Failure, Output, Packet, PipelineError, SourceItem, short_repr
from .sources import Stateful
from .stats import StageCounter
from .transfer import map_tensors, move_tensors

__all__ = ["STAGES", "Run", "RunConfig", "map_tensors"]

STAGES = ("source", "fetch", "collate", "transfer", "sink")
_POLL_S = 0.02  # how often a blocked wait looks at the stop event
_JOIN_S = 5.0  # how long close() waits for all threads together


@dataclass
class RunConfig:
    """Everything one iteration's threads need."""

    items: Iterable[Any]
    fetch: Callable[[Any], Any]
    collate_fn: Callable[[list[Any]], Any]
    group_size: int | None  # collate this many fetched samples into one output
    collate_each: bool  # each fetched result is a list of samples to collate
    drop_last: bool
    threads: int
    buffer_size: int
    in_order: bool
    skip: bool
    pin: bool
    device: torch.device | None  # move tensors here (None: leave them where they are)
    cuda_stream: bool  # move on a dedicated CUDA stream
    frames_dtype: torch.dtype | None = None  # uint8 frame batches become this, after the move
    skip_items: int = 0
    counters: dict[str, StageCounter] = field(default_factory=dict)


class Run:
    """The threads, queues and shared source of one iteration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.c = cfg.counters
        self.stop = threading.Event()
        self.crash: PipelineError | None = None
        self.timed_out = False  # a stage may be stuck: close(join=False), Loader.close joins
        # the source, pulled by the fetch threads under `_source_lock`
        self._source_lock = threading.Lock()
        self._it: Iterator[Any] | None = None
        self._stateful = cfg.items if isinstance(cfg.items, Stateful) else None
        self._seq = 0
        self._source_done = False
        self._alive = cfg.threads
        # reordering, done by the fetch threads under `_order_lock`; ready packets go to the
        # collate stage in chunks (a batch's worth when batching), waking it once per chunk
        self._order_lock = threading.Lock()
        self._pending: dict[int, Packet] = {}
        self._released = 0  # items that left the reordering (input order: the next seq)
        self._limit = cfg.threads + cfg.buffer_size  # items between the source and that
        self._room = threading.Condition(self._order_lock)
        self._room_waiting = 0
        self._ready: list[Packet] = []
        self._ready_kept = 0  # packets in `_ready` that the collate stage keeps
        self._ready_now = False  # `_ready` holds a failure to raise: pass it on at once
        self._chunk = cfg.group_size or 1
        self.out_q: queue.Queue[list[Packet] | End] = queue.Queue(
            max(1, cfg.buffer_size // self._chunk)
        )
        self.transfer_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        self.final_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        # thread -> (stage, item, since); items are formatted only when a timeout reports them
        self._active: dict[str, tuple[str, object, float]] = {}
        targets: list[tuple[str, str, Callable[[str], None]]] = []
        for i in range(cfg.threads):
            targets.append(("fetch", f"fetch-{i}", self._fetch))
        targets += [("collate", "collate", self._collate), ("transfer", "transfer", self._transfer)]
        self.threads = [
            threading.Thread(
                target=self._guard,
                args=(stage, fn, f"framefeed-{name}"),
                name=f"framefeed-{name}",
                daemon=True,
            )
            for stage, name, fn in targets
        ]
        for t in self.threads:
            t.start()

    # -- plumbing ---------------------------------------------------------------------------

    def _guard(self, stage: str, fn: Callable[[str], None], name: str) -> None:
        try:
            fn(name)
        except BaseException as exc:  # a bug in the pipeline itself: never a silent hang
            error = PipelineError(
                f"stage {stage!r} crashed: {type(exc).__name__}: {exc}", stage=stage
            )
            error.__cause__ = exc
            self.crash = error
            self.stop.set()

    def _put(self, q: queue.Queue[Any], obj: object, counter: StageCounter) -> bool:
        start = time.monotonic()
        while not self.stop.is_set():
            try:
                q.put(obj, timeout=_POLL_S)
            except queue.Full:
                continue
            counter.blocked(time.monotonic() - start)
            return True
        return False

    def _get(self, q: queue.Queue[Any], counter: StageCounter) -> Any:
        counter.queue(q.qsize())
        start = time.monotonic()
        while not self.stop.is_set():
            try:
                obj = q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            counter.waited(time.monotonic() - start)
            return obj
        return None

    def _acquire(self, lock: threading.Lock) -> bool:
        """Acquire ``lock`` (uncontended: at once), giving up when the run stops."""
        while not lock.acquire(timeout=_POLL_S):
            if self.stop.is_set():
                return False
        return True

    def _busy(self, name: str, stage: str, item: object | None) -> None:
        # Called twice per item per stage: a dict write under the GIL, no lock, no formatting.
        if item is None:
            self._active.pop(name, None)
        else:
            self._active[name] = (stage, item, time.monotonic())

    def describe_wait(self) -> tuple[str, str]:
        """The stage the consumer is waiting on, and what every busy thread is doing."""
        now = time.monotonic()
        snapshot = self._active.copy()  # one atomic copy under the GIL
        active = {k: (st, short_repr(it, 60), t) for k, (st, it, t) in snapshot.items()}
        if not active:
            return "source", "no stage is working on an item"
        culprit = max((s for s, _, _ in active.values()), key=STAGES.index)
        doing = "; ".join(
            f"{name} busy with {item} for {now - since:.3f} s"
            for name, (_, item, since) in sorted(active.items())
        )
        return culprit, doing

    # -- source and fetch: each fetch thread pulls its next item from the source ------------

    def _next_packet(self, name: str) -> Packet | None:
        """The next source item with its sequence number, or None at the end or on stop."""
        cfg, c = self.cfg, self.c["source"]
        start = time.monotonic()
        if not self._acquire(self._source_lock):
            return None
        try:
            if self._seq - self._released >= self._limit and not self._wait_room():
                return None
            begin = time.monotonic()
            c.blocked(begin - start)
            self.c["fetch"].queue(self._seq - self._released)
            if self._source_done or self.stop.is_set():
                return None
            seq = self._seq
            self._busy(name, "source", SourceItem(seq))
            try:
                if self._it is None:
                    it = iter(cfg.items)
                    self._it = islice(it, cfg.skip_items, None) if cfg.skip_items else it
                item = next(self._it)
                state = self._stateful.state_dict() if self._stateful is not None else None
            except StopIteration:
                self._source_done = True
                return None
            except Exception as exc:
                self._source_done = True
                c.work(time.monotonic() - begin, ok=False)
                c.error(skipped=False)
                failure = Failure("source", f"<item #{seq}>", seq, exc)
                return Packet(seq, None, None, failure=failure)
            finally:
                self._busy(name, "source", None)
            c.work(time.monotonic() - begin)
            self._seq = seq + 1
            return Packet(seq, item, state)
        finally:
            self._source_lock.release()

    def _wait_room(self) -> bool:
        """Wait (holding the source lock) until an item leaves the reordering; False on stop."""
        with self._room:
            self._room_waiting += 1
            try:
                while self._seq - self._released >= self._limit:
                    if self.stop.is_set():
                        return False
                    self._room.wait(_POLL_S)
            finally:
                self._room_waiting -= 1
        return True

    def _fetch(self, name: str) -> None:
        cfg, c = self.cfg, self.c["fetch"]
        loop: asyncio.AbstractEventLoop | None = None
        try:
            while True:
                packet = self._next_packet(name)
                if packet is None:
                    break
                if packet.failure is None:
                    start = time.monotonic()
                    self._busy(name, "fetch", packet.item)
                    try:
                        result = cfg.fetch(packet.item)
                        if inspect.isawaitable(result):
                            if loop is None:
                                loop = asyncio.new_event_loop()
                            result = loop.run_until_complete(result)
                        packet.result = result
                        c.work(time.monotonic() - start)
                    except Exception as exc:
                        c.work(time.monotonic() - start, ok=False)
                        c.error(skipped=cfg.skip)
                        packet.failure = Failure("fetch", packet.item, packet.seq, exc)
                    finally:
                        self._busy(name, "fetch", None)
                if not self._deliver(packet, flush=False):
                    return
            if not self.stop.is_set() and self._deliver(None, flush=True):
                self._put(self.out_q, END, c)
        finally:
            if loop is not None:
                loop.close()
            self._leave()

    def _deliver(self, packet: Packet | None, *, flush: bool) -> bool:
        """Reorder ``packet`` and pass the ready packets on, a chunk at a time (or all: flush).

        A chunk holds ``group_size`` packets that the collate stage keeps (failures to skip
        don't count), so its batches end with the chunks; a failure to raise goes at once.
        """
        with self._order_lock:
            if packet is not None:
                if self.cfg.in_order:
                    pending = self._pending
                    pending[packet.seq] = packet
                    while self._released in pending:
                        self._ready_one(pending.pop(self._released))
                else:
                    self._ready_one(packet)
                if self._room_waiting:
                    self._room.notify()
            ready = self._ready
            if not ready or not (flush or self._ready_now or self._ready_kept >= self._chunk):
                return True
            self._ready, self._ready_kept, self._ready_now = [], 0, False
            return self._put(self.out_q, ready, self.c["fetch"])

    def _ready_one(self, packet: Packet) -> None:
        # holding `_order_lock`
        self._released += 1
        self._ready.append(packet)
        if packet.failure is None:
            self._ready_kept += 1
        elif not self.cfg.skip:
            self._ready_now = True

    def _leave(self) -> None:
        """The last fetch thread to finish closes the source iterator."""
        with self._source_lock:
            self._alive -= 1
            if self._alive:
                return
            close = getattr(self._it, "close", None)
            if callable(close):
                close()

    # -- collate, transfer --------------------------------------------------------------------

    def _collate(self, name: str) -> None:
        cfg, c = self.cfg, self.c["collate"]
        ends = 0
        group: list[Packet] = []
        while ends < cfg.threads:
            chunk = self._get(self.out_q, c)
            if chunk is None:
                return
            if isinstance(chunk, End):
                ends += 1
                continue
            for p in chunk:
                out: Output | None
                if p.failure is not None:
                    if cfg.skip:
                        continue
                    out = Output(None, p.item, p.seq + 1, p.source_state, failure=p.failure)
                elif cfg.collate_each:
                    out = self._batch(name, [p], cast(list[Any], p.result), p.item)
                elif cfg.group_size is None:
                    out = Output(p.result, p.item, p.seq + 1, p.source_state)
                    c.work(0.0)
                else:
                    group.append(p)
                    if len(group) < cfg.group_size:
                        continue
                    out, group = self._group(name, group), []
                if out is not None and not self._put(self.transfer_q, out, c):
                    return
        if group and not cfg.drop_last:
            last = self._group(name, group)
            if last is not None and not self._put(self.transfer_q, last, c):
                return
        self._put(self.transfer_q, END, c)

    def _group(self, name: str, group: list[Packet]) -> Output | None:
        return self._batch(name, group, [p.result for p in group], [p.item for p in group])

    def _batch(
        self, name: str, group: list[Packet], samples: list[Any], items: object
    ) -> Output | None:
        """``collate_fn(samples)`` of the fetched results of ``group`` (source ``items``)."""
        cfg, c = self.cfg, self.c["collate"]
        last = group[-1]
        start = time.monotonic()
        self._busy(name, "collate", items)
        try:
            value = cfg.collate_fn(samples)
        except Exception as exc:
            c.work(time.monotonic() - start, ok=False)
            c.error(skipped=cfg.skip)
            if cfg.skip:
                return None
            failure = Failure("collate", items, group[0].seq, exc)
            return Output(None, items, last.seq + 1, last.source_state, failure=failure)
        finally:
            self._busy(name, "collate", None)
        c.work(time.monotonic() - start)
        return Output(value, items, last.seq + 1, last.source_state)

    def _transfer(self, name: str) -> None:
        cfg, c = self.cfg, self.c["transfer"]
        stream: torch.cuda.Stream | None = None
        if cfg.cuda_stream:
            stream = torch.cuda.Stream(device=cfg.device)  # type: ignore[no-untyped-call]
        while True:
            out = self._get(self.transfer_q, c)
            if out is None:
                return
            if isinstance(out, End):
                self._put(self.final_q, out, c)
                return
            if out.failure is None:
                start = time.monotonic()
                self._busy(name, "transfer", out.label)
                try:
                    out.value = move_tensors(
                        out.value,
                        pin=cfg.pin,
                        device=cfg.device,
                        stream=stream,
                        frames_dtype=cfg.frames_dtype,
                    )
                    c.work(time.monotonic() - start)
                except Exception as exc:
                    c.work(time.monotonic() - start, ok=False)
                    c.error(skipped=cfg.skip)
                    if cfg.skip:
                        continue
                    out.failure = Failure("transfer", out.label, out.consumed - 1, exc)
                finally:
                    self._busy(name, "transfer", None)
            if not self._put(self.final_q, out, c):
                return

    # -- consumer side ----------------------------------------------------------------------

    def next_output(self, timeout_s: float | None) -> Output | End:
        c = self.c["sink"]
        c.queue(self.final_q.qsize())
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            if self.crash is not None:
                raise self.crash
            if self.stop.is_set():
                raise PipelineError("the loader was closed during iteration", stage="sink")
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            try:
                out = self.final_q.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    self.timed_out = True
                    stage, doing = self.describe_wait()
                    raise PipelineError(
                        f"no item arrived within timeout_s={timeout_s} s; waiting on stage "
                        f"{stage!r} ({doing})",
                        stage=stage,
                    ) from None
                continue
            c.waited(time.monotonic() - start)
            return out

    def close(self, *, join: bool = True) -> None:
        self.stop.set()
        if not join:
            return
        deadline = time.monotonic() + _JOIN_S
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(deadline - time.monotonic(), 0.0))
