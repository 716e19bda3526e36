"""The threads of one `Loader` iteration: source -> fetch -> collate -> transfer -> consumer.

One thread pulls work items from the source, ``threads`` threads run ``fetch`` on them (an
``async def`` fetch runs on a per-thread event loop), one thread reorders (input order) and
collates, one thread pins and moves tensors to the device on its own CUDA stream. Stages are
joined by bounded queues, and at most ``threads + buffer_size`` items are between the source and
the collate stage, so a slow item never lets the reorder buffer grow without bound.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

import torch

from .packets import END, End, Failure, Output, Packet, PipelineError, short_repr
from .sources import Stateful
from .stats import StageCounter

__all__ = ["STAGES", "Run", "RunConfig", "map_tensors"]

STAGES = ("source", "fetch", "collate", "transfer", "sink")
_POLL_S = 0.02  # how often a blocked wait looks at the stop event
_JOIN_S = 5.0  # how long close() waits for all threads together


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (through dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        values = [map_tensors(v, fn) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else tuple(values)
    return obj


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
    skip_items: int = 0
    counters: dict[str, StageCounter] = field(default_factory=dict)


class Run:
    """The threads and queues of one iteration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.c = cfg.counters
        self.stop = threading.Event()
        self.crash: PipelineError | None = None
        self.timed_out = False  # a stage may be stuck: close(join=False), Loader.close joins
        self.slots = threading.Semaphore(cfg.threads + cfg.buffer_size)
        self.in_q: queue.Queue[Packet | End] = queue.Queue(cfg.buffer_size)
        self.out_q: queue.Queue[Packet | End] = queue.Queue()  # bounded by `slots`
        self.transfer_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        self.final_q: queue.Queue[Output | End] = queue.Queue(cfg.buffer_size)
        # thread -> (stage, item, since); items are formatted only when a timeout reports them
        self._active: dict[str, tuple[str, object, float]] = {}
        targets: list[tuple[str, str, Callable[[], None]]] = [("source", "source", self._source)]
        for i in range(cfg.threads):
            targets.append(("fetch", f"fetch-{i}", self._fetch))
        targets += [("collate", "collate", self._collate), ("transfer", "transfer", self._transfer)]
        self.threads = [
            threading.Thread(
                target=self._guard, args=(stage, fn), name=f"framefeed-{name}", daemon=True
            )
            for stage, name, fn in targets
        ]
        for t in self.threads:
            t.start()

    # -- plumbing ---------------------------------------------------------------------------

    def _guard(self, stage: str, fn: Callable[[], None]) -> None:
        try:
            fn()
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

    def _busy(self, stage: str, item: object | None) -> None:
        # Called twice per item per stage: a dict write under the GIL, no lock, no formatting.
        name = threading.current_thread().name
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

    # -- stages -----------------------------------------------------------------------------

    def _source(self) -> None:
        cfg, c = self.cfg, self.c["source"]
        stateful = cfg.items if isinstance(cfg.items, Stateful) else None
        it = iter(cfg.items)
        if cfg.skip_items:
            it = islice(it, cfg.skip_items, None)
        seq = 0
        try:
            while not self.stop.is_set():
                if not self.slots.acquire(timeout=_POLL_S):
                    continue
                start = time.monotonic()
                self._busy("source", f"<item #{seq}>")
                try:
                    item = next(it)
                    state = stateful.state_dict() if stateful is not None else None
                except StopIteration:
                    self.slots.release()
                    break
                except Exception as exc:
                    c.work(time.monotonic() - start, ok=False)
                    c.error(skipped=False)
                    failure = Failure("source", f"<item #{seq}>", seq, exc)
                    self._put(self.in_q, Packet(seq, None, None, failure=failure), c)
                    break
                finally:
                    self._busy("source", None)
                c.work(time.monotonic() - start)
                if not self._put(self.in_q, Packet(seq, item, state), c):
                    return
                seq += 1
            for _ in range(cfg.threads):
                if not self._put(self.in_q, END, c):
                    return
        finally:
            close = getattr(it, "close", None)
            if callable(close):
                close()

    def _fetch(self) -> None:
        cfg, c = self.cfg, self.c["fetch"]
        loop: asyncio.AbstractEventLoop | None = None
        try:
            while True:
                packet = self._get(self.in_q, c)
                if packet is None:
                    return
                if isinstance(packet, End):
                    self._put(self.out_q, packet, c)
                    return
                if packet.failure is None:
                    start = time.monotonic()
                    self._busy("fetch", packet.item)
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
                        self._busy("fetch", None)
                if not self._put(self.out_q, packet, c):
                    return
        finally:
            if loop is not None:
                loop.close()

    def _collate(self) -> None:
        cfg, c = self.cfg, self.c["collate"]
        pending: dict[int, Packet] = {}
        next_seq = 0
        ends = 0
        group: list[Packet] = []
        while ends < cfg.threads:
            packet = self._get(self.out_q, c)
            if packet is None:
                return
            if isinstance(packet, End):
                ends += 1
                continue
            ready = [packet]
            if cfg.in_order:
                pending[packet.seq] = packet
                ready = []
                while next_seq in pending:
                    ready.append(pending.pop(next_seq))
                    next_seq += 1
            for p in ready:
                self.slots.release()
                out: Output | None
                if p.failure is not None:
                    if cfg.skip:
                        continue
                    out = Output(None, p.item, p.seq + 1, p.source_state, failure=p.failure)
                elif cfg.collate_each:
                    out = self._batch([p], cast(list[Any], p.result), p.item)
                elif cfg.group_size is None:
                    out = Output(p.result, p.item, p.seq + 1, p.source_state)
                    c.work(0.0)
                else:
                    group.append(p)
                    if len(group) < cfg.group_size:
                        continue
                    out, group = self._group(group), []
                if out is not None and not self._put(self.transfer_q, out, c):
                    return
        if group and not cfg.drop_last:
            last = self._group(group)
            if last is not None and not self._put(self.transfer_q, last, c):
                return
        self._put(self.transfer_q, END, c)

    def _group(self, group: list[Packet]) -> Output | None:
        return self._batch(group, [p.result for p in group], [p.item for p in group])

    def _batch(self, group: list[Packet], samples: list[Any], items: object) -> Output | None:
        """``collate_fn(samples)`` of the fetched results of ``group`` (source ``items``)."""
        cfg, c = self.cfg, self.c["collate"]
        last = group[-1]
        start = time.monotonic()
        self._busy("collate", items)
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
            self._busy("collate", None)
        c.work(time.monotonic() - start)
        return Output(value, items, last.seq + 1, last.source_state)

    def _transfer(self) -> None:
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
                self._busy("transfer", out.label)
                try:
                    out.value = self._move(out.value, stream)
                    c.work(time.monotonic() - start)
                except Exception as exc:
                    c.work(time.monotonic() - start, ok=False)
                    c.error(skipped=cfg.skip)
                    if cfg.skip:
                        continue
                    out.failure = Failure("transfer", out.label, out.consumed - 1, exc)
                finally:
                    self._busy("transfer", None)
            if not self._put(self.final_q, out, c):
                return

    def _move(self, value: object, stream: torch.cuda.Stream | None) -> object:
        cfg = self.cfg
        if cfg.pin:
            value = map_tensors(value, lambda t: t if t.is_cuda else t.pin_memory())
        if cfg.device is None:
            return value
        device = cfg.device
        if stream is None:
            return map_tensors(value, lambda t: t.to(device))
        consumer = torch.cuda.default_stream(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            moved = t.to(device, non_blocking=True)
            if moved is not t:
                moved.record_stream(consumer)  # memory is reused only after the consumer's use
            return moved

        with torch.cuda.stream(stream):
            value = map_tensors(value, move)
        stream.synchronize()  # the consumer may use the batch on any stream
        return value

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
