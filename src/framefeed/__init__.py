"""framefeed: fast, exact PyTorch data loading for episodic, multimodal, time-indexed datasets."""

from __future__ import annotations

from . import distributed
from .catalog import Column, ColumnKind, Dataset, Segment, Timeline, TimelineKind, VideoSpan
from .datasets import (
    IterableDataset,
    MapDataset,
    Mixture,
    MixturePart,
    merge_worker_states,
    worker_init,
)
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
from .index import FixedRateSampling, IndexSpec, SampleIndex
from .loader import Loader, PipelineError, StageStats, collate
from .nodecache import ColumnCache
from .packet_field import PacketVideoDecoder
from .rangecache import CacheConfig
from .sampling import EpisodeAwareSampler, SequenceSampler, ShardedShuffleSampler, WeightedSampler
from .storage import RetryPolicy
from .streams import ColumnRows, SegmentSource, Stream, from_streams
from .tracing import tracing_scope, with_tracing
from .views import open_view

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "Column",
    "ColumnCache",
    "ColumnKind",
    "ColumnRows",
    "ConfigError",
    "Dataset",
    "DecodeError",
    "Decoder",
    "EpisodeAwareSampler",
    "Field",
    "FixedRateSampling",
    "FormatError",
    "FrameTimestampError",
    "FramefeedError",
    "ImageDecoder",
    "IndexSpec",
    "IterableDataset",
    "Loader",
    "MapDataset",
    "Mixture",
    "MixturePart",
    "NumericDecoder",
    "PacketVideoDecoder",
    "PipelineError",
    "RetryPolicy",
    "SampleIndex",
    "Segment",
    "SegmentSource",
    "SequenceSampler",
    "ShardedShuffleSampler",
    "StageStats",
    "StorageError",
    "Stream",
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
    "distributed",
    "from_streams",
    "merge_worker_states",
    "open_dataset",
    "open_view",
    "tracing_scope",
    "with_tracing",
    "worker_init",
]
