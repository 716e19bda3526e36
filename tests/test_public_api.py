"""The public surface is pinned: a change to ``framefeed.__all__`` must be made on purpose."""

from __future__ import annotations

import pytest

import framefeed

pytestmark = pytest.mark.timeout(30)

EXPECTED_ALL = [
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


def test_all_is_pinned() -> None:
    assert sorted(framefeed.__all__) == EXPECTED_ALL


def test_all_is_sorted_and_unique() -> None:
    assert list(framefeed.__all__) == sorted(set(framefeed.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_exists(name: str) -> None:
    assert getattr(framefeed, name) is not None


def test_version_is_a_string() -> None:
    assert isinstance(framefeed.__version__, str)
    assert framefeed.__version__.count(".") >= 1


def test_exception_tree() -> None:
    base = framefeed.FramefeedError
    assert issubclass(base, Exception)
    for exc in (
        framefeed.ConfigError,
        framefeed.FormatError,
        framefeed.StorageError,
        framefeed.DecodeError,
        framefeed.FrameTimestampError,
    ):
        assert issubclass(exc, base), exc
    assert issubclass(framefeed.ConfigError, ValueError)
    assert issubclass(framefeed.StorageError, OSError)
    assert issubclass(framefeed.FrameTimestampError, framefeed.DecodeError)


def test_exceptions_pickle_round_trip() -> None:
    """Errors cross process boundaries (DataLoader workers re-raise them in the parent)."""
    import pickle

    for exc_type in (
        framefeed.ConfigError,
        framefeed.FormatError,
        framefeed.StorageError,
        framefeed.DecodeError,
        framefeed.FrameTimestampError,
    ):
        err = pickle.loads(pickle.dumps(exc_type("file.mp4: episode 3: boom")))
        assert type(err) is exc_type
        assert "file.mp4: episode 3: boom" in str(err)


def test_decoders_satisfy_the_protocol() -> None:
    for cls in (
        framefeed.NumericDecoder,
        framefeed.ImageDecoder,
        framefeed.TextDecoder,
        framefeed.TaskDecoder,
        framefeed.VideoFrameDecoder,
        framefeed.PacketVideoDecoder,
    ):
        assert isinstance(cls(), framefeed.Decoder), cls
