"""Training samplers, tested by invariants (CONVENTIONS 13) and one save/load contract test."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framefeed.errors import ConfigError
from framefeed.index import SampleIndex
from framefeed.sampling.samplers import (
    EpisodeAwareSampler,
    EpochSampler,
    ShardedShuffleSampler,
    WeightedSampler,
)
from framefeed.sampling.sequence import SequenceSampler

pytestmark = pytest.mark.timeout(60)
FEW = settings(max_examples=40, deadline=None)

LENGTHS = [7, 3, 12, 1, 0, 9, 5, 5, 14, 2, 8, 6]  # one empty episode on purpose


def offsets_of(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def locate(offsets: np.ndarray, i: int) -> tuple[int, int]:
    ep = int(np.searchsorted(offsets, i, side="right") - 1)
    return ep, i - int(offsets[ep])


def ranks(make: Callable[[int, int], EpochSampler[Any]], world: int) -> list[list[Any]]:
    return [list(make(r, world)) for r in range(world)]


# -- ShardedShuffleSampler ------------------------------------------------------------------


@FEW
@given(
    n=st.integers(0, 150),
    world=st.integers(1, 5),
    batch=st.none() | st.integers(1, 6),
    drop=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_sharded_shuffle_invariants(
    n: int, world: int, batch: int | None, drop: bool, epoch: int
) -> None:
    def make(r: int, w: int) -> ShardedShuffleSampler:
        s = ShardedShuffleSampler(n, seed=5, rank=r, world_size=w, batch_size=batch, drop_last=drop)
        s.set_epoch(epoch)
        return s

    per_rank = ranks(make, world)
    lens = {len(p) for p in per_rank}
    assert len(lens) == 1  # every rank yields the same count
    assert all(len(make(r, world)) == len(p) for r, p in enumerate(per_rank))
    flat = [i for p in per_rank for i in p]
    if drop:
        step = (batch or 1) * world
        assert len(flat) == n // step * step and len(set(flat)) == len(flat)  # disjoint
        assert len(per_rank[0]) % (batch or 1) == 0  # only full batches
        # global batch j (batch j of every rank) is one contiguous stretch of the permutation
        perm = list(make(0, 1))
        b = batch or 1
        for j in range(len(per_rank[0]) // b):
            batch_j = {i for p in per_rank for i in p[j * b : (j + 1) * b]}
            assert batch_j == set(perm[j * b * world : (j + 1) * b * world])
    else:
        assert set(flat) == set(range(n))  # jointly cover everything
        assert len(flat) == -(-n // world) * world
        if n % world == 0:
            assert sorted(flat) == list(range(n))  # disjoint: a permutation
    if world == 1 and not drop:
        assert sorted(per_rank[0]) == list(range(n))


# -- EpisodeAwareSampler --------------------------------------------------------------------


@FEW
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=10),
    first=st.integers(0, 3),
    last=st.integers(0, 3),
    world=st.integers(1, 4),
    shuffle=st.booleans(),
)
def test_episode_aware_invariants(
    lengths: list[int], first: int, last: int, world: int, shuffle: bool
) -> None:
    offsets = offsets_of(lengths)
    expected = [
        int(offsets[e]) + f
        for e, n in enumerate(lengths)
        for f in range(n)
        if first <= f < n - last
    ]

    def make(r: int, w: int) -> EpisodeAwareSampler:
        return EpisodeAwareSampler(
            lengths, drop_first=first, drop_last=last, shuffle=shuffle, rank=r, world_size=w
        )

    per_rank = ranks(make, world)
    assert len({len(p) for p in per_rank}) == 1
    assert all(len(make(r, world)) == len(p) for r, p in enumerate(per_rank))
    flat = [i for p in per_rank for i in p]
    assert set(flat) == set(expected)  # drop_first/drop_last respected, everything covered
    assert len(flat) == -(-len(expected) // world) * world  # padded only to equal counts
    if world == 1:
        assert sorted(flat) == expected  # a permutation of the candidates
        if not shuffle:
            assert flat == expected


def test_episode_aware_accepts_a_sample_index() -> None:
    index = SampleIndex(np.array(LENGTHS))
    a = list(EpisodeAwareSampler(index, drop_first=1, seed=3))
    b = list(EpisodeAwareSampler(LENGTHS, drop_first=1, seed=3))
    assert a == b


# -- SequenceSampler ------------------------------------------------------------------------


def runs_of(batches: list[list[int]], offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Check slot continuity; return the runs ``(start step, slot, episode, frames played)``."""
    lengths = np.diff(offsets)
    runs: list[tuple[int, int, int, int]] = []
    if not batches:
        return runs
    width = len(batches[0])
    for slot in range(width):
        prev: tuple[int, int] | None = None
        for t, batch in enumerate(batches):
            assert len(batch) == width
            ep, frame = locate(offsets, batch[slot])
            if prev is not None and prev[1] + 1 < lengths[prev[0]]:
                assert (ep, frame) == (prev[0], prev[1] + 1)  # same episode, next frame
                runs[-1] = (*runs[-1][:3], runs[-1][3] + 1)
            else:
                assert frame == 0  # the previous episode ended: a new one starts at frame 0
                runs.append((t, slot, ep, 1))
            prev = (ep, frame)
    return sorted(runs)


@FEW
@given(
    lengths=st.lists(st.integers(0, 15), min_size=1, max_size=14),
    batch=st.integers(1, 4),
    world=st.integers(1, 3),
    drop=st.booleans(),
    epoch=st.integers(0, 2),
)
def test_sequence_sampler_invariants(
    lengths: list[int], batch: int, world: int, drop: bool, epoch: int
) -> None:
    nonempty = {e for e, n in enumerate(lengths) if n > 0}
    if len(nonempty) < world:
        with pytest.raises(ConfigError):
            SequenceSampler(lengths, batch_size=batch, rank=0, world_size=world)
        return
    offsets = offsets_of(lengths)

    def make(r: int, w: int) -> SequenceSampler:
        s = SequenceSampler(lengths, batch_size=batch, seed=9, rank=r, world_size=w, drop_last=drop)
        s.set_epoch(epoch)
        return s

    per_rank = ranks(make, world)
    steps = len(per_rank[0])
    assert all(len(p) == steps == len(make(r, world)) for r, p in enumerate(per_rank))
    seen: list[set[int]] = []
    natural_ends = []
    for r, batches in enumerate(per_rank):
        cycle = make(r, world).cycles(epoch)[r].tolist()
        runs = runs_of(batches, offsets)
        real, padding = runs[: len(cycle)], runs[len(cycle) :]
        if drop:
            assert not padding
            assert len({ep for _, _, ep, _ in runs}) == len(runs)  # no episode twice
            assert [ep for _, _, ep, _ in runs] == cycle[: len(runs)]
        else:
            # every episode of the rank's cycle is started, in cycle order, and played in full
            assert [ep for _, _, ep, _ in real] == cycle
            assert all(played == lengths[ep] for _, _, ep, played in real)
            # then padding wraps around the cycle from its start
            assert [ep for _, _, ep, _ in padding] == [
                cycle[j % len(cycle)] for j in range(len(padding))
            ]
            natural_ends.append(max(t + n for t, _, _, n in real))
        seen.append({ep for _, _, ep, _ in runs})
    # ranks hold disjoint episodes and jointly cover all of them (all that start, with drop)
    assert sum(len(s) for s in seen) == len(set().union(*seen))
    if not drop:
        assert set().union(*seen) == nonempty
        assert max(natural_ends) == steps  # the epoch is no longer than it must be
    else:
        full = SequenceSampler(lengths, batch_size=batch, seed=9, rank=0, world_size=world)
        full.set_epoch(epoch)
        assert steps <= len(full)


def test_sequence_sampler_example() -> None:
    # Unshuffled, one rank, two slots: episodes 0 (samples 0-2), 1 (3) and 2 (4).
    s = SequenceSampler([3, 1, 1], batch_size=2, shuffle=False)
    assert list(s) == [[0, 3], [1, 4], [2, 0]]  # slot 1: episode 1, 2, then padding (0)
    s = SequenceSampler([3, 1, 1], batch_size=2, shuffle=False, drop_last=True)
    assert list(s) == [[0, 3], [1, 4]]  # slot 1 has nothing left at step 2: episode 0 cut


def test_sequence_sampler_in_a_dataloader() -> None:
    s = SequenceSampler(LENGTHS, batch_size=3, seed=1)
    data: Any = list(range(sum(LENGTHS)))  # any indexable works; the stubs want a Dataset
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(data, batch_sampler=s)
    got = [b.tolist() for b in loader]
    assert got == list(s) and len(got) == len(loader) == len(s)


# -- WeightedSampler ------------------------------------------------------------------------

GROUPS = [list(range(0, 10)), list(range(100, 103)), list(range(200, 250))]


@pytest.mark.parametrize("replacement", [True, False])
def test_weighted_frequencies(replacement: bool) -> None:
    weights = [1.0, 2.0, 5.0]
    n = 20_000
    draws = np.array(list(WeightedSampler(GROUPS, weights, num_samples=n, replacement=replacement)))
    p = np.array(weights) / sum(weights)
    counts = np.array([np.isin(draws, g).sum() for g in GROUPS])
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma), (counts, n * p)
    inner = draws[np.isin(draws, GROUPS[0])]  # uniform inside a group too
    per = np.bincount(inner, minlength=10)
    m, q = len(inner), 1 / 10
    assert np.all(np.abs(per - m * q) <= 5 * np.sqrt(m * q * (1 - q)))


def test_weighted_without_replacement_cycles_permutations() -> None:
    draws = list(WeightedSampler(GROUPS, [1, 1, 1], num_samples=600, replacement=False, seed=2))
    for g in GROUPS:
        mine = [d for d in draws if d in set(g)]
        for k in range(0, len(mine) - len(g) + 1, len(g)):
            assert sorted(mine[k : k + len(g)]) == g  # each cycle is a permutation of the group


@FEW
@given(n=st.integers(0, 300), world=st.integers(1, 5), replacement=st.booleans())
def test_weighted_sharding(n: int, world: int, replacement: bool) -> None:
    def make(r: int, w: int, num: int) -> WeightedSampler:
        return WeightedSampler(
            GROUPS, [3, 1, 1], num_samples=num, replacement=replacement, rank=r, world_size=w
        )

    per_rank = [list(make(r, world, n)) for r in range(world)]
    assert all(len(p) == len(make(r, world, n)) == -(-n // world) for r, p in enumerate(per_rank))
    # ranks take disjoint positions of one global draw sequence and jointly cover it
    single = list(make(0, 1, len(per_rank[0]) * world))
    interleaved = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]
    assert interleaved == single


def test_weighted_rejects_bad_weights() -> None:
    with pytest.raises(ConfigError):
        WeightedSampler(GROUPS, [1, 1], num_samples=3)
    with pytest.raises(ConfigError):
        WeightedSampler(GROUPS, [0, 0, 0], num_samples=3)
    with pytest.raises(ConfigError):
        WeightedSampler([[], [1]], [1, 1], num_samples=3)
    WeightedSampler([[], [1]], [0, 1], num_samples=3)  # an empty group is fine with weight 0


# -- shared: reproducibility, epochs, save/load contract ------------------------------------

FACTORIES: dict[str, Callable[[int, int], EpochSampler[Any]]] = {
    "shuffle": lambda r, w: ShardedShuffleSampler(97, seed=3, rank=r, world_size=w),
    "shuffle-drop": lambda r, w: ShardedShuffleSampler(
        97, seed=3, rank=r, world_size=w, batch_size=4, drop_last=True
    ),
    "episode-aware": lambda r, w: EpisodeAwareSampler(
        LENGTHS, drop_first=1, drop_last=2, seed=3, rank=r, world_size=w
    ),
    "sequence": lambda r, w: SequenceSampler(LENGTHS, batch_size=3, seed=3, rank=r, world_size=w),
    "sequence-drop": lambda r, w: SequenceSampler(
        LENGTHS, batch_size=2, seed=3, rank=r, world_size=w, drop_last=True
    ),
    "weighted": lambda r, w: WeightedSampler(
        GROUPS, [1, 2, 3], num_samples=80, rank=r, world_size=w
    ),
    "weighted-noreplace": lambda r, w: WeightedSampler(
        GROUPS, [1, 2, 3], num_samples=80, replacement=False, seed=3, rank=r, world_size=w
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_reproducible_and_differs_across_epochs(name: str) -> None:
    make = FACTORIES[name]
    for world in (1, 3):
        for r in range(world):
            a, b = make(r, world), make(r, world)
            assert list(a) == list(b) == list(a)  # a pure function of the arguments
            b.set_epoch(1)
            assert len(list(b)) == len(b)
            assert list(a) != list(b)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("epoch", [0, 4])
def test_save_load_resumes_the_exact_tail(name: str, world: int, epoch: int) -> None:
    make = FACTORIES[name]
    rng = np.random.default_rng([len(name), world, epoch])
    for rank in range(world):
        original = make(rank, world)
        original.set_epoch(epoch)
        full = list(original)
        assert len(full) == len(original)
        cuts = {0, 1, len(full) - 1, len(full), *rng.integers(0, len(full) + 1, size=3).tolist()}
        for cut in sorted(c for c in cuts if 0 <= c <= len(full)):
            first = make(rank, world)
            first.set_epoch(epoch)
            it = iter(first)
            head = [next(it) for _ in range(cut)]
            assert head == full[:cut]
            state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
            resumed = make(rank, world)
            resumed.load_state_dict(state)
            resumed.set_epoch(epoch)  # a training loop's set_epoch keeps the resume point
            assert list(resumed) == full[cut:]
            assert list(resumed) == full  # the next iteration is the whole epoch again
            resumed.set_epoch(epoch + 1)
            assert resumed.state_dict()["yielded"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_a_stateful_dataloader(workers: int) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    data = list(range(sum(LENGTHS)))

    def make() -> Any:
        sampler = SequenceSampler(LENGTHS, batch_size=3, seed=1)
        return stateful.StatefulDataLoader(data, batch_sampler=sampler, num_workers=workers)

    full = [b.tolist() for b in make()]
    for cut in (1, len(full) // 2, len(full) - 1):
        loader = make()
        it = iter(loader)
        for _ in range(cut):
            next(it)
        state = loader.state_dict()  # prefetched batches are not counted
        del it
        resumed = make()
        resumed.load_state_dict(state)
        assert [b.tolist() for b in resumed] == full[cut:]


def test_set_epoch_discards_a_resume_point_of_another_epoch() -> None:
    s = ShardedShuffleSampler(20, seed=1)
    it = iter(s)
    next(it)
    state = s.state_dict()
    t = ShardedShuffleSampler(20, seed=1)
    t.load_state_dict(state)
    t.set_epoch(1)
    other = ShardedShuffleSampler(20, seed=1)
    other.set_epoch(1)
    assert list(t) == list(other)


def test_load_state_dict_rejects_foreign_states() -> None:
    state = ShardedShuffleSampler(20, seed=1).state_dict()
    with pytest.raises(ConfigError):
        ShardedShuffleSampler(20, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError):
        ShardedShuffleSampler(21, seed=1).load_state_dict(state)  # the data changed
    with pytest.raises(ConfigError):
        EpisodeAwareSampler([20], seed=1).load_state_dict(state)
    with pytest.raises(ConfigError):
        ShardedShuffleSampler(20, seed=1).load_state_dict({**state, "version": 99})
    target = ShardedShuffleSampler(20, seed=1)
    with pytest.raises(ConfigError):
        target.load_state_dict({**state, "epoch": 3, "yielded": 21})
    assert target.epoch == 0  # a rejected state leaves the sampler as it was


@pytest.mark.parametrize(
    "build",
    [
        lambda: ShardedShuffleSampler(10, rank=2, world_size=2),
        lambda: ShardedShuffleSampler(-1),
        lambda: ShardedShuffleSampler(10, seed=-1),
        lambda: ShardedShuffleSampler(10, batch_size=0, drop_last=True),
        lambda: EpisodeAwareSampler([3, 4], drop_first=-1),
        lambda: EpisodeAwareSampler([3, -4]),
        lambda: SequenceSampler([3, 4], batch_size=0),
        lambda: SequenceSampler([3, 0], batch_size=1, rank=0, world_size=2),
    ],
)
def test_bad_arguments_raise_config_error(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        build()


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: ShardedShuffleSampler(10, seed="a"), "seed must be an int"),
        (lambda: ShardedShuffleSampler(10, seed=1.5), "seed must be an int"),
        (lambda: ShardedShuffleSampler(10, rank=None, world_size=2), "rank must be an int"),
        (lambda: ShardedShuffleSampler(10.5), "num_samples must be an int"),
        (lambda: ShardedShuffleSampler("10"), "num_samples must be an int"),
        (lambda: EpisodeAwareSampler(["a"]), "episode lengths must be integers"),
        (lambda: EpisodeAwareSampler([2.5]), "episode lengths must be integers"),
        (lambda: SequenceSampler([[1, 2], [3]], batch_size=2), "episode lengths must be integers"),
        (lambda: WeightedSampler([["a"]], [1.0], num_samples=3), "group 0 must be integers"),
        (lambda: WeightedSampler([[-1]], [1.0], num_samples=3), "negative sample numbers"),
        (lambda: WeightedSampler([[0]], ["a"], num_samples=3), "weights must be numbers"),
        (lambda: WeightedSampler([[0]], [1.0], num_samples=2.5), "num_samples must be an int"),
    ],
)
def test_bad_argument_types_are_config_errors(build: Callable[[], Any], expected: str) -> None:
    """Not a TypeError from a comparison, a numpy error at the first epoch, or a silent
    truncation of 1.5 to 1."""
    with pytest.raises(ConfigError, match=expected):
        build()


def test_a_dataset_is_not_taken_for_episode_lengths() -> None:
    """``EpisodeAwareSampler(dataset)`` used to iterate (decode) every sample before failing."""

    class Dataset(torch.utils.data.Dataset[int]):
        fetched = 0

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> int:
            if i >= 3:
                raise IndexError(i)
            Dataset.fetched += 1
            return i

    with pytest.raises(ConfigError, match=r"ds\.index"):
        EpisodeAwareSampler(Dataset())
    assert Dataset.fetched == 0


# -- rank and world size from the environment ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ShardedShuffleSampler(40, seed=2, **kw),
        lambda **kw: EpisodeAwareSampler(LENGTHS, seed=2, **kw),
        lambda **kw: SequenceSampler(LENGTHS, batch_size=2, seed=2, **kw),
        lambda **kw: WeightedSampler(
            [list(range(10)), list(range(10, 30))], [1, 2], num_samples=20, **kw
        ),
    ],
)
def test_samplers_take_rank_and_world_size_from_the_environment(
    make: Callable[..., EpochSampler[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    single = make()
    assert (single.rank, single.world_size) == (0, 1)
    assert list(single) == list(make(rank=0, world_size=1))
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        sampler = make()
        assert (sampler.rank, sampler.world_size) == (rank, 3)
        assert list(sampler) == list(make(rank=rank, world_size=3))  # as if given


def test_rank_arguments_are_both_or_neither_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"rank must be an int, got None \(give both"):
        ShardedShuffleSampler(10, world_size=2)
    with pytest.raises(ConfigError, match=r"world_size must be an int, got 1\.5"):
        ShardedShuffleSampler(10, rank=0, world_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rank 2 is not in \[0, world_size=2\)"):
        ShardedShuffleSampler(10, rank=2, world_size=2)
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK='one' and WORLD_SIZE='2' must be integers"):
        ShardedShuffleSampler(10)
