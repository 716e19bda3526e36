"""Running a `Loader`'s fetch in an executor's worker processes, a chunk of items per task.

With ``Loader(executor=...)`` each fetch thread pulls a chunk of items (a batch's worth when
batching), submits them as one task and waits, without the GIL, for their results; the work
itself runs in the executor's processes, so Python-heavy fetches do not share one GIL. One task
per chunk keeps the cost of the executor (pickling, a pipe round trip, two thread wake-ups in
the parent) to one per batch instead of one per item.

`RemoteFetch` is what the parent keeps: the fetch pickled once, sent with every task, and
unpickled once per worker process (a small per-process memo keyed by a token). `run_chunk` is
the task; it never raises for an item: each item's outcome comes back as an ``Outcome`` tuple
(a failure as the exception with the worker's traceback text), so one bad item fails (or is
skipped) alone, and `settle` records the outcomes on the items' packets in the parent.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from .packets import Failure, Packet, skip_delivered
from .stats import StageCounter

__all__ = [
    "ERROR",
    "MANY",
    "OK",
    "RemoteFetch",
    "RemoteTraceback",
    "run_chunk",
    "run_fetch",
    "settle",
]

OK, MANY, ERROR = 0, 1, 2  # an item's outcome: a result, a generator's results, an exception
Outcome = tuple[int, Any, str | None]  # (kind, value, the worker's traceback text for ERROR)

# Per worker process: the fetches unpickled so far, by token (a process serves few loaders;
# the memo only saves unpickling the same bytes for every task).
_MEMO: OrderedDict[str, Callable[[Any], Any]] = OrderedDict()
_MEMO_SIZE = 8


class RemoteTraceback(Exception):
    """The traceback of an exception raised in an executor's worker (the cause of the error)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RemoteFetch:
    """A fetch pickled once, to run in worker processes by `run_chunk`."""

    def __init__(self, fetch: Callable[[Any], Any]) -> None:
        try:
            self.payload = pickle.dumps(fetch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ConfigError(
                f"executor: fetch must be picklable to run in worker processes, and "
                f"{getattr(fetch, '__qualname__', type(fetch).__name__)} is not "
                f"({type(exc).__name__}: {exc}); use a module-level function or a picklable "
                "object"
            ) from exc
        self.token = uuid.uuid4().hex


def run_chunk(token: str, payload: bytes, items: Sequence[Any]) -> tuple[list[Outcome], float]:
    """The outcome of ``fetch(item)`` for each item, and the seconds they took together."""
    fetch = _MEMO.get(token)
    if fetch is None:
        fetch = _MEMO[token] = pickle.loads(payload)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    start = time.perf_counter()
    loops: list[asyncio.AbstractEventLoop] = []  # one for the chunk, made when first needed

    def loop() -> asyncio.AbstractEventLoop:
        if not loops:
            loops.append(asyncio.new_event_loop())
        return loops[0]

    outcomes: list[Outcome] = []
    try:
        for item in items:
            try:
                many, value = run_fetch(fetch, item, loop)
                outcomes.append((MANY if many else OK, value, None))
            except Exception as exc:
                outcomes.append((ERROR, _picklable(exc), traceback.format_exc()))
    finally:
        for lp in loops:
            lp.close()
    return outcomes, time.perf_counter() - start


def run_fetch(
    fetch: Callable[[Any], Any], item: Any, loop: Callable[[], asyncio.AbstractEventLoop]
) -> tuple[bool, Any]:
    """``(many, value)``: ``fetch(item)``, awaited on ``loop()`` when it is ``async def``.

    A generator or async generator fetch gives ``many=True`` and the list of its results. The
    fetch threads and the executor's workers both call this, so a fetch means the same in both.
    """
    result = fetch(item)
    if inspect.isawaitable(result):
        result = loop().run_until_complete(result)
    if inspect.isasyncgen(result):
        return True, loop().run_until_complete(_collect(result))
    if inspect.isgenerator(result):
        return True, list(result)
    return False, result


def settle(
    packets: Sequence[Packet],
    outcomes: Sequence[Outcome],
    seconds: float,
    *,
    counter: StageCounter,
    skip: bool,
    skip_results: int,
) -> None:
    """Record each item's outcome on its packet (in the parent) and count it in the stats."""
    for p, (kind, value, trace) in zip(packets, outcomes, strict=True):
        counter.work(seconds / len(packets), ok=kind != ERROR)
        if kind == ERROR:
            if trace is not None:
                value.__cause__ = RemoteTraceback(trace)
            counter.error(skipped=skip)
            p.failure = Failure("fetch", p.item, p.seq, value)
        elif kind == MANY:
            p.result, p.many = skip_delivered(value, p.seq, skip_results), True
        else:
            p.result = value


async def _collect(results: Any) -> list[Any]:
    return [r async for r in results]


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a RuntimeError that says what it was when it cannot cross processes."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
