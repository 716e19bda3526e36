"""Helpers shared by the `Loader` test modules: thread-leak checks, a jittery fetch, checkpoints."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from framefeed.loader.pipeline import Loader

STAGE_THREADS = ("framefeed-source", "framefeed-fetch-", "framefeed-collate", "framefeed-transfer")


def framefeed_threads(prefixes: tuple[str, ...] = STAGE_THREADS) -> list[str]:
    """Live threads of loaders (by default), or of anything framefeed starts (``("framefeed-",)``).

    A `MapDataset` owns decoder threads (``framefeed-decode_*``) until it is closed; the module's
    dataset fixture checks those after closing it.
    """
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Autouse in every module that imports it: no loader thread outlives a test."""
    yield
    deadline = time.monotonic() + 5
    while framefeed_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert framefeed_threads() == []


def jitter(x: int) -> int:
    time.sleep(random.Random(x).uniform(0, 0.01))
    return x * 10


def assert_batch_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def checkpoint_after(loader: Loader, n: int) -> tuple[list[Any], dict[str, Any]]:
    """The first ``n`` outputs of a fresh iteration and the checkpoint taken after them."""
    first: list[Any] = []
    state = loader.state_dict()
    for out in loader:
        if len(first) == n:
            break
        first.append(out)
        state = loader.state_dict()
    return first, state


def assert_resumes_exactly(
    make: Callable[[], Loader], stop_after: int
) -> tuple[list[Any], dict[str, Any]]:
    """A loader from ``make`` stopped after ``stop_after`` outputs resumes exactly.

    One loader runs a whole epoch, a second stops and checkpoints (through JSON), a third loads
    the checkpoint: what the second delivered plus what the third delivers is the whole epoch,
    and the third's next epoch is whole again. Returns the whole epoch and the checkpoint.
    """
    with make() as loader:
        everything = list(loader)
    with make() as loader:
        first, state = checkpoint_after(loader, stop_after)
    with make() as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert first + list(resumed) == everything
        assert list(resumed) == everything
    return everything, state
