"""`Mixture`: several map-style datasets (or views) as one training source.

Each part keeps its own fields, windows, cameras and rates; ``rename`` maps a part's keys to
the mixture's (``cam_high`` in one dataset and ``observation.images.top`` in another become
one key). Samples are numbered part after part. A batch is split by part, each part serves its
share with one read plan, and the values are put back in the batch's order. ``sampler()``
draws parts with the given weights through `framefeed.WeightedSampler`, so a mixture keeps the
loader issue's guarantees: a pure function of (seed, epoch, rank), exact resume.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.data

from ..errors import ConfigError
from ..sampling.samplers import WeightedSampler
from .map import MapDataset, unbatch
from .serving import batch_indices

__all__ = ["Mixture", "MixturePart"]

SOURCE_KEY = "source"
"""Key of the part number in every sample of a mixture."""


@dataclass(frozen=True, kw_only=True)
class MixturePart:
    """One dataset of a mixture."""

    dataset: MapDataset
    """The part's map-style dataset (built on a dataset or a view)."""
    weight: float = 1.0
    """Relative probability of drawing from this part (`Mixture.sampler`)."""
    rename: Mapping[str, str] = field(default_factory=dict)
    """This part's key -> the mixture's key; pad masks follow their key."""

    def __post_init__(self) -> None:
        weight: Any = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"MixturePart weight must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"MixturePart weight must be finite and >= 0, got {weight!r}")


class Mixture(torch.utils.data.Dataset[dict[str, Any]]):
    """Map-style datasets served as one, with per-part weights and key remapping.

    ``keys="same"`` requires every part to produce the same keys after renaming;
    ``keys="common"`` keeps only the keys all parts share. Every sample also holds ``source``,
    the number of its part.
    """

    def __init__(
        self, parts: Sequence[MixturePart], *, keys: Literal["same", "common"] = "same"
    ) -> None:
        if not parts:
            raise ConfigError("a Mixture needs at least one part")
        if keys not in ("same", "common"):
            raise ConfigError(f"keys must be 'same' or 'common', not {keys!r}")
        for i, part in enumerate(parts):
            if not isinstance(part, MixturePart) or not isinstance(part.dataset, MapDataset):
                raise ConfigError(
                    f"mixture part {i} must be a MixturePart(dataset=MapDataset(...)), not {part!r}"
                )
        self.parts = list(parts)
        self._renames = [_full_rename(p) for p in self.parts]
        key_sets = [
            [r.get(k, k) for k in p.dataset.output_keys()]
            for p, r in zip(self.parts, self._renames, strict=True)
        ]
        for i, ks in enumerate(key_sets):
            twice = sorted({k for k in ks if ks.count(k) > 1})
            if twice:
                raise ConfigError(
                    f"mixture part {i}: after rename two keys are called {twice}; one would "
                    "overwrite the other, so rename to keys the part does not already produce"
                )
        common = set(key_sets[0]).intersection(*key_sets[1:])
        if keys == "same":
            for i, ks in enumerate(key_sets[1:], start=1):
                if set(ks) != set(key_sets[0]):
                    only0 = sorted(set(key_sets[0]) - set(ks))
                    only_i = sorted(set(ks) - set(key_sets[0]))
                    raise ConfigError(
                        f"mixture part {i} has keys {only_i} that part 0 lacks and lacks "
                        f"{only0}; rename them (MixturePart(rename=...)) or use keys='common'"
                    )
        self.keys = [k for k in key_sets[0] if k in common]
        if not self.keys:
            raise ConfigError(
                "the mixture's parts have no key in common; rename them "
                "(MixturePart(rename=...)) so that the keys to train on match"
            )
        if SOURCE_KEY in common:
            raise ConfigError(f"the key {SOURCE_KEY!r} is reserved for the part number")
        sizes = np.asarray([len(p.dataset) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        parts = ", ".join(f"{len(p.dataset)} x {p.weight:g}" for p in self.parts)
        return f"Mixture(parts=[{parts}], keys={self.keys})"

    def groups(self) -> list[np.ndarray]:
        """Global sample numbers of each part."""
        return [
            np.arange(self.offsets[i], self.offsets[i + 1], dtype=np.int64)
            for i in range(len(self.parts))
        ]

    def sampler(
        self,
        num_samples: int | None = None,
        *,
        replacement: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> WeightedSampler:
        """Draws parts with their weights (``num_samples`` per epoch, default ``len(self)``)."""
        return WeightedSampler(
            self.groups(),
            [p.weight for p in self.parts],
            num_samples=len(self) if num_samples is None else num_samples,
            replacement=replacement,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """A collated batch in the order of ``indices``, plus ``source`` (the part numbers)."""
        idx = batch_indices(indices, len(self))
        outside = (idx < -len(self)) | (idx >= len(self))
        if outside.any():
            bad = int(idx[outside][0])
            raise IndexError(f"sample {bad} out of range for a mixture of {len(self)} samples")
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size == 0:
            empty = self.parts[0].dataset.get_batch(idx)
            renamed = {self._renames[0].get(k, k): v for k, v in empty.items()}
            nothing = {k: renamed[k] for k in self.keys}
            nothing[SOURCE_KEY] = torch.from_numpy(idx)
            return nothing
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        pieces: list[tuple[np.ndarray, dict[str, Any]]] = []
        for p in np.unique(part).tolist():
            where = np.flatnonzero(part == p)
            batch = self.parts[p].dataset.get_batch(idx[where] - self.offsets[p])
            renamed = {self._renames[p].get(k, k): v for k, v in batch.items()}
            pieces.append((where, renamed))
        out: dict[str, Any] = {}
        order = np.argsort(np.concatenate([w for w, _ in pieces])) if pieces else idx
        for key in self.keys:
            values = [b[key] for _, b in pieces]
            if all(isinstance(v, torch.Tensor) for v in values):
                try:
                    out[key] = torch.cat(values)[torch.from_numpy(order)]
                except RuntimeError as exc:
                    shapes = [tuple(v.shape[1:]) for v in values]
                    raise ConfigError(
                        f"mixture key {key!r} has shapes {shapes} in different parts; give the "
                        "parts matching shapes (e.g. VideoFrameDecoder(size=(H, W)))"
                    ) from exc
            else:
                flat = [x for v in values for x in v]
                out[key] = [flat[i] for i in order.tolist()]
        out[SOURCE_KEY] = torch.from_numpy(part)
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return unbatch(self.get_batch(indices), len(indices))

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            number = operator.index(index)
        except TypeError:
            raise ConfigError(
                f"a sample index is an integer, not {type(index).__name__} {index!r}; use "
                "get_batch(indices) for several samples"
            ) from None
        return self.__getitems__([number])[0]


def _full_rename(part: MixturePart) -> dict[str, str]:
    """The part's renames plus the matching renames of pad masks."""
    rename = dict(part.rename)
    known = set(part.dataset.output_keys())
    unknown = [k for k in rename if k not in known]
    if unknown:
        raise ConfigError(f"rename names keys {unknown} that the part does not produce: {known}")
    for src, dst in list(rename.items()):
        pad = f"{src}_is_pad"
        if pad in known and pad not in rename:
            rename[pad] = f"{dst}_is_pad"
    return rename
