"""``framefeed demo``: write a small synthetic LeRobot dataset and train a toy policy on it."""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .datasets import MapDataset
from .errors import ConfigError
from .loader import collate
from .synth import CameraSpec, SynthConfig, write_lerobot_dataset

__all__ = ["run_demo"]


class _ToyPolicy(torch.nn.Module):
    """Predicts a 16-step action chunk from two camera frames and the last two states."""

    def __init__(self, state_dim: int, action_dim: int, horizon: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 8, kernel_size=5, stride=4)
        self.head = torch.nn.Linear(8 + 2 * state_dim, horizon * action_dim)
        self.out_shape = (horizon, action_dim)

    def forward(self, frames: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # frames arrive as uint8 (B, 2, 3, H, W): convert on the compute device, not in the loader.
        x = frames.flatten(1, 2).float().div_(255.0)
        feat = self.conv(x).mean(dim=(2, 3))
        out: torch.Tensor = self.head(torch.cat([feat, state.flatten(1) / 1000.0], dim=1))
        return out.view(-1, *self.out_shape)


def run_demo(
    *,
    root: str | None = None,
    episodes: int = 12,
    epochs: int = 2,
    batch_size: int = 16,
    workers: int = 0,
) -> float:
    """Write the dataset (under ``root`` or a temporary folder), train, return samples/s.

    ``root`` must be new, empty or an earlier demo dataset (which is replaced); any other
    folder is refused, so a mistyped ``--root`` never deletes data.
    """
    for name, value, least in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("workers", workers, 0),
    ):
        if value < least:
            raise ConfigError(f"demo: {name} must be >= {least}, got {value}")
    tmp = None
    if root is not None:
        _check_demo_root(root)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="framefeed-demo-")
        root = os.path.join(tmp.name, "dataset")
    try:
        config = SynthConfig(
            num_episodes=episodes,
            min_length=40,
            max_length=80,
            cameras=(
                CameraSpec(key="observation.images.top", height=96, width=128),
                CameraSpec(key="observation.images.wrist", height=48, width=64),
            ),
        )
        print(f"writing {episodes} synthetic episodes to {root}")
        write_lerobot_dataset(root, config, progress=True, overwrite=True)
        fps = config.fps
        dataset = MapDataset(
            root,
            delta_timestamps={
                "observation.images.top": [-1 / fps, 0.0],
                "observation.state": [-1 / fps, 0.0],
                "action": [i / fps for i in range(16)],
            },
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(0),
        )
        policy = _ToyPolicy(config.state_dim, config.action_dim, 16)
        optim = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        samples, start = 0, time.perf_counter()
        for epoch in range(epochs):
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
            for batch in bar:
                pred = policy(batch["observation.images.top"], batch["observation.state"])
                target = batch["action"] / 1000.0
                mask = ~batch["action_is_pad"]
                loss = ((pred - target) ** 2).mean(dim=-1)[mask].mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                samples += len(batch["index"])
                bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = time.perf_counter() - start
        rate = samples / elapsed
        print(
            f"trained {epochs} epochs: {samples} samples in {elapsed:.1f} s = {rate:.0f} samples/s "
            f"(2 camera frames + 2 states + 16 actions per sample, batch {batch_size}, "
            f"{workers} workers)"
        )
        dataset.close()
        return rate
    finally:
        if tmp is not None:
            tmp.cleanup()


def _check_demo_root(root: str | os.PathLike[str]) -> None:
    """Refuse a ``root`` that holds anything but an earlier synthetic dataset: the demo
    replaces the folder's contents."""
    if not os.path.isdir(root) or not os.listdir(root):
        return  # new or empty (a file there is refused by the writer)
    try:
        with open(os.path.join(root, "meta", "info.json"), encoding="utf-8") as fh:
            robot_type = json.load(fh).get("robot_type")
    except (OSError, ValueError, AttributeError):
        robot_type = None
    if robot_type != "synthetic":
        raise ConfigError(
            f"demo: --root {os.fspath(root)!r} is not empty and is not an earlier demo dataset; "
            "the demo replaces the folder's contents, so give a new or empty folder"
        )
