"""The threads of one `Loader` iteration: source -> fetch -> collate -> transfer -> consumer.

``threads`` fetch threads pull work items from the source themselves, one at a time under a
lock that also numbers them, and run ``fetch`` on them (an ``async def`` fetch runs on a
per-thread event loop, an ``executor`` runs it in worker processes a chunk of items at a time);
they put the results back in input order (when asked) and cut them into chunks, one batch's
worth of items each when batching (one item each otherwise; `reorder.Reorder`), so a collate
thread wakes once per batch rather than once per item and every chunk collates on its own.
``collate_threads`` threads collate chunks and pass the outputs on in chunk order (when asked);
one thread pins and moves tensors to the device on its own CUDA stream. At most ``threads +
buffer_size`` items (``threads`` chunks + ``buffer_size`` with an executor) are between the
source and the end of the reordering, so a slow item never lets the reorder buffer grow without
bound; stages after it are joined by bounded queues.

Errors travel down the pipeline with the item that caused them (`Failure`) and the consumer
re-raises them in input order. Every wait polls a stop event, so `Run.close`, the consumer
leaving early and errors all stop the threads promptly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

import torch

from .packets import (
    END,
    End,
    Failure,
    Output,
    Packet,
    PipelineError,
    SourceItem,
    short_repr,
    skip_delivered,
)
from .remote import ERROR, RemoteFetch, run_chunk, run_fetch, settle
from .reorder import Reorder
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
    collate_threads: int
    in_order: bool
    skip: bool
    pin: bool
    device: torch.device | None  # move tensors here (None: leave them where they are)
    cuda_stream: bool  # move on a dedicated CUDA stream
    frames_dtype: torch.dtype | None = None  # uint8 frame batches become this, after the move
    skip_items: int = 0
    skip_results: int = 0  # results of the first item already delivered (generator fetch)
    executor: concurrent.futures.Executor | None = None  # run fetch there, a chunk per task
    remote: RemoteFetch | None = None  # the fetch, pickled for the executor
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
        self._raw_it: Iterator[Any] | None = None  # `_it` before skipping: the one to close
        self._stateful = cfg.items if isinstance(cfg.items, Stateful) else None
        self._state: dict[str, Any] | None = None  # the source's state after the latest item
        self._seq = 0
        self._source_done = False
        self._alive = cfg.threads
        # reordering and chunking, done by the fetch threads under `_order.lock`; chunks go to
        # the collate stage whole (a batch's worth when batching), waking it once per chunk
        self._chunk = cfg.group_size or 1
        self._order = Reorder(
            in_order=cfg.in_order, chunk=self._chunk, skip=cfg.skip, skip_results=cfg.skip_results
        )
        # items between the source and the end of the reordering: with an executor each fetch
        # thread holds a whole chunk
        per_thread = self._chunk if cfg.executor is not None else 1
        self._limit = cfg.threads * per_thread + cfg.buffer_size
        self._fetching = cfg.threads  # fetch threads that may still deliver
        self.out_q: queue.Queue[tuple[int, list[Packet]] | End] = queue.Queue(
            max(1, cfg.buffer_size // self._chunk)
        )
        # collate threads pass their outputs on in chunk order (input order) under `_emit`
        self._emit = threading.Condition()
        self._emitted = 0  # chunks whose outputs went to the transfer stage
        self._collating = cfg.collate_threads  # collate threads still running
        self.transfer_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        self.final_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        # thread -> (stage, item, since); items are formatted only when a timeout reports them
        self._active: dict[str, tuple[str, object, float]] = {}
        self._local = threading.local()  # each thread's event loop, for async callables
        targets: list[tuple[str, str, Callable[[str], None]]] = []
        for i in range(cfg.threads):
            targets.append(("fetch", f"fetch-{i}", self._fetch))
        for i in range(cfg.collate_threads):
            targets.append(("collate", f"collate-{i}", self._collate))
        targets.append(("transfer", "transfer", self._transfer))
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
        finally:
            loop = getattr(self._local, "loop", None)
            if loop is not None:
                loop.close()

    def _loop(self) -> asyncio.AbstractEventLoop:
        """This thread's event loop, for async callables (made when first needed)."""
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    def _resolve(self, result: Any) -> Any:
        """``result``, awaited on this thread's event loop when it is awaitable (async def)."""
        return self._loop().run_until_complete(result) if inspect.isawaitable(result) else result

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
        start = time.monotonic()
        if not self._acquire(self._source_lock):
            return None
        try:
            return self._pull(name, start)
        finally:
            self._source_lock.release()

    def _next_packets(self, name: str, n: int) -> list[Packet]:
        """Up to ``n`` consecutive source items (fewer at the end, after a failure, on stop)."""
        start = time.monotonic()
        if not self._acquire(self._source_lock):
            return []
        packets: list[Packet] = []
        try:
            while len(packets) < n:
                packet = self._pull(name, start)
                if packet is None:
                    break
                packets.append(packet)
                if packet.failure is not None:
                    break
                start = time.monotonic()
        finally:
            self._source_lock.release()
        return packets

    def _pull(self, name: str, start: float) -> Packet | None:
        """`_next_packet`'s work, holding the source lock."""
        cfg, c = self.cfg, self.c["source"]
        if self._seq - self._order.released >= self._limit and not self._wait_room():
            return None
        begin = time.monotonic()
        c.blocked(begin - start)
        self.c["fetch"].queue(self._seq - self._order.released)
        if self._source_done or self.stop.is_set():
            return None
        seq = self._seq
        self._busy(name, "source", SourceItem(seq))
        try:
            if self._it is None:
                it = self._raw_it = iter(cfg.items)
                self._it = islice(it, cfg.skip_items, None) if cfg.skip_items else it
                if self._stateful is not None:
                    self._state = self._stateful.state_dict()
            item = next(self._it)
            before = self._state
            state = self._state = (
                self._stateful.state_dict() if self._stateful is not None else None
            )
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
        return Packet(seq, item, state, state_before=before)

    def _wait_room(self) -> bool:
        """Wait (holding the source lock) until an item leaves the reordering; False on stop."""
        with self._order.room:
            self._order.room_waiting += 1
            try:
                while self._seq - self._order.released >= self._limit:
                    if self.stop.is_set():
                        return False
                    self._order.room.wait(_POLL_S)
            finally:
                self._order.room_waiting -= 1
        return True

    def _fetch(self, name: str) -> None:
        try:
            run = self._fetch_local if self.cfg.executor is None else self._fetch_remote
            if run(name):
                self._finish_fetch()
        finally:
            self._leave()

    def _fetch_local(self, name: str) -> bool:
        """Fetch items in this thread until the source ends (True) or the run stops (False)."""
        cfg, c = self.cfg, self.c["fetch"]
        while True:
            packet = self._next_packet(name)
            if packet is None:
                return True
            if packet.failure is None:
                start = time.monotonic()
                self._busy(name, "fetch", packet.item)
                try:
                    many, value = run_fetch(cfg.fetch, packet.item, self._loop)
                    if many:
                        value = skip_delivered(value, packet.seq, cfg.skip_results)
                    packet.result, packet.many = value, many
                    c.work(time.monotonic() - start)
                except Exception as exc:
                    c.work(time.monotonic() - start, ok=False)
                    c.error(skipped=cfg.skip)
                    packet.failure = Failure("fetch", packet.item, packet.seq, exc)
                finally:
                    self._busy(name, "fetch", None)
            if not self._deliver(packet):
                return False

    def _fetch_remote(self, name: str) -> bool:
        """Fetch chunks of items in the executor, one task per chunk, until the source ends."""
        cfg, c = self.cfg, self.c["fetch"]
        remote, executor = cfg.remote, cfg.executor
        if remote is None or executor is None:  # the Loader sets both or neither
            raise RuntimeError("a remote fetch needs both an executor and a pickled fetch")
        while True:
            packets = self._next_packets(name, self._chunk)
            if not packets:
                return True
            todo = [p for p in packets if p.failure is None]
            if todo:
                items = [p.item for p in todo]
                self._busy(name, "fetch", items)
                start = time.monotonic()
                try:
                    future = executor.submit(run_chunk, remote.token, remote.payload, items)
                    got = self._wait_for(future)
                except Exception as exc:  # the task itself failed: a worker died, pickling
                    got = ([(ERROR, exc, None)] * len(todo), time.monotonic() - start)
                finally:
                    self._busy(name, "fetch", None)
                if got is None:
                    return False
                settle(todo, *got, counter=c, skip=cfg.skip, skip_results=cfg.skip_results)
            for p in packets:
                if not self._deliver(p):
                    return False

    def _wait_for(self, future: concurrent.futures.Future[Any]) -> Any:
        """``future``'s result, or None when the run stops first (the task is abandoned)."""
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except concurrent.futures.TimeoutError:
                if self.stop.is_set():
                    future.cancel()
                    return None

    def _deliver(self, packet: Packet) -> bool:
        """Reorder ``packet`` and hand the chunks it completes to the collate stage."""
        order = self._order
        with order.lock:
            order.add(packet)
            return self._hand_chunks(order.take())

    def _hand_chunks(self, chunks: list[list[Packet]]) -> bool:
        """Put ``chunks`` on the collate queue, numbered in order; False on stop."""
        # holding `_order.lock`: chunks enter the queue in the order they were cut
        order = self._order
        for chunk in chunks:
            if not self._put(self.out_q, (order.cut, chunk), self.c["fetch"]):
                return False
            order.cut += 1
        return True

    def _finish_fetch(self) -> None:
        """A fetch thread is out of items; the last one hands on the rest and ends the stage.

        Only the last one may cut the final, incomplete chunk: another thread may still be
        fetching items that belong in it.
        """
        with self._order.lock:
            self._fetching -= 1
            if self._fetching or self.stop.is_set():
                return
            if not self._hand_chunks(self._order.finish()):
                return
        for _ in range(self.cfg.collate_threads):
            if not self._put(self.out_q, END, self.c["fetch"]):
                return

    def _leave(self) -> None:
        """The last fetch thread to finish closes the source iterator."""
        with self._source_lock:
            self._alive -= 1
            if self._alive:
                return
            close = getattr(self._raw_it, "close", None)
            if callable(close):
                close()

    # -- collate, transfer --------------------------------------------------------------------

    def _collate(self, name: str) -> None:
        c = self.c["collate"]
        while True:
            got = self._get(self.out_q, c)
            if got is None:
                return
            if isinstance(got, End):
                break
            number, chunk = got
            if not self._emit_outputs(number, self._collate_chunk(name, chunk)):
                return
        with self._emit:
            self._collating -= 1
            last = self._collating == 0
        if last:  # every chunk is out: all chunks precede the END markers in the queue
            self._put(self.transfer_q, END, c)

    def _collate_chunk(self, name: str, chunk: list[Packet]) -> list[Output]:
        """The outputs of one chunk: a batch, one output per item, or a failure to raise."""
        cfg, c = self.cfg, self.c["collate"]
        outs: list[Output] = []
        group: list[Packet] = []
        for p in chunk:
            out: Output | None
            if p.failure is not None:
                if cfg.skip and p.failure.skippable:
                    continue
                # the consumer raises here; the items before it in its batch are not delivered
                outs.append(p.output(None, p.item, failure=p.failure))
                return outs
            if cfg.collate_each:
                out = self._batch(name, [p], cast(list[Any], p.result), p.item)
            elif cfg.group_size is None:
                out = p.output(p.result, p.item)
                c.work(0.0)
            else:
                group.append(p)
                continue
            if out is not None:
                outs.append(out)
        # a whole batch, or the last, incomplete one (the final chunk)
        if group and (len(group) == cfg.group_size or not cfg.drop_last):
            out = self._group(name, group)
            if out is not None:
                outs.append(out)
        return outs

    def _emit_outputs(self, number: int, outs: list[Output]) -> bool:
        """Pass chunk ``number``'s outputs on, after those of the chunks before it (in order).

        With one collate thread chunks arrive in order and nothing waits. False on stop.
        """
        c, emit = self.c["collate"], self._emit
        ordered = self.cfg.in_order and self.cfg.collate_threads > 1
        if ordered:
            with emit:
                while self._emitted != number:
                    if self.stop.is_set():
                        return False
                    emit.wait(_POLL_S)
        for out in outs:
            if not self._put(self.transfer_q, out, c):
                return False
        if ordered:
            with emit:
                self._emitted += 1
                emit.notify_all()
        return True

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
            value = self._resolve(cfg.collate_fn(samples))
        except Exception as exc:
            c.work(time.monotonic() - start, ok=False)
            c.error(skipped=cfg.skip)
            if cfg.skip:
                return None
            failure = Failure("collate", items, group[0].seq, exc)
            return last.output(None, items, failure=failure)
        finally:
            self._busy(name, "collate", None)
        c.work(time.monotonic() - start)
        return last.output(value, items)

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
                    out.failure = Failure("transfer", out.label, out.seq, exc)
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
