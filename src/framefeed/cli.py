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


if __name__ == "__main__":
    raise SystemExit(main())
