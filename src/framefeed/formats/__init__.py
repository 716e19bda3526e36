"""Format readers: turn a folder or URL into the format-agnostic `Dataset` model."""

from __future__ import annotations

import os

from ..catalog import Dataset
from ..errors import FormatError
from ..storage import Storage
from .lerobot import is_lerobot, open_lerobot

__all__ = ["open_dataset"]


def open_dataset(path_or_url: str | os.PathLike[str] | Dataset) -> Dataset:
    """Open the dataset at a local path or fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

    Only metadata is read: no data or video file is opened. The format is detected from the
    files present; today that is LeRobot v3 (``meta/info.json``).
    """
    if isinstance(path_or_url, Dataset):
        return path_or_url
    storage = Storage(path_or_url)
    if is_lerobot(storage):
        return open_lerobot(storage)
    if storage.is_local and not os.path.exists(storage.root):
        raise FormatError(f"{storage.root}: no such file or directory")
    raise FormatError(
        f"{storage.root}: not a dataset framefeed can read (looked for meta/info.json of a "
        "LeRobot dataset)"
    )
