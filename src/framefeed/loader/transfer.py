"""Moving a `Loader` output's tensors: pinned memory and a device, on a CUDA stream of its own.

The transfer stage's work, kept apart from the threads (`stages`): `map_tensors` walks dicts,
lists and (named) tuples; `move_tensors` pins and moves without changing dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["map_tensors", "move_tensors"]


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


def move_tensors(
    value: object, *, pin: bool, device: torch.device | None, stream: torch.cuda.Stream | None
) -> object:
    """``value`` with its tensors pinned (``pin``) and moved to ``device`` (on ``stream``).

    On a ``stream`` the copies are non-blocking and synchronised before returning, and each
    moved tensor is recorded on the device's default stream, so the consumer may use it there.
    """
    if pin:
        value = map_tensors(value, lambda t: t if t.is_cuda else t.pin_memory())
    if device is None:
        return value
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
