"""Format readers: turn a folder or URL into the format-agnostic `Dataset` model."""

from __future__ import annotations

import os
from typing import Any

from ..catalog import Dataset
from ..errors import ConfigError, FormatError
from ..rangecache import CacheConfig
from ..storage import RetryPolicy, Storage
from .lerobot import is_lerobot, open_lerobot
from .rerun import is_rerun, open_rerun
from .rerun_catalog import is_catalog_url, open_rerun_catalog

__all__ = ["open_dataset"]


def open_dataset(
    path_or_url: str | os.PathLike[str] | Dataset,
    *,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    cache: CacheConfig | None = None,
) -> Dataset:
    """Open the dataset at a local path or fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

    Only metadata is read: no data or video file is opened. The format is detected from the
    files present: LeRobot v3 (``meta/info.json``), or Rerun recordings (a ``.rrd`` file or a
    folder of them, one segment each; needs ``pip install 'framefeed[rerun]'``). A Rerun catalog
    server URL, ``rerun+http://host:port/<dataset name>``, opens that dataset of the server (same
    extra; the other options do not apply to it).
    ``storage_options`` go to fsspec (for S3: ``{"client_kwargs": {"endpoint_url": ...},
    "key": ..., "secret": ...}``); ``retry`` sets how remote range reads retry transient
    failures; ``index_dir`` is a folder where ``framefeed index --out`` wrote packet-index
    sidecars (the dataset's own ``meta/framefeed-index/`` is always looked at). ``cache`` keeps
    fetched byte ranges of a remote dataset on local disk (bounded, shared by every process of
    the node), so later epochs read them locally.
    """
    if isinstance(path_or_url, Dataset):
        return path_or_url
    if is_catalog_url(path_or_url):
        if any(v is not None for v in (storage_options, retry, index_dir, cache)):
            raise ConfigError(
                "storage_options, retry, index_dir and cache apply to files, not to a Rerun "
                "catalog server URL"
            )
        return open_rerun_catalog(str(path_or_url))
    storage = Storage(
        path_or_url,
        storage_options=storage_options,
        retry=retry,
        index_dir=os.fspath(index_dir) if index_dir is not None else None,
        cache=cache,
    )
    if is_lerobot(storage):
        return open_lerobot(storage)
    if is_rerun(storage):
        return open_rerun(storage)
    if storage.is_local and not os.path.exists(storage.root):
        raise FormatError(f"{storage.root}: no such file or directory")
    raise FormatError(
        f"{storage.root}: not a dataset framefeed can read (looked for meta/info.json of a "
        "LeRobot dataset and for Rerun .rrd files)"
    )
