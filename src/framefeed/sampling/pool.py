"""Episode-pool shuffle: frames drawn across a small pool of episodes, never decoded ahead.

A consumer admits episodes in its (seeded, shuffled) order into a pool of ``pool_size``
episodes. Each step picks a pool slot uniformly at random and emits that episode's next frame
(frames inside an episode are themselves shuffled); an exhausted episode leaves the pool and the
next one is admitted. Only row numbers move here: the pool costs a few integers per frame, and
samples are decoded when they are fetched. With a pool at least as large as the batch, the
episodes per batch approach what a global shuffle gives; with a pool of 1 the order is episode
by episode.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["pool_order"]


def pool_order(
    groups: list[np.ndarray], pool_size: int, rng: np.random.Generator, *, shuffle: bool = True
) -> np.ndarray:
    """One consumer's sample order, as a concatenation drawn from ``groups``.

    ``groups`` are the consumer's episodes (arrays of global sample numbers) in admission order.
    Without ``shuffle`` the groups are simply concatenated.
    """
    if pool_size < 1:
        raise ConfigError(f"episode_pool_size must be at least 1, got {pool_size}")
    total = int(sum(len(g) for g in groups))
    if not shuffle or total == 0:
        return np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    queue = [rng.permutation(g) for g in groups]
    out = np.empty(total, dtype=np.int64)
    pool: list[np.ndarray] = []
    cursor: list[int] = []
    admitted = 0
    while admitted < len(queue) and len(pool) < pool_size:
        if len(queue[admitted]):
            pool.append(queue[admitted])
            cursor.append(0)
        admitted += 1
    picks = rng.random(total)
    for k in range(total):
        slot = int(picks[k] * len(pool))
        frames = pool[slot]
        out[k] = frames[cursor[slot]]
        cursor[slot] += 1
        if cursor[slot] == len(frames):
            # Refill the slot with the next non-empty episode, or close the gap.
            while admitted < len(queue) and not len(queue[admitted]):
                admitted += 1
            if admitted < len(queue):
                pool[slot] = queue[admitted]
                cursor[slot] = 0
                admitted += 1
            else:
                pool[slot] = pool[-1]
                cursor[slot] = cursor[-1]
                pool.pop()
                cursor.pop()
    return out
