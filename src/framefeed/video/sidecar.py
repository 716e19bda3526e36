"""Packet indexes kept next to the dataset (``framefeed index``), so readers skip the moov parse.

A sidecar is one ``.npz`` per video file holding the `VideoIndex` arrays and fields. It lives
under ``meta/framefeed-index/`` of the dataset (mirroring the video's relative path) or under
any folder given to `write_sidecars`/`Storage(index_dir=...)`. Writing is resumable: files whose
sidecar exists are skipped. A sidecar that cannot be read is ignored (the index is rebuilt from
the video), never trusted blindly: it must name the same file size as the video.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from fractions import Fraction

import numpy as np
from tqdm import tqdm

from ..errors import StorageError
from ..storage import Storage
from .index import VideoIndex

__all__ = ["DEFAULT_DIR", "load_sidecar", "sidecar_path", "to_bytes", "write_sidecars"]

DEFAULT_DIR = "meta/framefeed-index"
_ARRAYS = ("pts", "dts", "pos", "size", "keyframe")


def sidecar_path(rel: str) -> str:
    """Relative path of the sidecar of video ``rel`` inside an index folder."""
    return f"{rel}.npz"


def to_bytes(index: VideoIndex, file_size: int) -> bytes:
    meta = {
        "codec": index.codec,
        "width": index.width,
        "height": index.height,
        "time_base": [index.time_base.numerator, index.time_base.denominator],
        "file_size": file_size,
        "extradata": index.extradata.hex() if index.extradata else None,
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        **{name: getattr(index, name) for name in _ARRAYS},
    )
    return buf.getvalue()


def from_bytes(data: bytes, path: str, file_size: int) -> VideoIndex | None:
    """The index in ``data``, or None if it is unreadable or describes another file size."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if int(meta["file_size"]) != file_size:
                return None
            arrays = {name: np.asarray(z[name]) for name in _ARRAYS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    extradata = bytes.fromhex(meta["extradata"]) if meta["extradata"] else None
    return VideoIndex(
        path=path,
        codec=str(meta["codec"]),
        extradata=extradata,
        width=int(meta["width"]),
        height=int(meta["height"]),
        time_base=Fraction(*meta["time_base"]),
        pts=arrays["pts"].astype(np.int64),
        dts=arrays["dts"].astype(np.int64),
        pos=arrays["pos"].astype(np.int64),
        size=arrays["size"].astype(np.int64),
        keyframe=arrays["keyframe"].astype(bool),
    )


def load_sidecar(storage: Storage, rel: str, file_size: int) -> VideoIndex | None:
    """The sidecar index of video ``rel`` if one exists and matches the file, else None."""
    # The dataset's own folder is read through its storage (no new filesystem client).
    places: list[tuple[Storage, str]] = []
    if storage.index_dir is not None:
        places.append((Storage(storage.index_dir), sidecar_path(rel)))
    places.append((storage, f"{DEFAULT_DIR}/{sidecar_path(rel)}"))
    for where, name in places:
        try:
            data = where.read_bytes(name)
        except (StorageError, OSError):
            continue
        found = from_bytes(data, storage.url(rel), file_size)
        if found is not None:
            return found
    return None


def write_sidecars(
    storage: Storage,
    videos: Iterable[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> tuple[int, int]:
    """Write a sidecar for each video (skipping those already written); (written, skipped)."""
    from .engine import build_index

    target = os.fspath(out_dir) if out_dir is not None else storage.url(DEFAULT_DIR)
    out = Storage(target, storage_options=None if out_dir is not None else storage.storage_options)
    written = skipped = 0
    todo = sorted(set(videos))
    for rel in tqdm(todo, desc="indexing videos", unit="file", disable=not progress):
        name = sidecar_path(rel)
        if out.exists(name):
            skipped += 1
            continue
        size = storage.size(rel)
        data = to_bytes(build_index(storage, rel, use_sidecar=False), size)
        out.write_bytes(name, data)
        written += 1
    return written, skipped
