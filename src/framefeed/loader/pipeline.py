"""`Loader`: a concurrent pipeline, source -> fetch -> collate -> transfer -> consumer.

The public object: it checks its arguments, plans the source (`sources.plan_source`), starts one
`stages.Run` of threads per iteration, hands outputs to the consumer and re-raises failures
there as `PipelineError` (stage and item in the message, the original as ``__cause__``), in
input order; ``on_error="skip"`` drops failing items and counts them in `Loader.stats`. It also
keeps the progress of the current epoch for `Loader.state_dict`.
"""

from __future__ import annotations

import concurrent.futures
import time
import warnings
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import torch

from ..errors import ConfigError
from .collate import collate_any
from .packets import End, PipelineError
from .remote import RemoteFetch
from .sources import BatchSource, Stateful, plan_source
from .stages import STAGES, Run, RunConfig
from .stats import StageCounter, StageStats, format_table

__all__ = ["BatchSource", "Loader", "PipelineError"]

_STATE_VERSION = 1


class Loader:
    """Iterate ``fetch(item)`` over ``source`` with ``threads`` threads, in bounded memory.

    ``source`` is any iterable of work items (indices, lists of indices, paths, ...), or an
    async iterable (iterated on an event loop of its own). With ``fetch=None`` and a dataset
    with ``get_batch`` (a `framefeed.MapDataset`) as source,
    ``fetch`` is ``source.get_batch`` and the items are index lists: those of ``sampler`` when
    ``batch_size`` is None, groups of ``batch_size`` of its indices otherwise, or without a
    sampler consecutive chunks of ``range(len(source))``. Any other sequence (a list, a torch
    map-style ``Dataset``: ``__getitem__`` and ``__len__``) with a ``sampler`` is read in the
    sampler's order: each fetch thread runs ``fetch(source[i])`` (``source[i]`` when ``fetch``
    is None), ``batch_size`` of them per output, or one output per index list of a batch
    sampler when ``batch_size`` is None; a stateful sampler makes the resume exact. With
    ``fetch=None`` otherwise the items pass as they are. Outside dataset mode ``batch_size``
    collates that many fetched samples into each output.
    ``collate_fn`` replaces the default collate (framefeed's zero-copy `collate` for dict
    samples, torch's ``default_collate`` otherwise); with a dataset source it receives the
    batch's samples from ``source.__getitems__`` instead of ``get_batch``'s collated batch.
    ``fetch`` and ``collate_fn`` may be ``async def``: each thread awaits them on an event loop
    of its own. A ``fetch`` that is a generator (or an async generator) gives several samples
    per item: they are gathered in the fetch thread and go on one by one, in order.
    ``threads`` is the number of fetch threads, or threads per stage as a mapping: ``{"fetch":
    4, "collate": 2}`` (fetch defaults to 2, collate to 1; the transfer stage has one thread,
    since it copies on one CUDA stream). Several collate threads help a costly ``collate_fn``;
    with ``order="input"`` their outputs still leave in order.
    ``order="input"`` yields in source order, ``"completion"`` as soon as ready. ``pin_memory``
    pins tensors (when CUDA is available; by default when ``device`` is a CUDA device, since an
    asynchronous copy needs pinned memory) and ``device`` moves them, non-blocking, on a CUDA
    stream of their own; dtypes never change, except that with ``frames_dtype`` (a floating
    dtype) batches of uint8 frames (uint8 tensors of 4 or more dimensions) become that dtype in
    [0, 1] after the move, so on a GPU the conversion runs there (without ``device`` it runs in
    the transfer thread). ``timeout_s`` bounds the wait for each output.
    ``executor`` (a ``ProcessPoolExecutor``, say) runs ``fetch`` in its workers instead of in
    the fetch threads, one task per chunk of items (a batch's worth when batching): for fetches
    that spend their time in Python, which threads would run one at a time under the GIL.
    ``fetch`` must then be picklable; each fetch thread keeps one task in flight, so give at
    least as many threads as the executor has workers. The Loader does not shut it down.
    `set_epoch` passes the epoch on to the source and the sampler.
    """

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any] | BatchSource,
        *,
        fetch: Callable[[Any], Any] | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        sampler: Iterable[Sequence[int]] | Iterable[int] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        threads: int | Mapping[str, int] = 2,
        buffer_size: int = 4,
        order: Literal["input", "completion"] = "input",
        pin_memory: bool | None = None,
        device: str | torch.device | None = None,
        frames_dtype: torch.dtype | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        timeout_s: float | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        fetch_threads, collate_threads = _stage_threads(threads)
        if not isinstance(buffer_size, int) or isinstance(buffer_size, bool):
            raise ConfigError(
                f"buffer_size must be an int, got {type(buffer_size).__name__} {buffer_size!r}"
            )
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool)
        ):
            raise ConfigError(f"batch_size must be an int or None, got {batch_size!r}")
        if drop_last and batch_size is None:
            raise ConfigError(
                "drop_last=True needs batch_size (without it the source's items are the "
                "batches, and there is no incomplete batch to drop)"
            )
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size}")
        if order not in ("input", "completion"):
            raise ConfigError(f"order must be 'input' or 'completion', got {order!r}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 or None, got {timeout_s}")
        if frames_dtype is not None and not (
            isinstance(frames_dtype, torch.dtype) and frames_dtype.is_floating_point
        ):
            raise ConfigError(f"frames_dtype must be a floating torch dtype, got {frames_dtype!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise ConfigError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        self._plan = plan_source(
            source,
            fetch=fetch,
            sampler=sampler,
            batch_size=batch_size,
            drop_last=drop_last,
            custom_collate=collate_fn is not None,
        )
        self._collate_fn = collate_fn if collate_fn is not None else collate_any
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise ConfigError(
                f"executor must be a concurrent.futures.Executor (e.g. ProcessPoolExecutor), "
                f"got {type(executor).__name__}"
            )
        self._executor = executor
        self._remote = None if executor is None else RemoteFetch(self._plan.fetch)
        self._drop_last = drop_last
        self._threads = fetch_threads
        self._collate_threads = collate_threads
        self._buffer_size = buffer_size
        self._order = order
        self._skip = on_error == "skip"
        self._timeout_s = timeout_s
        cuda = torch.cuda.is_available()
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ConfigError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        try:
            self._device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device must be a torch device such as 'cuda' or 'cuda:1', not {device!r}"
            ) from exc
        self._frames_dtype = frames_dtype
        to_cuda = self._device is not None and self._device.type == "cuda"
        self._pin = cuda and (to_cuda if pin_memory is None else pin_memory)
        self._cuda_stream = to_cuda and cuda
        if to_cuda and not cuda:
            warnings.warn(
                f"device={device!r} but CUDA is not available: tensors stay on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
            self._device = None
        self._run: Run | None = None
        self._counters = self._new_counters()
        self._closed = False
        # progress of the current epoch, for state_dict
        self._delivered = 0
        self._consumed = 0
        self._partial = 0  # results of the next source item delivered (generator fetch)
        self._source_state: dict[str, Any] | None = None
        self._resume_skip: int | None = None  # set by load_state_dict for the next iteration

    def _new_counters(self) -> dict[str, StageCounter]:
        threads = {"fetch": self._threads, "collate": self._collate_threads}
        return {s: StageCounter(s, threads.get(s, 1)) for s in STAGES}

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise PipelineError("the loader is closed", stage="sink")
        self._stop_run()
        if self._resume_skip is None:
            self._delivered = self._consumed = self._partial = 0
            self._source_state = None
            skip = 0
        else:
            skip, self._resume_skip = self._resume_skip, None
        base_consumed = self._consumed
        self._counters = self._new_counters()
        cfg = RunConfig(
            items=self._plan.items,
            fetch=self._plan.fetch,
            collate_fn=self._collate_fn,
            group_size=self._plan.group_size,
            collate_each=self._plan.collate_each,
            drop_last=self._drop_last,
            threads=self._threads,
            buffer_size=self._buffer_size,
            collate_threads=self._collate_threads,
            in_order=self._order == "input",
            skip=self._skip,
            pin=self._pin,
            device=self._device,
            cuda_stream=self._cuda_stream,
            frames_dtype=self._frames_dtype,
            skip_items=skip,
            skip_results=self._partial,
            executor=self._executor,
            remote=self._remote,
            counters=self._counters,
        )
        return self._iterate(cfg, base_consumed)

    def _iterate(self, cfg: RunConfig, base_consumed: int) -> Iterator[Any]:
        run = self._run = Run(cfg)
        sink = self._counters["sink"]
        try:
            while True:
                out = run.next_output(self._timeout_s)
                if isinstance(out, End):
                    return
                if out.failure is not None:
                    raise out.failure.to_error()
                # counted before the hand-out, so a state taken in the loop body is exact
                self._delivered += 1
                self._consumed = base_consumed + out.consumed
                self._partial = out.partial
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

    def set_epoch(self, epoch: int) -> None:
        """Call ``set_epoch(epoch)`` on the source and the sampler, on each that has one.

        Call it before iterating, as with torch's ``DistributedSampler``: a framefeed sampler
        then yields that epoch's order. Without such a source or sampler it does nothing.
        """
        for target in self._plan.epoch_targets:
            target.set_epoch(epoch)

    def stats(self) -> list[StageStats]:
        """Per-stage statistics of the current (or latest) iteration, in pipeline order."""
        return [self._counters[s].snapshot() for s in STAGES]

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
            "partial": self._partial,
            "source": self._source_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration starts with the output after the last one delivered in ``state``.

        A source with its own ``state_dict`` (a framefeed sampler) is restored from the state
        it had after the last delivered item; any other source is iterated again from the start
        and the consumed items are skipped, so it must give the same items in the same order.
        When the last delivered output ended inside the results of a generator ``fetch``, that
        item is fetched again and the results already delivered are dropped (so it must yield
        the same results again).
        """
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ConfigError(f"unknown loader state version {state.get('version')!r}")
        consumed, source_state = int(state["consumed"]), state.get("source")
        partial = int(state.get("partial", 0))
        items = self._plan.items
        if isinstance(items, Stateful):
            if source_state is None and consumed:
                raise ConfigError("loader state has no source state, but this source needs one")
            if source_state is not None:
                items.load_state_dict(source_state)
            self._resume_skip = 0
        else:
            self._resume_skip = consumed
        self._delivered = int(state["delivered"])
        self._consumed = consumed
        self._partial = partial
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


_THREAD_DEFAULTS = {"fetch": 2, "collate": 1, "transfer": 1}


def _stage_threads(threads: object) -> tuple[int, int]:
    """(fetch, collate) thread counts from `Loader`'s ``threads`` (an int or a stage mapping)."""
    if isinstance(threads, Mapping):
        unknown = sorted(str(k) for k in threads if k not in _THREAD_DEFAULTS)
        if unknown:
            raise ConfigError(
                f"threads: unknown stage(s) {', '.join(map(repr, unknown))}; the stages with "
                f"threads are {', '.join(map(repr, _THREAD_DEFAULTS))}"
            )
        counts = {**_THREAD_DEFAULTS, **threads}
    else:
        counts = {**_THREAD_DEFAULTS, "fetch": threads}
    for stage, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise ConfigError(
                f"threads[{stage!r}] must be an int, got {type(n).__name__} {n!r}"
                if isinstance(threads, Mapping)
                else f"threads must be an int, got {type(n).__name__} {n!r} (or a mapping of "
                "stage to int)"
            )
        if n < 1:
            raise ConfigError(f"threads for stage {stage!r} must be >= 1, got {n}")
    if counts["transfer"] != 1:
        raise ConfigError(
            f"threads['transfer'] must be 1, got {counts['transfer']}: the transfer stage copies "
            "on one CUDA stream, in order"
        )
    return counts["fetch"], counts["collate"]
