"""Batch read plans: from sample numbers and fields to the batch's values, in one pass.

`resolve_fields` turns user input (fields, LeRobot ``delta_timestamps``) into `PlannedField`s
with integer frame offsets. `BatchPlanner.run` maps a batch of sample numbers to segments and
frames, applies every window (clamp to the episode, pad mask), gathers tabular values with one
indexing operation per column, and collects every video frame of every camera into one call of
the video engine, which sorts them per file and decodes each needed GOP once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .catalog import Column, ColumnKind, Dataset
from .errors import ConfigError
from .fields import BatchIO, Decoder, Field, FieldRequest, TaskDecoder, Window, default_decoder
from .index import SampleIndex
from .table import ColumnStore
from .video.engine import VideoEngine

__all__ = ["BatchPlanner", "PlannedField", "default_fields", "resolve_fields"]


@dataclass(frozen=True, eq=False)
class PlannedField:
    """A field with its column, decoder and integer window resolved."""

    key: str
    column: Column | None
    decoder: Decoder
    offsets: np.ndarray | None
    """int64 frame offsets, or ``None`` for the sample's own frame without a T axis."""

    @property
    def pad_key(self) -> str:
        return f"{self.key}_is_pad"


def default_fields(dataset: Dataset) -> list[Field]:
    """Every feature as LeRobot returns it: cameras first, then columns, then ``task``."""
    videos = [Field(k) for k in dataset.video_keys]
    others = [Field(c.path) for c in dataset.columns.values() if c.kind is not ColumnKind.VIDEO]
    return [*videos, *others, Field("task", decode=TaskDecoder())]


def resolve_fields(
    dataset: Dataset,
    fields: Sequence[Field] | None,
    delta_timestamps: Mapping[str, Sequence[float]] | None,
    tolerance_s: float,
) -> list[PlannedField]:
    """Fields to `PlannedField`s; ``delta_timestamps`` adds windows to the fields it names."""
    chosen = list(fields) if fields is not None else default_fields(dataset)
    by_key = {f.out_key: f for f in chosen}
    if len(by_key) != len(chosen):
        raise ConfigError("two fields have the same output key")
    deltas = dict(delta_timestamps or {})
    unknown = [k for k in deltas if k not in by_key]
    if unknown:
        raise ConfigError(
            f"delta_timestamps names {unknown}, which are not fields of this dataset; "
            f"fields are: {list(by_key)}"
        )
    planned = []
    for f in chosen:
        window = f.resolved_window()
        if f.out_key in deltas:
            if window is not None:
                raise ConfigError(f"field {f.out_key!r} has a window and a delta_timestamps entry")
            seconds = tuple(float(d) for d in deltas[f.out_key])
            window = Window(seconds=seconds, tolerance_s=tolerance_s)
        column = dataset.columns.get(f.path)
        if column is None and f.decode is None:
            raise ConfigError(
                f"field {f.out_key!r}: the dataset has no column {f.path!r} "
                f"(columns: {list(dataset.columns)})"
            )
        decoder = f.decode if f.decode is not None else default_decoder(column)  # type: ignore[arg-type]
        offsets = window.offsets(dataset.fps, f.out_key) if window is not None else None
        planned.append(PlannedField(key=f.out_key, column=column, decoder=decoder, offsets=offsets))
    return planned


class BatchPlanner:
    """Serves batches of samples of one `SampleIndex` with a fixed list of fields."""

    def __init__(
        self,
        dataset: Dataset,
        index: SampleIndex,
        fields: Sequence[PlannedField],
        engine: VideoEngine,
        tolerance_s: float,
    ) -> None:
        self.dataset = dataset
        self.index = index
        self.fields = list(fields)
        self.engine = engine
        self.tolerance_s = tolerance_s
        self.store = ColumnStore(dataset, np.sort(index.segments))

    def store_columns(self) -> list[str]:
        cols: list[str] = []
        for f in self.fields:
            cols.extend(f.decoder.columns(f.column))
        return list(dict.fromkeys(cols))

    def run(self, indices: Iterable[int] | np.ndarray) -> dict[str, Any]:
        """Values for a batch: tensors (B, ...) or lists of B values, then the pad masks."""
        segs, frames = self.index.locate(indices)
        self.store.load(self.store_columns())
        lengths = self.dataset.lengths[segs][:, None]
        io = BatchIO()
        values: dict[str, Any] = {}
        pads: dict[str, torch.Tensor] = {}
        for f in self.fields:
            if f.offsets is None:
                wanted = frames[:, None]
            else:
                wanted = frames[:, None] + f.offsets[None, :]
                pads[f.pad_key] = torch.from_numpy((wanted < 0) | (wanted >= lengths))
                wanted = np.clip(wanted, 0, lengths - 1)
            request = FieldRequest(
                dataset=self.dataset,
                column=f.column,
                key=f.key,
                segments=segs,
                frames=wanted,
                rows=self.store.rows(segs[:, None], wanted),
                windowed=f.offsets is not None,
                store=self.store,
                tolerance_s=self.tolerance_s,
            )
            values[f.key] = f.decoder.decode(request, io)
        if io.frames:
            self.engine.decode(io.frames, tolerance_s=self.tolerance_s)
        _fill_missing(values, pads, self.fields)
        values.update(pads)
        return values


def _fill_missing(
    values: dict[str, Any], pads: dict[str, torch.Tensor], fields: Sequence[PlannedField]
) -> None:
    """Lists from decoders that hold ``None`` become zero-filled tensors plus a pad mask.

    Only lists whose other entries are tensors are filled; lists of strings stay as they are.
    """
    for f in fields:
        vals = values[f.key]
        if not isinstance(vals, list) or all(v is not None for v in vals):
            continue
        proto = next((v for v in vals if v is not None), None)
        if not isinstance(proto, torch.Tensor):
            continue
        missing = torch.tensor([v is None for v in vals])
        values[f.key] = torch.stack([v if v is not None else torch.zeros_like(proto) for v in vals])
        if f.pad_key in pads:
            pads[f.pad_key] |= missing[:, None]
        else:
            pads[f.pad_key] = missing
