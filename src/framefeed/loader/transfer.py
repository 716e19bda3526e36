"""Moving a `Loader` output's tensors: pinned memory and a device, on a CUDA stream of its own.

The transfer stage's work, kept apart from the threads (`stages`): `map_tensors` walks dicts,
lists and (named) tuples; `move_tensors` pins and moves, and changes no dtype except, when asked,
that of batched uint8 frames, which become floats in [0, 1] only after they reach the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["is_frames", "map_tensors", "move_tensors"]

FRAME_MIN_DIMS = 4  # a batch of frames: (B, C, H, W), (B, T, C, H, W), ...


def is_frames(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batch of uint8 frames (uint8 with at least 4 dimensions)."""
    return t.dtype == torch.uint8 and t.dim() >= FRAME_MIN_DIMS


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


def _scaled(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as ``dtype`` in [0, 1] when it is a batch of uint8 frames and a dtype is asked."""
    if dtype is None or not is_frames(t):
        return t
    return t.to(dtype).div_(255)


def move_tensors(
    value: object,
    *,
    pin: bool,
    device: torch.device | None,
    stream: torch.cuda.Stream | None,
    frames_dtype: torch.dtype | None = None,
) -> object:
    """``value`` with its tensors pinned (``pin``) and moved to ``device`` (on ``stream``).

    On a ``stream`` the copies are non-blocking and synchronised before returning, and each
    moved tensor is recorded on the device's default stream, so the consumer may use it there.
    With ``frames_dtype``, batches of uint8 frames (`is_frames`) become that dtype, divided by
    255, after the move: on the device (on ``stream``), or here when there is no ``device``.
    """
    if pin:
        value = map_tensors(value, lambda t: t if t.is_cuda else t.pin_memory())
    if device is None:
        return (
            value
            if frames_dtype is None
            else map_tensors(value, lambda t: _scaled(t, frames_dtype))
        )
    if stream is None:
        return map_tensors(value, lambda t: _scaled(t.to(device), frames_dtype))
    consumer = torch.cuda.default_stream(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        moved = _scaled(t.to(device, non_blocking=True), frames_dtype)
        if moved is not t:
            moved.record_stream(consumer)  # memory is reused only after the consumer's use
        return moved

    with torch.cuda.stream(stream):
        value = map_tensors(value, move)
    stream.synchronize()  # the consumer may use the batch on any stream
    return value
