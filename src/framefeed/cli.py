"""The ``framefeed`` command: ``inspect`` a dataset, run the ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import FramefeedError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="framefeed", description="Fast PyTorch loading of episodic robot datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="summarise a dataset (path or URL)")
    p_inspect.add_argument("path", help="dataset folder or fsspec URL")
    p_inspect.add_argument(
        "--no-video", action="store_true", help="skip opening video files (no codec/GOP column)"
    )
    p_index = sub.add_parser(
        "index", help="write packet-index sidecars for every video (resumable)"
    )
    p_index.add_argument("path", help="dataset folder or fsspec URL")
    p_index.add_argument(
        "--out", help="folder for the sidecars (default: meta/framefeed-index in the dataset)"
    )
    p_bench = sub.add_parser("bench", help="measure loading throughput, latency and memory")
    p_bench.add_argument("path", help="dataset folder or fsspec URL")
    p_bench.add_argument(
        "--mode",
        choices=["map", "stream"],
        default="map",
        help="map: shuffled MapDataset; stream: IterableDataset with an episode pool (default map)",
    )
    p_bench.add_argument(
        "--loader",
        choices=["torch", "framefeed"],
        default="torch",
        help="torch DataLoader, or framefeed.Loader (map mode; prints the per-stage table)",
    )
    p_bench.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p_bench.add_argument(
        "--loader-threads", type=int, default=1, help="framefeed.Loader fetch threads (default 1)"
    )
    p_bench.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p_bench.add_argument(
        "--delta",
        choices=["none", "chunk"],
        default="none",
        help="time windows: none, or chunk (2 frames per camera and state, 16 future actions)",
    )
    p_bench.add_argument(
        "--pool", type=int, default=16, help="episode pool size (stream; default 16)"
    )
    p_bench.add_argument(
        "--threads", type=int, default=None, help="decode threads (default: the dataset's)"
    )
    p_bench.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    p_bench.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (default 2)")
    p_bench.add_argument("--vs", choices=["naive"], default=None, help="baseline in the same run")
    p_bench.add_argument("--json", action="store_true", help="print JSON records only")
    p_bench.add_argument(
        "--plot",
        metavar="OUT.png",
        help="write throughput over time and a latency histogram (needs framefeed[plot])",
    )
    p_demo = sub.add_parser(
        "demo", help="write a small synthetic dataset and train a toy loop on it"
    )
    p_demo.add_argument("--root", help="where to write the dataset (default: a temporary folder)")
    p_demo.add_argument("--episodes", type=int, default=12, help="episodes to write (default 12)")
    p_demo.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    p_demo.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p_demo.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            from .summary import inspect_dataset

            print(inspect_dataset(args.path, video=not args.no_video))
        elif args.command == "index":
            from .formats import open_dataset
            from .video.sidecar import DEFAULT_DIR, write_sidecars

            ds = open_dataset(args.path)
            videos = [str(p) for key in ds.video_keys for p in ds.video_paths[key].tolist()]
            written, skipped = write_sidecars(ds.storage, videos, args.out)
            where = args.out or ds.storage.url(DEFAULT_DIR)
            print(f"indexed {written} video files, {skipped} already done, into {where}")
        elif args.command == "bench":
            from .bench import BenchConfig, run_bench

            config = BenchConfig(
                path=args.path,
                mode=args.mode,
                loader=args.loader,
                workers=args.workers,
                loader_threads=args.loader_threads,
                batch_size=args.batch_size,
                delta=args.delta,
                pool_size=args.pool,
                decode_threads=args.threads,
                seconds=args.seconds,
                warmup_s=args.warmup,
                vs=args.vs,
                plot=args.plot,
            )
            try:
                records = run_bench(config)
            except ImportError as exc:
                if "pip install" not in str(exc):
                    raise
                # an optional extra is missing; the message gives the install line
                print(f"framefeed: error: {exc}", file=sys.stderr)
                return 1
            _print_bench(records, as_json=args.json)
            if args.plot:
                print(f"framefeed: wrote {args.plot}", file=sys.stderr)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(
                root=args.root,
                episodes=args.episodes,
                epochs=args.epochs,
                batch_size=args.batch_size,
                workers=args.workers,
            )
    except FramefeedError as exc:
        print(f"framefeed: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_bench(records: list[dict[str, object]], *, as_json: bool) -> None:
    import json

    if as_json:
        for record in records:
            print(json.dumps(record))
        return
    for record in records:
        print(f"[{record.get('bench')}]")
        for key, value in record.items():
            if key in ("bench", "stages"):
                continue
            print(f"  {key:<26} {value}")
        stages = record.get("stages")
        if isinstance(stages, list):
            from .bench import format_stage_records

            print("  per-stage table (measured window):")
            for line in format_stage_records(stages).splitlines():
                print(f"    {line}")


if __name__ == "__main__":
    raise SystemExit(main())
