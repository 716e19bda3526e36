"""Packet video: batch-planned GOP decoding against per-sample keyframe decoding.

An H.264 camera (GOP 30, B-frames, textured marked frames) is stored as one packet per row over
a few segments. Each batch is 32 targets drawn uniformly (shuffled) from all rows. *Batch* serves
a batch with one `PacketDecoder.decode` call (targets sorted, each GOP decoded once up to its last
target); *per-sample* decodes every target on its own from its keyframe, as a per-sample
``__getitem__`` would. Both use one thread and the same reused codec, and return identical
frames (checked). Warm-up batches are excluded. Prints one JSON record per configuration.

Run: ``flock /tmp/ffbench.lock python benchmarks/packet_video.py``
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from framefeed.synth.packets import encode_packets
from framefeed.video.packets import PacketDecodeConfig, PacketDecoder, PacketRows


def _segments(count: int, length: int, height: int, width: int, gop: int) -> tuple[Any, Any]:
    packets: list[bytes] = []
    starts: list[int] = []
    for episode in range(count):
        clip = encode_packets(
            "h264",
            episode=episode,
            num_frames=length,
            height=height,
            width=width,
            gop=gop,
            bframes=2,
        )
        starts.extend([len(packets)] * length)
        packets.extend(clip.packets)
    return PacketRows.from_list(packets), np.asarray(starts, dtype=np.int64)


def _measure(
    rows: PacketRows, starts: np.ndarray, batches: np.ndarray, *, per_sample: bool, threads: int
) -> tuple[float, int, list[np.ndarray | None]]:
    """Seconds and frames decoded for all batches (after one warm-up batch), and the frames of
    the first measured batch."""
    with PacketDecoder(PacketDecodeConfig(codec="h264", threads=threads)) as decoder:
        first: list[np.ndarray | None] = []
        for k, targets in enumerate(batches):
            if k == 1:
                decoded_before = decoder.frames_decoded
                t0 = time.perf_counter()
            if per_sample:
                out = [decoder.decode(rows, [t], starts[[t]])[0] for t in targets]
            else:
                out = decoder.decode(rows, targets, starts[targets])
            if k == 1:
                first = out
        seconds = time.perf_counter() - t0
        return seconds, decoder.frames_decoded - decoded_before, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segments", default="2,4,8", help="segment counts to measure")
    parser.add_argument("--length", type=int, default=150, help="frames per segment")
    parser.add_argument("--size", default="240x320", help="HxW of the camera")
    parser.add_argument("--gop", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="measured batches (+1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="decode threads of 'batch'")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    for count in (int(c) for c in args.segments.split(",")):
        rows, starts = _segments(count, args.length, height, width, args.gop)
        rng = np.random.default_rng([0, count])
        batches = rng.integers(0, len(rows), size=(args.batches + 1, args.batch))
        batch_s, batch_frames, batch_out = _measure(
            rows, starts, batches, per_sample=False, threads=args.threads
        )
        single_s, single_frames, single_out = _measure(
            rows, starts, batches, per_sample=True, threads=1
        )
        for a, b in zip(batch_out, single_out, strict=True):
            if a is None or b is None or not np.array_equal(a, b):
                raise SystemExit("batch and per-sample decoding returned different frames")
        targets = args.batches * args.batch
        print(
            json.dumps(
                {
                    "bench": "packet_video.h264",
                    "size": f"{height}x{width}",
                    "gop": args.gop,
                    "segments": count,
                    "rows": len(rows),
                    "batch": args.batch,
                    "batches": args.batches,
                    "threads": args.threads,
                    "batch_frames_per_s": round(targets / batch_s, 1),
                    "per_sample_frames_per_s": round(targets / single_s, 1),
                    "speedup": round(single_s / batch_s, 2),
                    "batch_decoded_per_target": round(batch_frames / targets, 2),
                    "per_sample_decoded_per_target": round(single_frames / targets, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
