"""glibc malloc tuning inside DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import framefeed
from framefeed import memory

pytestmark = pytest.mark.timeout(120)


def test_tuning_applies_once_per_process_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "_tuned_pid", -1)
    monkeypatch.setenv("FRAMEFEED_MALLOC_TUNE", "0")
    assert memory.tune_worker_malloc() is False
    assert memory._tuned_pid == -1
    monkeypatch.delenv("FRAMEFEED_MALLOC_TUNE")
    applied = memory.tune_worker_malloc()
    assert applied == memory.is_glibc()
    assert applied == (memory._tuned_pid == os.getpid())
    assert memory.tune_worker_malloc() == applied  # the second call is the latch


class _Probe(torch.utils.data.Dataset[Any]):
    """Serves one framefeed sample and says whether this process tuned malloc."""

    def __init__(self, root: Path) -> None:
        self.inner = framefeed.MapDataset(root, fields=[framefeed.Field("action")])

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        self.inner[i]
        return memory._tuned_pid == os.getpid()


def test_workers_tune_and_the_main_process_does_not(
    plain_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_tuned_pid", -1)
    probe = _Probe(plain_root)
    assert probe[0] is False  # the main process is the user's: left alone
    loader = DataLoader(probe, batch_size=None, num_workers=1, multiprocessing_context="fork")
    seen = list(loader)
    assert seen == [memory.is_glibc()] * 2
