"""The Loader's transfer stage on a GPU: pinned memory, its own CUDA stream, device-side floats.

Batches of uint8 frames (default 32 x 2 cameras x 3 x 480 x 640, about 59 MB each) are made by
the fetch threads and handed to the consumer on the GPU, in three ways:

- ``consumer``: the Loader leaves the batch on the CPU; the training step copies it
  (``.cuda()``) and converts it to float itself, on the default stream (what most loops do);
- ``loader_uint8``: ``Loader(device="cuda", pin_memory=True)``: pinned, copied on the
  transfer stream, still uint8 (the training step converts it on the GPU);
- ``loader_float``: the same with ``frames_dtype=torch.float32``: converted on the GPU, on the
  transfer stream.

Each consumer step runs a small GPU kernel on the batch (a mean) and synchronises, so the
figures include the copy. The record gives batches/s, GB/s of uint8 frames moved and whether
every batch held the values it should (checked on the GPU against the batch number). Without
CUDA it prints a record saying so and exits 0: this is the device check for a machine with a
GPU.

Run: ``python benchmarks/cuda_transfer.py [--batches N] [--batch-size B]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

import framefeed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "cuda_transfer", "skipped": "CUDA is not available"}))
        return
    shape = (2, 3, args.height, args.width)
    frame_bytes = 2 * 3 * args.height * args.width

    def fetch(i: int) -> dict[str, Any]:
        return {"frames": torch.full(shape, i % 251, dtype=torch.uint8), "index": i}

    def run(name: str, make: Callable[[], framefeed.Loader], convert: bool) -> dict[str, Any]:
        ok = True
        first_s = 0.0
        with make() as loader:
            t0 = time.perf_counter()
            for b, batch in enumerate(loader):
                frames = batch["frames"]
                if convert:  # the training step copies the batch
                    frames = frames.cuda()
                if frames.dtype == torch.uint8:  # and converts it, on the default stream
                    frames = frames.float().div_(255)
                means = frames.mean(dim=(1, 2, 3, 4))
                first = b * args.batch_size
                expected = torch.arange(first, first + len(means), device=means.device) % 251
                ok &= bool(torch.allclose(means, expected.float() / 255, atol=1e-4))
                if b == 0:
                    first_s = time.perf_counter() - t0
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        n = args.batches
        return {
            "case": name,
            "batches_per_s": round(n / wall, 2),
            "uint8_gb_per_s": round(n * args.batch_size * frame_bytes / wall / 1e9, 2),
            "first_batch_s": round(first_s, 3),
            "values_ok": ok,
        }

    items = range(args.batches * args.batch_size)
    common: dict[str, Any] = {"fetch": fetch, "batch_size": args.batch_size, "threads": 2}
    records = [
        run("consumer", lambda: framefeed.Loader(items, **common), convert=True),
        run(
            "loader_uint8",
            lambda: framefeed.Loader(items, **common, device="cuda", pin_memory=True),
            convert=False,
        ),
        run(
            "loader_float",
            lambda: framefeed.Loader(
                items, **common, device="cuda", pin_memory=True, frames_dtype=torch.float32
            ),
            convert=False,
        ),
    ]
    print(
        json.dumps(
            {
                "bench": "cuda_transfer",
                "device": torch.cuda.get_device_name(),
                "batch_mb": round(args.batch_size * frame_bytes / 1e6, 1),
                "records": records,
            }
        )
    )


if __name__ == "__main__":
    main()
