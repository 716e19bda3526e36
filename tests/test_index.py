"""`SampleIndex`: global sample numbers <-> (segment position, frame), and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framefeed import ConfigError, SampleIndex

pytestmark = pytest.mark.timeout(60)

_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def lengths_and_subset(draw: st.DrawFn) -> tuple[list[int], list[int] | None]:
    lengths = draw(st.lists(st.integers(0, 40), min_size=1, max_size=30))
    if draw(st.booleans()):
        return lengths, None
    subset = draw(st.permutations(range(len(lengths))))
    size = draw(st.integers(0, len(lengths)))
    return lengths, list(subset[:size])


def _expected_pairs(lengths: list[int], subset: list[int] | None) -> list[tuple[int, int]]:
    order = subset if subset is not None else list(range(len(lengths)))
    return [(seg, f) for seg in order for f in range(lengths[seg])]


@_SETTINGS
@given(lengths_and_subset())
def test_locate_enumerates_segments_in_order(case: tuple[list[int], list[int] | None]) -> None:
    lengths, subset = case
    index = SampleIndex(np.asarray(lengths), None if subset is None else np.asarray(subset))
    expected = _expected_pairs(lengths, subset)
    assert len(index) == len(expected)
    if not expected:
        return
    segs, frames = index.locate(np.arange(len(index)))
    assert list(zip(segs.tolist(), frames.tolist(), strict=True)) == expected
    assert segs.dtype == np.int64
    assert frames.dtype == np.int64


@_SETTINGS
@given(lengths_and_subset(), st.data())
def test_locate_global_index_round_trip(
    case: tuple[list[int], list[int] | None], data: st.DataObject
) -> None:
    lengths, subset = case
    index = SampleIndex(np.asarray(lengths), None if subset is None else np.asarray(subset))
    n = len(index)
    if n == 0:
        return
    picks = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=50))
    segs, frames = index.locate(picks)
    back = index.global_index(segs, frames)
    assert back.tolist() == [p % n for p in picks]


def test_negative_indices_count_from_the_end() -> None:
    index = SampleIndex(np.array([3, 0, 2]))
    segs, frames = index.locate([-1, -2, -5])
    assert segs.tolist() == [2, 2, 0]
    assert frames.tolist() == [1, 0, 0]


@pytest.mark.parametrize("bad", [5, 6, 1000, -6, -100])
def test_out_of_range_raises_index_error(bad: int) -> None:
    index = SampleIndex(np.array([3, 2]))
    with pytest.raises(IndexError, match=str(bad)):
        index.locate([0, bad])


def test_empty_index() -> None:
    index = SampleIndex(np.array([4, 5]), np.array([], dtype=np.int64))
    assert len(index) == 0
    with pytest.raises(IndexError):
        index.locate([0])
    segs, frames = index.locate([])
    assert segs.size == 0 and frames.size == 0


def test_subset_keeps_given_order() -> None:
    index = SampleIndex(np.array([2, 3, 4]), np.array([2, 0]))
    segs, frames = index.locate(np.arange(len(index)))
    assert len(index) == 6
    assert segs.tolist() == [2, 2, 2, 2, 0, 0]
    assert frames.tolist() == [0, 1, 2, 3, 0, 1]
    assert index.global_index(np.array([0, 2]), np.array([1, 0])).tolist() == [5, 0]
    assert index.num_segments == 2


def test_global_index_rejects_unknown_segments_and_frames() -> None:
    index = SampleIndex(np.array([2, 3, 4]), np.array([2, 0]))
    with pytest.raises(IndexError):
        index.global_index(1, 0)  # segment 1 is not in the subset
    with pytest.raises(IndexError):
        index.global_index(0, 2)  # segment 0 has 2 frames
    with pytest.raises(IndexError):
        index.global_index(2, -1)


@pytest.mark.parametrize(
    ("lengths", "segments"),
    [
        (np.array([[1, 2]]), None),
        (np.array([1, 2]), np.array([2])),
        (np.array([1, 2]), np.array([-1])),
        (np.array([1, -2]), None),
    ],
)
def test_bad_construction_raises_config_error(
    lengths: np.ndarray, segments: np.ndarray | None
) -> None:
    with pytest.raises(ConfigError):
        SampleIndex(lengths, segments)


def test_million_segments_are_cheap() -> None:
    lengths = np.full(1_000_000, 100, dtype=np.int64)
    index = SampleIndex(lengths)
    assert len(index) == 100_000_000
    assert index.nbytes < 64 * 1024 * 1024
    segs, frames = index.locate([99_999_999, 150])
    assert segs.tolist() == [999_999, 1]
    assert frames.tolist() == [99, 50]
