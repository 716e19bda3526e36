"""The numeric content of a synthetic dataset: a pure function of the config and (episode, frame).

Tests of readers can recompute any value from here instead of trusting what was written.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from framefeed.synth.config import SynthConfig

__all__ = ["episode_columns", "episode_lengths", "episode_task_index"]


def episode_lengths(config: SynthConfig) -> tuple[int, ...]:
    """The length of every episode, drawn uniformly in [min_length, max_length] from the seed."""
    rng = np.random.default_rng(config.seed)
    lengths = rng.integers(config.min_length, config.max_length + 1, size=config.num_episodes)
    return tuple(int(n) for n in lengths)


def episode_task_index(config: SynthConfig, episode: int) -> int:
    """The index into ``config.tasks`` of the single task of ``episode``."""
    return episode % len(config.tasks)


def episode_columns(
    config: SynthConfig, episode: int, length: int, start_index: int
) -> dict[str, npt.NDArray[np.generic]]:
    """The numeric columns of one episode, keyed by feature name, in ``info.json`` order.

    ``start_index`` is the global ``index`` of the episode's first frame. Vector features are
    ``(length, dim)`` arrays and the shape-[1] features are ``(length,)`` arrays.
    """
    frames = np.arange(length, dtype=np.int64)
    base = (episode * 1000 + frames).astype(np.float32)
    state_offsets = np.arange(config.state_dim, dtype=np.float32) / np.float32(8)
    action_offsets = np.arange(config.action_dim, dtype=np.float32) / np.float32(8)
    return {
        "observation.state": base[:, None] + state_offsets[None, :],
        "action": -base[:, None] - action_offsets[None, :],
        "next.reward": frames.astype(np.float32) / np.float32(4),
        "next.done": frames == length - 1,
        "timestamp": (frames / config.fps).astype(np.float32),
        "frame_index": frames,
        "episode_index": np.full(length, episode, dtype=np.int64),
        "index": start_index + frames,
        "task_index": np.full(length, episode_task_index(config, episode), dtype=np.int64),
    }
