"""What the map-style and streaming datasets share: fields, index and a per-process planner."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ..catalog import ColumnKind, Dataset
from ..errors import ConfigError
from ..fields import Field
from ..formats import open_dataset
from ..index import Grid, IndexSpec, SampleIndex
from ..memory import tune_worker_malloc
from ..nodecache import ColumnCache
from ..plan import BatchPlanner, build_index, resolve_fields
from ..table import ColumnStore, fingerprint
from ..video.engine import VideoEngine

__all__ = ["Serving"]


def auto_threads() -> int:
    """Decoder threads: every core (up to 8) in the main process, one in a DataLoader worker."""
    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


class Serving:
    """Resolves fields and the sample index once; builds the batch planner once per process.

    The planner (video engine, decoder cache, column store) is never shared across processes:
    after ``fork`` or unpickling each process builds its own on first use.
    """

    _segment_cache_bytes = 0

    def _setup(
        self,
        source: str | os.PathLike[str] | Dataset,
        *,
        delta_timestamps: Mapping[str, Sequence[float]] | None,
        episodes: Sequence[int] | None,
        tolerance_s: float,
        image_dtype: str,
        fields: Sequence[Field] | None,
        decode_threads: int | None,
        index: IndexSpec | None = None,
        column_cache: ColumnCache | bool | None = None,
    ) -> None:
        self.column_cache = ColumnCache.resolve(column_cache)
        if image_dtype not in ("uint8", "float32"):
            raise ConfigError(f"image_dtype must be 'uint8' or 'float32', not {image_dtype!r}")
        tolerance: Any = tolerance_s
        if not (isinstance(tolerance, numbers.Real) and float(tolerance) > 0):
            raise ConfigError(
                f"tolerance_s must be a positive number of seconds, got {tolerance!r}"
            )
        threads: Any = decode_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1
        ):
            raise ConfigError(f"decode_threads must be an integer >= 1, got {threads!r}")
        given: Any = index
        if given is not None and not isinstance(given, IndexSpec):
            raise ConfigError(
                f"index must be an IndexSpec, such as IndexSpec(window_mode='trim'), not {given!r}"
            )
        self.dataset = open_dataset(source)
        self.tolerance_s = float(tolerance_s)
        self.image_dtype = image_dtype
        spec = index if index is not None else IndexSpec()
        self.grid: Grid | None = None
        if self.dataset.is_recording:
            self.grid = Grid.for_dataset(self.dataset, spec)
            base = SampleIndex.from_dataset(self.dataset, episodes)
            base = SampleIndex(self.grid.counts(), base.segments)
        else:
            if spec.timeline not in (None, "frame_index") or spec.sampling is not None:
                raise ConfigError(
                    f"{self.dataset.root}: a {self.dataset.format_name} dataset is indexed by "
                    "frame_index (one row per frame); IndexSpec.timeline and sampling apply to "
                    "recordings"
                )
            base = SampleIndex.from_dataset(self.dataset, episodes)
        self.fields = resolve_fields(
            self.dataset, fields, delta_timestamps, self.tolerance_s, self.grid
        )
        self.index, read = build_index(self.dataset, base, self.fields, self.grid, spec.window_mode)
        # Columns the stale-drop check read: this process's first planner serves from them.
        self._index_store = read
        if self.dataset.selection is not None and self.dataset.selection.ranges:
            self.index = self.index.within(
                self.dataset.selection.ranges, "the view's frame ranges hold no sample"
            )
        if len(self.index) == 0:
            what = "view" if self.dataset.selection is not None else "dataset"
            held = (
                f"its {self.index.num_segments} selected segments hold no frames"
                if self.index.num_segments
                else "it selects no segment"
            )
            raise ConfigError(
                f"{self.dataset.root}: no samples to serve from this {what}: {held}; select "
                "episodes that have frames"
            )
        self._float_keys = [
            f.key
            for f in self.fields
            if f.column is not None and f.column.kind in (ColumnKind.VIDEO, ColumnKind.IMAGE)
        ]
        self._decode_threads = decode_threads
        self._cache_key: str | None = None
        if self.column_cache is not None and not self.dataset.is_recording:
            # Once, here: workers and unpickled copies get it without statting every file.
            self._cache_key = fingerprint(self.dataset, np.sort(self.index.segments))
        self._planner: BatchPlanner | None = None
        self._pid = -1

    def output_keys(self) -> list[str]:
        """Keys of a sample, in order: the fields, their pad masks, then the index keys."""
        keys = [f.key for f in self.fields]
        if self.grid is not None:
            keys += [f.pad_key for f in self.fields]
            keys += ["episode_index", self.grid.timeline, "index"]
        else:
            keys += [f.pad_key for f in self.fields if f.offsets is not None]
        return keys

    def frames_per_sample(self) -> int:
        """Camera frames one sample decodes: per video, image or packet-video field, the
        length of its window (1 without one)."""
        cameras = (ColumnKind.VIDEO, ColumnKind.IMAGE, ColumnKind.PACKETS)
        return sum(
            1 if f.offsets is None else len(f.offsets)
            for f in self.fields
            if f.column is not None and f.column.kind in cameras
        )

    @property
    def engine(self) -> VideoEngine:
        """This process's video engine (its counters are in ``engine.stats``)."""
        return self._plan().engine

    def _plan(self) -> BatchPlanner:
        if self._planner is None or self._pid != os.getpid():
            if torch.utils.data.get_worker_info() is not None:
                tune_worker_malloc()  # freed frame buffers go back to the kernel
            inherited = self._planner  # from the parent, through fork
            engine = VideoEngine(
                self.dataset.storage,
                threads=self._decode_threads or auto_threads(),
                segment_cache_bytes=self._segment_cache_bytes,
                # The cache drops inherited decoders after fork but keeps packet indexes.
                cache=inherited.engine.cache if inherited is not None else None,
            )
            planner = BatchPlanner(
                self.dataset,
                self.index,
                self.fields,
                engine,
                self.tolerance_s,
                self.grid,
                store=self._index_store if inherited is None else None,
            )
            self._index_store = None  # the planner has it now (or it was not needed)
            if inherited is not None:
                planner.store = inherited.store.for_this_process()  # plain arrays: shared pages
            elif self.column_cache is not None and isinstance(planner.store, ColumnStore):
                # Mapped from the node's cache; the key was computed once, at construction.
                planner.store.use_cache(self.column_cache, self._cache_key)
            elif self.column_cache is not None:
                # A recording: cached when its reader gave it a fingerprint, else in memory.
                planner.store.use_cache(self.column_cache)
            self._planner = planner
            self._pid = os.getpid()
        return self._planner

    def prepare(self) -> None:
        """Load the tabular columns and every video's packet index in this process now.

        DataLoader workers started with ``fork`` afterwards inherit both instead of each
        reading them again (their pages are shared), which shortens the first batch and
        saves memory. With ``spawn`` workers it only warms this process.
        """
        planner = self._plan()
        planner.store.load(planner.store_columns())
        paths = sorted(
            {
                str(p)
                for f in self.fields
                if f.column is not None and f.column.kind is ColumnKind.VIDEO
                for p in self.dataset.video_paths[f.column.path][planner.store.positions].tolist()
            }
        )
        if len(paths) > 1 and not self.dataset.storage.is_local:
            workers = min(len(paths), self.dataset.storage.retry.max_concurrency)
            with ThreadPoolExecutor(workers, thread_name_prefix="framefeed-prepare") as pool:
                list(pool.map(planner.engine.index, paths))
        else:
            for path in paths:
                planner.engine.index(path)

    def _fetch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Collated values of the samples ``indices`` (one read plan)."""
        values = self._plan().run(batch_indices(indices, len(self.index)))
        if self.image_dtype == "float32":
            for key in self._float_keys:
                values[key] = values[key].float().div_(255.0)
        return values

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_planner"] = None  # each process builds its own engine and column store
        state["_index_store"] = None
        return state

    def close(self) -> None:
        """Release decoders and decode threads, those of the fields' decoders included (the
        dataset stays usable)."""
        if self._planner is not None and self._pid == os.getpid():
            self._planner.engine.close()
        self._planner = None
        for f in self.fields:
            close = getattr(f.decoder, "close", None)  # e.g. PacketVideoDecoder(threads=n)
            if callable(close):
                close()


def batch_indices(indices: Any, size: int) -> np.ndarray:
    """A batch's sample numbers as int64, or a clear error for anything that is not a flat list
    of integers (numbers past int64 are out of range: `IndexError`, as for one sample)."""
    try:
        idx = np.asarray(indices)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"a batch is a flat list of sample numbers, not {indices!r}") from exc
    if idx.ndim != 1:
        raise ConfigError(
            f"a batch is a flat list of sample numbers, got shape {list(idx.shape)}"
            + (" (use ds[i] for one sample)" if idx.ndim == 0 else "")
        )
    if idx.dtype.kind == "O" and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in idx.tolist()
    ):
        big = next(v for v in idx.tolist() if not -(2**63) <= v < 2**63)
        raise IndexError(f"sample {big} out of range for an index of {size} samples")
    if idx.size and idx.dtype.kind not in "iu":
        raise ConfigError(
            f"sample numbers must be integers, got {idx.dtype} values such as {idx[0]!r}"
        )
    if idx.dtype.kind == "u" and idx.size and int(idx.max()) >= 2**63:
        raise IndexError(f"sample {int(idx.max())} out of range for an index of {size} samples")
    return idx.astype(np.int64, copy=False)
