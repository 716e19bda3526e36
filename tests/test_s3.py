"""Object storage for real: a loopback S3 server (moto) serving datasets to framefeed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import framefeed
from framefeed.datasets.iterable import IterableDataset

pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
pytest.importorskip("s3fs", reason="s3fs is in the test extra")

from s3server import FlakyProxy, S3Server

pytestmark = pytest.mark.timeout(240)

BUCKET = "framefeed-test"
SECRET = "s3cr3t-never-printed"


@pytest.fixture(scope="module")
def s3(rollover_root: Path) -> Iterator[dict[str, Any]]:
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    server = S3Server()
    server.start()
    proxy = FlakyProxy(server.port, every=3)
    proxy.start()
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for path in rollover_root.rglob("*"):
            if path.is_file():
                key = "ds/" + path.relative_to(rollover_root).as_posix()
                client.upload_file(str(path), BUCKET, key)
        yield {"server": server, "proxy": proxy, "local": rollover_root}
    finally:
        proxy.stop()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _options(endpoint: str, retries: int | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "client_kwargs": {"endpoint_url": endpoint},
        "skip_instance_cache": True,
    }
    if retries is not None:
        # Turn botocore's and s3fs's own retries off so that framefeed's retry layer is the one
        # that absorbs the injected failures.
        opts["config_kwargs"] = {"retries": {"max_attempts": retries, "mode": "standard"}}
    return opts


def _equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def test_metadata_over_s3_matches_local(s3: dict[str, Any]) -> None:
    remote = framefeed.open_dataset(
        f"s3://{BUCKET}/ds", storage_options=_options(s3["server"].endpoint)
    )
    local = framefeed.open_dataset(s3["local"])
    assert remote.num_segments == local.num_segments
    assert np.array_equal(remote.lengths, local.lengths)
    assert list(remote.columns) == list(local.columns)
    assert remote.video_paths.keys() == local.video_paths.keys()


def test_map_samples_over_s3_equal_local_bytes(s3: dict[str, Any]) -> None:
    remote_ds = framefeed.open_dataset(
        f"s3://{BUCKET}/ds", storage_options=_options(s3["server"].endpoint)
    )
    deltas = {"observation.images.top": [-1 / 30, 0.0], "action": [0.0, 1 / 30]}
    remote = framefeed.MapDataset(remote_ds, delta_timestamps=deltas)
    local = framefeed.MapDataset(s3["local"], delta_timestamps=deltas)
    order = np.random.default_rng(0).permutation(len(local))
    for start in range(0, len(order), 16):
        idx = order[start : start + 16].tolist()
        for a, b in zip(remote.__getitems__(idx), local.__getitems__(idx), strict=True):
            _equal(a, b)
    stats = remote.engine.stats
    # Only the packets each run needs are fetched: ranges are exactly the packets decoded.
    assert stats.packet_bytes > 0
    assert stats.bytes_read <= 1.5 * stats.packet_bytes


def test_streaming_over_s3_equals_local(s3: dict[str, Any]) -> None:
    remote_ds = framefeed.open_dataset(
        f"s3://{BUCKET}/ds", storage_options=_options(s3["server"].endpoint)
    )
    remote = IterableDataset(remote_ds, episode_pool_size=2, fetch_size=8, seed=5)
    local = IterableDataset(s3["local"], episode_pool_size=2, fetch_size=8, seed=5)
    for a, b in zip(remote, local, strict=True):
        _equal(a, b)


def test_injected_failures_lose_nothing(s3: dict[str, Any]) -> None:
    proxy: FlakyProxy = s3["proxy"]
    failed_before = proxy.failed
    remote_ds = framefeed.open_dataset(
        f"s3://{BUCKET}/ds",
        storage_options=_options(proxy.endpoint, retries=1),
        retry=framefeed.RetryPolicy(attempts=8, base_delay_s=0.01, max_delay_s=0.1),
    )
    remote_ds.storage.fs.retries = 1  # s3fs's own retry loop off as well
    remote = framefeed.MapDataset(remote_ds)
    local = framefeed.MapDataset(s3["local"])
    for start in range(0, len(local), 8):
        idx = list(range(start, min(start + 8, len(local))))
        for a, b in zip(remote.__getitems__(idx), local.__getitems__(idx), strict=True):
            _equal(a, b)
    assert proxy.failed > failed_before  # failures were injected...
    assert remote_ds.storage.stats["retries"] > 0  # ...and framefeed's retries absorbed them


def test_errors_name_the_url_and_hide_credentials(s3: dict[str, Any]) -> None:
    storage = framefeed.open_dataset(
        f"s3://{BUCKET}/ds", storage_options=_options(s3["server"].endpoint)
    ).storage
    with pytest.raises(framefeed.StorageError) as info:
        storage.read_range("videos/missing.mp4", 0, 100)
    message = str(info.value)
    assert f"s3://{BUCKET}/ds/videos/missing.mp4" in message
    assert "0..100" in message
    assert SECRET not in message
    assert SECRET not in repr(storage)


def test_second_epoch_reads_the_local_cache(s3: dict[str, Any], tmp_path: Path) -> None:
    cache = framefeed.CacheConfig(directory=str(tmp_path / "cache"), max_bytes=64 << 20)
    url, options = f"s3://{BUCKET}/ds", _options(s3["server"].endpoint)
    first = framefeed.open_dataset(url, storage_options=options, cache=cache)
    local = framefeed.MapDataset(s3["local"])
    epoch1 = [framefeed.MapDataset(first).__getitems__(list(range(len(local))))]
    fetched_first = first.storage.stats["bytes_read"]
    assert fetched_first > 0
    # A new dataset object (as in a new process or the next run) with the same cache folder.
    again = framefeed.open_dataset(url, storage_options=options, cache=cache)
    epoch2 = framefeed.MapDataset(again).__getitems__(list(range(len(local))))
    assert again.storage.stats["bytes_read"] == 0  # nothing refetched
    expected = local.__getitems__(list(range(len(local))))
    for a, b, c in zip(epoch1[0], epoch2, expected, strict=True):
        _equal(a, c)
        _equal(b, c)
