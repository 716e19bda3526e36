"""What a `Loader` iterates: work items, the fetch that runs on each, and how outputs collate.

`plan_source` turns the ``Loader``'s arguments into a `SourcePlan`. A sequence (anything with
``__getitem__`` and ``__len__``) with a ``sampler`` is read in the sampler's order, each
``source[i]`` in a fetch thread. A dataset with
``get_batch`` (a `framefeed.MapDataset`) is read one index list at a time: ``get_batch`` returns
a collated batch, or with a custom ``collate_fn`` its ``__getitems__`` returns the samples and
the collate stage calls ``collate_fn`` on them. Any other iterable passes its items to ``fetch``
and, with ``batch_size``, groups of fetched samples are collated. An async iterable source is
iterated on an event loop of its own (`AsyncItems`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

from ..errors import ConfigError

__all__ = ["AsyncItems", "BatchSource", "SourcePlan", "Stateful", "plan_source"]


@runtime_checkable
class Stateful(Protocol):
    """A source with its own checkpoint (a framefeed sampler)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    """A dataset that reads a whole batch at once, like `framefeed.MapDataset`."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int]) -> Any: ...


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

    def __init__(self, sampler: Stateful, size: int, drop_last: bool) -> None:
        super().__init__(cast(Iterable[int], sampler), size, drop_last)
        self.stateful = sampler

    def state_dict(self) -> dict[str, Any]:
        return self.stateful.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stateful.load_state_dict(state)


class AsyncItems:
    """An async iterable as a plain one: each iteration drives it on a new event loop.

    The fetch threads pull items one at a time under the source lock, so the loop runs in one
    thread at a time (whichever pulls); `close` closes the async iterator and the loop.
    """

    def __init__(self, source: AsyncIterable[Any]) -> None:
        self.source = source

    def __iter__(self) -> _AsyncIterator:
        return _AsyncIterator(self.source.__aiter__())


class _AsyncIterator:
    def __init__(self, it: AsyncIterator[Any]) -> None:
        self._it = it
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop()

    def __iter__(self) -> _AsyncIterator:
        return self

    def __next__(self) -> Any:
        if self._loop is None:
            raise StopIteration
        try:
            return self._loop.run_until_complete(self._it.__anext__())
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            aclose = getattr(self._it, "aclose", None)
            if callable(aclose):
                loop.run_until_complete(aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __del__(self) -> None:
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()


@dataclass(frozen=True, kw_only=True)
class SourcePlan:
    """How a `Loader` turns its source into outputs."""

    items: Iterable[Any]
    """The work items, in order; a `Stateful` one is checkpointed by its own state."""
    fetch: Callable[[Any], Any]
    """Runs on each item in the fetch threads."""
    group_size: int | None
    """Collate this many fetched results into one output (None: see ``collate_each``)."""
    collate_each: bool
    """Each fetched result is a list of samples that is collated into one output."""
    epoch_targets: tuple[Any, ...]
    """Objects whose ``set_epoch`` `Loader.set_epoch` calls (the source, the sampler)."""


def plan_source(
    source: Iterable[Any] | AsyncIterable[Any] | BatchSource,
    *,
    fetch: Callable[[Any], Any] | None,
    sampler: Iterable[Sequence[int]] | Iterable[int] | None,
    batch_size: int | None,
    drop_last: bool,
    custom_collate: bool,
) -> SourcePlan:
    """The `SourcePlan` for a `Loader`'s arguments (see `Loader` for their meaning)."""
    targets = tuple(
        obj
        for i, obj in enumerate((source, sampler))
        if callable(getattr(obj, "set_epoch", None)) and (i == 0 or obj is not source)
    )
    if fetch is None and isinstance(source, BatchSource):
        items: Iterable[Any]
        if sampler is not None and batch_size is not None:
            if isinstance(sampler, Stateful):
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
        return SourcePlan(
            items=items,
            fetch=_samples_of(source) if custom_collate else source.get_batch,
            group_size=None,  # get_batch returns collated batches; __getitems__ one batch's list
            collate_each=custom_collate,
            epoch_targets=targets,
        )
    if sampler is not None:
        return _indexed_plan(source, fetch, sampler, batch_size, targets)
    if custom_collate and batch_size is None:
        raise ConfigError(
            "collate_fn needs batch_size (samples to collate per output) or a dataset source "
            "with get_batch"
        )
    if isinstance(source, AsyncIterable) and not isinstance(source, Iterable):
        items = AsyncItems(source)
    else:
        items = cast(Iterable[Any], source)  # a torch Dataset iterates by __getitem__
    return SourcePlan(
        items=items,
        fetch=fetch if fetch is not None else _identity,
        group_size=batch_size,
        collate_each=False,
        epoch_targets=targets,
    )


def _indexed_plan(
    source: object,
    fetch: Callable[[Any], Any] | None,
    sampler: Iterable[Sequence[int]] | Iterable[int],
    batch_size: int | None,
    targets: tuple[Any, ...],
) -> SourcePlan:
    """A sequence read in ``sampler``'s order: ``fetch(source[i])`` in the fetch threads.

    With ``batch_size`` the sampler gives indices and that many samples collate into each
    output; without it the sampler gives index lists (a batch sampler), one output each.
    """
    if not (callable(getattr(source, "__getitem__", None)) and hasattr(source, "__len__")):
        raise ConfigError(
            f"sampler needs a source with __getitem__ and __len__ (a sequence or a map-style "
            f"dataset), got {type(source).__name__}"
        )
    one = _Indexed(source, fetch if fetch is not None else _identity)
    return SourcePlan(
        items=sampler,
        fetch=one if batch_size is not None else _IndexedLists(one),
        group_size=batch_size,
        collate_each=batch_size is None,
        epoch_targets=targets,
    )


class _Indexed:
    """``fetch(source[i])``: a class rather than a closure, so an executor can pickle it."""

    def __init__(self, source: Any, fetch: Callable[[Any], Any]) -> None:
        self.source = source
        self.fetch = fetch

    def __call__(self, index: int) -> Any:
        return self.fetch(self.source[int(index)])


class _IndexedLists:
    """The samples of one index list, each through `_Indexed`."""

    def __init__(self, one: _Indexed) -> None:
        self.one = one

    def __call__(self, indices: Sequence[int]) -> list[Any]:
        return [self.one(i) for i in indices]


def _samples_of(source: BatchSource) -> Callable[[Sequence[int]], list[Any]]:
    """The samples of one index list, uncollated: ``__getitems__`` or one ``__getitem__`` each."""
    getitems = getattr(source, "__getitems__", None)
    if callable(getitems):
        return cast(Callable[[Sequence[int]], list[Any]], getitems)
    getitem = getattr(source, "__getitem__", None)
    if callable(getitem):
        return lambda indices: [getitem(int(i)) for i in indices]
    raise ConfigError(
        f"collate_fn with a dataset source needs samples: {type(source).__name__} has "
        "get_batch but neither __getitems__ nor __getitem__"
    )


def _identity(item: Any) -> Any:
    return item
