"""framefeed: fast, exact PyTorch data loading for episodic, multimodal, time-indexed datasets."""

from __future__ import annotations

from .catalog import Column, ColumnKind, Dataset, Segment, Timeline, TimelineKind, VideoSpan
from .datasets import IterableDataset, MapDataset, merge_worker_states
from .errors import (
    ConfigError,
    DecodeError,
    FormatError,
    FramefeedError,
    FrameTimestampError,
    StorageError,
)
from .fields import (
    Decoder,
    Field,
    ImageDecoder,
    NumericDecoder,
    TaskDecoder,
    TextDecoder,
    VideoFrameDecoder,
    Window,
)
from .formats import open_dataset
from .index import SampleIndex
from .loader import Loader, PipelineError, StageStats, collate
from .rangecache import CacheConfig
from .sampling import EpisodeAwareSampler, SequenceSampler, ShardedShuffleSampler, WeightedSampler
from .storage import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "Column",
    "ColumnKind",
    "ConfigError",
    "Dataset",
    "DecodeError",
    "Decoder",
    "EpisodeAwareSampler",
    "Field",
    "FormatError",
    "FrameTimestampError",
    "FramefeedError",
    "ImageDecoder",
    "IterableDataset",
    "Loader",
    "MapDataset",
    "NumericDecoder",
    "PipelineError",
    "RetryPolicy",
    "SampleIndex",
    "Segment",
    "SequenceSampler",
    "ShardedShuffleSampler",
    "StageStats",
    "StorageError",
    "TaskDecoder",
    "TextDecoder",
    "Timeline",
    "TimelineKind",
    "VideoFrameDecoder",
    "VideoSpan",
    "WeightedSampler",
    "Window",
    "__version__",
    "collate",
    "merge_worker_states",
    "open_dataset",
]
