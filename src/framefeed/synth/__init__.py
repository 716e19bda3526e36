"""Synthetic LeRobot v3.0 datasets for tests, demos and benchmarks, written without the network.

``write_lerobot_dataset(root, SynthConfig(...))`` writes a complete dataset (parquet data, mp4
videos, metadata) whose every value is a function of (episode, frame): numeric features follow
the formulas in :class:`SynthConfig`, and every camera or image frame carries a marker that
:func:`read_marker` decodes back to ``(episode, frame)``.
"""

from framefeed.synth.config import CameraSpec, SynthConfig
from framefeed.synth.content import episode_columns, episode_lengths, episode_task_index
from framefeed.synth.frames import draw_frame, read_marker
from framefeed.synth.writer import write_lerobot_dataset

__all__ = [
    "CameraSpec",
    "SynthConfig",
    "draw_frame",
    "episode_columns",
    "episode_lengths",
    "episode_task_index",
    "read_marker",
    "write_lerobot_dataset",
]
