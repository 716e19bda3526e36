"""`Loader`: a concurrent pipeline, source -> fetch -> collate -> transfer -> consumer.

One thread pulls work items from the source, ``threads`` threads run ``fetch`` on them (an
``async def`` fetch runs on a per-thread event loop), one thread reorders (``order="input"``)
and collates, one thread pins and moves tensors to the device on its own CUDA stream. Stages
are joined by bounded queues, and at most ``threads + buffer_size`` items are between the
source and the collate stage, so a slow item never lets the reorder buffer grow without bound.

Errors travel down the pipeline with the item that caused them and are re-raised in the
consumer as `PipelineError` (stage and item in the message, the original as ``__cause__``), in
input order; ``on_error="skip"`` drops failing items and counts them in `Loader.stats`. Every
wait polls a stop event, so `Loader.close`, leaving a ``for`` loop early and errors all stop
the threads promptly.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import Any, Literal, Protocol, cast, runtime_checkable

import torch
from torch.utils.data import default_collate

from ..errors import ConfigError, FramefeedError
from .collate import collate
from .stats import StageCounter, StageStats, format_table

__all__ = ["BatchSource", "Loader", "PipelineError"]

_POLL_S = 0.02  # how often a blocked wait looks at the stop event
_JOIN_S = 5.0  # how long close() waits for all threads together
_STATE_VERSION = 1
_STAGES = ("source", "fetch", "collate", "transfer", "sink")


@runtime_checkable
class _Stateful(Protocol):
    """A source with its own checkpoint (a framefeed sampler)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    """A dataset that reads a whole batch at once, like `framefeed.MapDataset`."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int]) -> Any: ...


class PipelineError(FramefeedError):
    """A pipeline stage failed (or timed out); ``__cause__`` is the original exception."""

    def __init__(self, message: str, *, stage: str, item: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        """The stage that failed, or the stage the consumer was waiting on for a timeout."""
        self.item = item
        """``repr`` of the failing item (truncated), if there was one."""


def _short(item: object, limit: int = 80) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Failure:
    stage: str
    item: object
    seq: int
    error: BaseException

    def to_error(self) -> PipelineError:
        item = _short(self.item)
        error = PipelineError(
            f"stage {self.stage!r} failed on item #{self.seq} {item}: "
            f"{type(self.error).__name__}: {self.error}",
            stage=self.stage,
            item=item,
        )
        error.__cause__ = self.error
        return error


@dataclass
class _Packet:
    """One source item on its way from the source to the collate stage."""

    seq: int
    item: object
    source_state: dict[str, Any] | None
    result: object = None
    failure: _Failure | None = None


@dataclass
class _Output:
    """One output on its way from the collate stage to the consumer."""

    value: object
    label: object  # the source item(s), for error messages
    consumed: int  # source items consumed by this output and those before it (input order)
    source_state: dict[str, Any] | None
    failure: _Failure | None = None


class _End:
    """End of stream marker."""


_END = _End()


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        values = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else tuple(values)
    return obj


def _collate_any(samples: list[Any]) -> Any:
    if all(isinstance(s, dict) for s in samples):
        return collate(samples)
    return default_collate(samples)


class _Batched:
    """Groups of ``size`` consecutive indices of a sampler; its state is the sampler's."""

    def __init__(self, sampler: Iterable[int], size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.size = size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        group: list[int] = []
        for index in self.sampler:
            group.append(int(index))
            if len(group) == self.size:
                yield group
                group = []
        if group and not self.drop_last:
            yield group


class _StatefulBatched(_Batched):
    """`_Batched` over a sampler with ``state_dict``: exact after each whole group."""

    def __init__(self, sampler: _Stateful, size: int, drop_last: bool) -> None:
        super().__init__(cast(Iterable[int], sampler), size, drop_last)
        self.stateful = sampler

    def state_dict(self) -> dict[str, Any]:
        return self.stateful.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stateful.load_state_dict(state)


@dataclass
class _Config:
    items: Iterable[Any]
    fetch: Callable[[Any], Any]
    batch_size: int | None  # collate this many fetched samples into one output
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


class _Run:
    """The threads and queues of one iteration."""

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.c = cfg.counters
        self.stop = threading.Event()
        self.crash: PipelineError | None = None
        self.timed_out = False  # a stage may be stuck: close(join=False), Loader.close joins
        self.slots = threading.Semaphore(cfg.threads + cfg.buffer_size)
        self.in_q: queue.Queue[_Packet | _End] = queue.Queue(cfg.buffer_size)
        self.out_q: queue.Queue[_Packet | _End] = queue.Queue()  # bounded by `slots`
        self.transfer_q: queue.Queue[_Output | _End] = queue.Queue(cfg.buffer_size)
        self.final_q: queue.Queue[_Output | _End] = queue.Queue(cfg.buffer_size)
        self._active: dict[str, tuple[str, str, float]] = {}  # thread -> (stage, item, since)
        self._active_lock = threading.Lock()
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
        name = threading.current_thread().name
        with self._active_lock:
            if item is None:
                self._active.pop(name, None)
            else:
                self._active[name] = (stage, _short(item, 60), time.monotonic())

    def describe_wait(self) -> tuple[str, str]:
        """The stage the consumer is waiting on, and what every busy thread is doing."""
        now = time.monotonic()
        with self._active_lock:
            active = dict(self._active)
        if not active:
            return "source", "no stage is working on an item"
        culprit = max((s for s, _, _ in active.values()), key=_STAGES.index)
        doing = "; ".join(
            f"{name} busy with {item} for {now - since:.3f} s"
            for name, (_, item, since) in sorted(active.items())
        )
        return culprit, doing

    # -- stages -----------------------------------------------------------------------------

    def _source(self) -> None:
        cfg, c = self.cfg, self.c["source"]
        stateful = cfg.items if isinstance(cfg.items, _Stateful) else None
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
                    failure = _Failure("source", f"<item #{seq}>", seq, exc)
                    self._put(self.in_q, _Packet(seq, None, None, failure=failure), c)
                    break
                finally:
                    self._busy("source", None)
                c.work(time.monotonic() - start)
                if not self._put(self.in_q, _Packet(seq, item, state), c):
                    return
                seq += 1
            for _ in range(cfg.threads):
                if not self._put(self.in_q, _END, c):
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
                if isinstance(packet, _End):
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
                        packet.failure = _Failure("fetch", packet.item, packet.seq, exc)
                    finally:
                        self._busy("fetch", None)
                if not self._put(self.out_q, packet, c):
                    return
        finally:
            if loop is not None:
                loop.close()

    def _collate(self) -> None:
        cfg, c = self.cfg, self.c["collate"]
        pending: dict[int, _Packet] = {}
        next_seq = 0
        ends = 0
        group: list[_Packet] = []
        while ends < cfg.threads:
            packet = self._get(self.out_q, c)
            if packet is None:
                return
            if isinstance(packet, _End):
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
                out: _Output | None
                if p.failure is not None:
                    if cfg.skip:
                        continue
                    out = _Output(None, p.item, p.seq + 1, p.source_state, failure=p.failure)
                elif cfg.batch_size is None:
                    out = _Output(p.result, p.item, p.seq + 1, p.source_state)
                    c.work(0.0)
                else:
                    group.append(p)
                    if len(group) < cfg.batch_size:
                        continue
                    out, group = self._batch(group), []
                if out is not None and not self._put(self.transfer_q, out, c):
                    return
        if group and not cfg.drop_last:
            last = self._batch(group)
            if last is not None and not self._put(self.transfer_q, last, c):
                return
        self._put(self.transfer_q, _END, c)

    def _batch(self, group: list[_Packet]) -> _Output | None:
        cfg, c = self.cfg, self.c["collate"]
        items = [p.item for p in group]
        last = group[-1]
        start = time.monotonic()
        self._busy("collate", items)
        try:
            value = _collate_any([p.result for p in group])
        except Exception as exc:
            c.work(time.monotonic() - start, ok=False)
            c.error(skipped=cfg.skip)
            if cfg.skip:
                return None
            failure = _Failure("collate", items, group[0].seq, exc)
            return _Output(None, items, last.seq + 1, last.source_state, failure=failure)
        finally:
            self._busy("collate", None)
        c.work(time.monotonic() - start)
        return _Output(value, items, last.seq + 1, last.source_state)

    def _transfer(self) -> None:
        cfg, c = self.cfg, self.c["transfer"]
        stream: torch.cuda.Stream | None = None
        if cfg.cuda_stream:
            stream = torch.cuda.Stream(device=cfg.device)  # type: ignore[no-untyped-call]
        while True:
            out = self._get(self.transfer_q, c)
            if out is None:
                return
            if isinstance(out, _End):
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
                    out.failure = _Failure("transfer", out.label, out.consumed - 1, exc)
                finally:
                    self._busy("transfer", None)
            if not self._put(self.final_q, out, c):
                return

    def _move(self, value: object, stream: torch.cuda.Stream | None) -> object:
        cfg = self.cfg
        if cfg.pin:
            value = _map_tensors(value, lambda t: t if t.is_cuda else t.pin_memory())
        if cfg.device is None:
            return value
        device = cfg.device
        if stream is None:
            return _map_tensors(value, lambda t: t.to(device))
        consumer = torch.cuda.default_stream(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            moved = t.to(device, non_blocking=True)
            if moved is not t:
                moved.record_stream(consumer)  # memory is reused only after the consumer's use
            return moved

        with torch.cuda.stream(stream):
            value = _map_tensors(value, move)
        stream.synchronize()  # the consumer may use the batch on any stream
        return value

    # -- consumer side ----------------------------------------------------------------------

    def next_output(self, timeout_s: float | None) -> _Output | _End:
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


class Loader:
    """Iterate ``fetch(item)`` over ``source`` with ``threads`` threads, in bounded memory.

    ``source`` is any iterable of work items (indices, lists of indices, paths, ...). With
    ``fetch=None`` and a dataset with ``get_batch`` (a `framefeed.MapDataset`) as source,
    ``fetch`` is ``source.get_batch`` and the items are index lists: those of ``sampler`` when
    ``batch_size`` is None, groups of ``batch_size`` of its indices otherwise, or without a
    sampler consecutive chunks of ``range(len(source))``. With ``fetch=None`` otherwise the
    items pass as they are. Outside dataset mode ``batch_size`` collates that many fetched
    samples into each output.
    ``order="input"`` yields in source order, ``"completion"`` as soon as ready. ``pin_memory``
    pins tensors (when CUDA is available) and ``device`` moves them, non-blocking, on a CUDA
    stream of their own; dtypes never change. ``timeout_s`` bounds the wait for each output.
    """

    def __init__(
        self,
        source: Iterable[Any] | BatchSource,
        *,
        fetch: Callable[[Any], Any] | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        sampler: Iterable[Sequence[int]] | Iterable[int] | None = None,
        threads: int = 2,
        buffer_size: int = 4,
        order: Literal["input", "completion"] = "input",
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        timeout_s: float | None = None,
    ) -> None:
        if threads < 1 or buffer_size < 1:
            raise ConfigError(f"threads and buffer_size must be >= 1, got {threads}, {buffer_size}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size}")
        if order not in ("input", "completion"):
            raise ConfigError(f"order must be 'input' or 'completion', got {order!r}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 or None, got {timeout_s}")
        items: Iterable[Any]
        collate_size = batch_size
        if fetch is None and isinstance(source, BatchSource):
            fetch = source.get_batch
            collate_size = None  # get_batch returns collated batches
            if sampler is not None and batch_size is not None:
                if isinstance(sampler, _Stateful):
                    items = _StatefulBatched(sampler, batch_size, drop_last)
                else:
                    items = _Batched(cast(Iterable[int], sampler), batch_size, drop_last)
            elif sampler is not None:
                items = sampler
            elif batch_size is None:
                raise ConfigError("a dataset source needs batch_size or a sampler of index lists")
            else:
                n = len(source)
                stop = n - n % batch_size if drop_last else n
                items = [list(range(i, min(i + batch_size, n))) for i in range(0, stop, batch_size)]
        elif sampler is not None:
            raise ConfigError("sampler is only used with fetch=None and a source with get_batch")
        else:
            items = cast(Iterable[Any], source)  # a torch Dataset iterates by __getitem__
        self._items = items
        self._fetch: Callable[[Any], Any] = fetch if fetch is not None else _identity
        self._collate_size = collate_size
        self._drop_last = drop_last
        self._threads = threads
        self._buffer_size = buffer_size
        self._order = order
        self._skip = on_error == "skip"
        self._timeout_s = timeout_s
        cuda = torch.cuda.is_available()
        self._pin = pin_memory and cuda
        self._device = None if device is None else torch.device(device)
        self._cuda_stream = self._device is not None and self._device.type == "cuda" and cuda
        if self._device is not None and self._device.type == "cuda" and not cuda:
            warnings.warn(
                f"device={device!r} but CUDA is not available: tensors stay on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
            self._device = None
        self._run: _Run | None = None
        self._counters = self._new_counters()
        self._closed = False
        # progress of the current epoch, for state_dict
        self._delivered = 0
        self._consumed = 0
        self._source_state: dict[str, Any] | None = None
        self._resume_skip: int | None = None  # set by load_state_dict for the next iteration

    def _new_counters(self) -> dict[str, StageCounter]:
        return {s: StageCounter(s, self._threads if s == "fetch" else 1) for s in _STAGES}

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise PipelineError("the loader is closed", stage="sink")
        self._stop_run()
        if self._resume_skip is None:
            self._delivered = self._consumed = 0
            self._source_state = None
            skip = 0
        else:
            skip, self._resume_skip = self._resume_skip, None
        base_consumed = self._consumed
        self._counters = self._new_counters()
        cfg = _Config(
            items=self._items,
            fetch=self._fetch,
            batch_size=self._collate_size,
            drop_last=self._drop_last,
            threads=self._threads,
            buffer_size=self._buffer_size,
            in_order=self._order == "input",
            skip=self._skip,
            pin=self._pin,
            device=self._device,
            cuda_stream=self._cuda_stream,
            skip_items=skip,
            counters=self._counters,
        )
        return self._iterate(cfg, base_consumed)

    def _iterate(self, cfg: _Config, base_consumed: int) -> Iterator[Any]:
        run = self._run = _Run(cfg)
        sink = self._counters["sink"]
        try:
            while True:
                out = run.next_output(self._timeout_s)
                if isinstance(out, _End):
                    return
                if out.failure is not None:
                    raise out.failure.to_error()
                # counted before the hand-out, so a state taken in the loop body is exact
                self._delivered += 1
                self._consumed = base_consumed + out.consumed
                self._source_state = out.source_state
                handed = time.monotonic()
                yield out.value
                sink.work(time.monotonic() - handed)
        finally:
            # after a timeout a stage may be stuck in user code: don't block the raise on it;
            # the threads stop when it returns, and Loader.close() waits for them
            run.close(join=not run.timed_out)

    def _stop_run(self) -> None:
        if self._run is not None:
            self._run.close()

    def stats(self) -> list[StageStats]:
        """Per-stage statistics of the current (or latest) iteration, in pipeline order."""
        return [self._counters[s].snapshot() for s in _STAGES]

    def stats_table(self) -> str:
        """`stats` as a printable table."""
        return format_table(self.stats())

    def state_dict(self) -> dict[str, Any]:
        """Progress of the current epoch: outputs handed to the consumer (JSON-serialisable)."""
        if self._order != "input":
            raise ConfigError("exact resume needs order='input' (completion order is not a prefix)")
        return {
            "version": _STATE_VERSION,
            "delivered": self._delivered,
            "consumed": self._consumed,
            "source": self._source_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration starts with the output after the last one delivered in ``state``.

        A source with its own ``state_dict`` (a framefeed sampler) is restored from the state
        it had after the last delivered item; any other source is iterated again from the start
        and the consumed items are skipped, so it must give the same items in the same order.
        """
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ConfigError(f"unknown loader state version {state.get('version')!r}")
        consumed, source_state = int(state["consumed"]), state.get("source")
        if isinstance(self._items, _Stateful):
            if source_state is None and consumed:
                raise ConfigError("loader state has no source state, but this source needs one")
            if source_state is not None:
                self._items.load_state_dict(source_state)
            self._resume_skip = 0
        else:
            self._resume_skip = consumed
        self._delivered = int(state["delivered"])
        self._consumed = consumed
        self._source_state = source_state

    def close(self) -> None:
        """Stop the threads of the current iteration; idempotent. The loader can't be reused."""
        self._closed = True
        self._stop_run()

    def __enter__(self) -> Loader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _identity(item: Any) -> Any:
    return item
