"""Which rank this process is: from the arguments, ``torch.distributed``, or the environment.

Every sharded order in framefeed (the map-style samplers, the streaming partition) takes its
rank and world size from here when the caller gives neither: the initialised default process
group first, then ``RANK`` / ``WORLD_SIZE`` (set by ``torchrun`` before the group exists), else
one process.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["resolve_rank"]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given (both), or found (neither); checked either way."""
    if rank is not None or world_size is not None:
        for name, value in (("rank", rank), ("world_size", world_size)):
            if not _is_int(value):
                raise ConfigError(
                    f"{name} must be an int, got {value!r} (give both rank and world_size, or "
                    "neither to take them from torch.distributed)"
                )
        found = (int(rank), int(world_size))  # type: ignore[arg-type]  # both ints: checked
    else:
        found = _from_environment()
    if found[1] < 1:
        raise ConfigError(f"world_size must be >= 1, got {found[1]}")
    if not 0 <= found[0] < found[1]:
        raise ConfigError(f"rank {found[0]} is not in [0, world_size={found[1]})")
    return found


def _from_environment() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if env_rank is not None and env_world is not None:
        try:
            return int(env_rank), int(env_world)
        except ValueError:
            raise ConfigError(
                f"RANK={env_rank!r} and WORLD_SIZE={env_world!r} must be integers"
            ) from None
    return 0, 1
