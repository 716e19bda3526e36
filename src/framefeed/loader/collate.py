"""`collate`: stack samples into a batch, without copying when they already are one.

`MapDataset.__getitems__` returns samples whose tensors are views into one batch tensor per
key. ``torch``'s default collate would copy them into a new tensor; `collate` notices that the
views tile their storage in order and returns the batch tensor itself. Anything else is stacked
as the default collate does (tensors stacked, numbers to tensors, strings to lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from ..errors import ConfigError
from ..tracing import with_tracing

__all__ = ["collate", "collate_any"]


@with_tracing("framefeed.collate")
def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate a list of sample dicts into one batch dict."""
    if not samples:
        return {}
    out: dict[str, Any] = {}
    for key in samples[0]:
        try:
            values = [s[key] for s in samples]
        except KeyError:
            bad = next(i for i, s in enumerate(samples) if key not in s)
            raise ConfigError(
                f"collate: sample {bad} has no key {key!r} that sample 0 has; every sample of "
                f"a batch needs the same keys (sample {bad} has {sorted(samples[bad])})"
            ) from None
        first = values[0]
        if isinstance(first, torch.Tensor):
            joined = _as_batch_view(values)
            out[key] = joined if joined is not None else torch.stack(values)
        else:
            out[key] = default_collate(values)
    return out


def _as_batch_view(values: list[Any]) -> torch.Tensor | None:
    """The tensor whose rows are ``values``, if they are equally spaced views of one storage."""
    first = values[0]
    if not all(isinstance(v, torch.Tensor) for v in values) or not first.is_contiguous():
        return None
    step = first.numel()
    ptr = first.untyped_storage().data_ptr()
    base = first.storage_offset()
    for i, v in enumerate(values):
        if (
            v.untyped_storage().data_ptr() != ptr
            or v.shape != first.shape
            or v.dtype != first.dtype
            or v.stride() != first.stride()
            or v.storage_offset() != base + i * step
        ):
            return None
    batch: torch.Tensor = first.new_empty(0)
    batch.set_(first.untyped_storage(), base, (len(values), *first.shape), (step, *first.stride()))
    return batch


def collate_any(samples: list[Any]) -> Any:
    """The `Loader`'s default: `collate` for dict samples, torch's default collate otherwise."""
    if all(isinstance(s, dict) for s in samples):
        return collate(samples)
    return default_collate(samples)
