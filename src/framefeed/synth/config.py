"""Configuration of the synthetic LeRobot v3 writer: cameras and dataset shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from framefeed.errors import ConfigError

__all__ = ["CODECS", "DEFAULT_FEATURE_NAMES", "CameraSpec", "SynthConfig"]

CODECS: dict[str, str] = {"av1": "libsvtav1", "h264": "libx264"}
"""Codec names accepted by :class:`CameraSpec` and the PyAV encoder each one uses."""

DEFAULT_FEATURE_NAMES: tuple[str, ...] = (
    "timestamp",
    "frame_index",
    "episode_index",
    "index",
    "task_index",
)
"""LeRobot's five default features, always last in ``info.json["features"]``."""

_NUMERIC_FEATURE_NAMES = ("observation.state", "action", "next.reward", "next.done")

MIN_VIDEO_HEIGHT = 32
"""Smallest camera height: 4 marker rows of 8 pixels."""
MIN_VIDEO_WIDTH = 48
"""Smallest camera width: 6 marker columns of 8 pixels."""
MAX_EPISODES = 1024
"""The frame marker holds 10 bits of episode index."""
MAX_LENGTH = 4096
"""The frame marker holds 12 bits of frame index."""
MAX_VECTOR_DIM = 128
"""Largest state/action size for which ``e*1000 + i + j/8`` stays exact in float32."""


@dataclass(frozen=True, kw_only=True)
class CameraSpec:
    """One video feature (camera) of a synthetic dataset and how its mp4 files are encoded."""

    key: str
    """Feature name, for example ``"observation.images.top"``; must not contain ``/``."""
    height: int = 48
    """Frame height in pixels: even and at least 32."""
    width: int = 64
    """Frame width in pixels: even and at least 48."""
    codec: str = "av1"
    """``"av1"`` (encoded with libsvtav1, LeRobot's default) or ``"h264"`` (libx264)."""
    gop: int = 2
    """Keyframe interval (LeRobot's default is 2). Every episode also starts on a keyframe."""
    crf: int = 30
    """Constant rate factor (LeRobot's default is 30)."""
    bframes: int = 0
    """Consecutive B-frames for h264 (libx264 ``bf``); ignored for av1."""
    preset: int = 10
    """SVT-AV1 preset for av1; ignored for h264.

    LeRobot asks for preset 12, which the SVT-AV1 in LeRobot's PyAV 15.1 wheel maps to M10. The
    SVT-AV1 in PyAV 18 maps 12 to M11, which leaves stale blocks in some inter frames of flat
    content (a documented M11 trade-off) and so corrupts the frame markers. Preset 10 is the
    encoder LeRobot's default actually ran.
    """

    def __post_init__(self) -> None:
        where = f"CameraSpec(key={self.key!r})"
        if not self.key or "/" in self.key:
            raise ConfigError(f"{where}: the key must be non-empty and must not contain '/'")
        if self.codec not in CODECS:
            raise ConfigError(f"{where}: codec {self.codec!r} is not one of {sorted(CODECS)}")
        if self.height < MIN_VIDEO_HEIGHT or self.width < MIN_VIDEO_WIDTH:
            raise ConfigError(
                f"{where}: {self.height}x{self.width} is too small; the frame marker needs at "
                f"least {MIN_VIDEO_HEIGHT}x{MIN_VIDEO_WIDTH} pixels (height x width)"
            )
        if self.height % 2 or self.width % 2:
            raise ConfigError(
                f"{where}: yuv420p needs an even size, got {self.height}x{self.width}"
            )
        if self.gop < 1:
            raise ConfigError(f"{where}: gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 63:
            raise ConfigError(f"{where}: crf must be in 0..63, got {self.crf}")
        if self.bframes < 0:
            raise ConfigError(f"{where}: bframes must be >= 0, got {self.bframes}")
        if not 0 <= self.preset <= 13:
            raise ConfigError(f"{where}: preset must be in 0..13, got {self.preset}")


def _default_cameras() -> tuple[CameraSpec, ...]:
    return (
        CameraSpec(key="observation.images.top"),
        CameraSpec(key="observation.images.wrist", height=32, width=48),
    )


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Shape and content of a synthetic LeRobot v3 dataset. The same config gives the same bytes.

    Every value is a function of (episode ``e``, frame ``i``): ``observation.state[j] = e*1000 +
    i + j/8``, ``action[j] = -(e*1000 + i) - j/8``, ``next.reward = i/4``, ``next.done = (i ==
    length-1)``, and every camera and image frame carries a marker that
    :func:`framefeed.synth.read_marker` decodes back to ``(e, i)``.
    """

    num_episodes: int = 4
    """Number of episodes, 1..1024."""
    min_length: int = 12
    """Shortest episode; lengths are drawn uniformly in [min_length, max_length] from ``seed``."""
    max_length: int = 24
    """Longest episode, at most 4096 frames."""
    fps: int = 30
    """Frames per second of every episode and video."""
    cameras: tuple[CameraSpec, ...] = field(default_factory=_default_cameras)
    """Video features, in ``info.json`` order. Empty for a dataset without videos."""
    image_keys: tuple[str, ...] = ()
    """Image features (PNG bytes inside the data parquet), 48x64, same marker content."""
    state_dim: int = 6
    """Size of ``observation.state``."""
    action_dim: int = 6
    """Size of ``action``."""
    tasks: tuple[str, ...] = ("pick up the cube", "push the block")
    """Task strings; episode ``e`` has the single task ``tasks[e % len(tasks)]``."""
    texture: bool = False
    """Add a seeded, moving, detailed texture so videos are realistic to encode and decode."""
    seed: int = 0
    """Seed of the episode lengths and the texture (>= 0)."""
    data_files_size_in_mb: float = 100.0
    """Roll over to a new data parquet file at this size (LeRobot's rule, see the format spec)."""
    video_files_size_in_mb: float = 200.0
    """Roll over to a new mp4 file at this size, independently for each camera."""
    chunks_size: int = 1000
    """Files per chunk directory."""
    robot_type: str | None = "synthetic"
    """``info.json["robot_type"]``."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_episodes <= MAX_EPISODES:
            raise ConfigError(f"num_episodes must be in 1..{MAX_EPISODES}, got {self.num_episodes}")
        if not 1 <= self.min_length <= self.max_length <= MAX_LENGTH:
            raise ConfigError(
                f"episode lengths need 1 <= min_length <= max_length <= {MAX_LENGTH}, got "
                f"min_length={self.min_length}, max_length={self.max_length}"
            )
        if self.fps < 1:
            raise ConfigError(f"fps must be a positive integer, got {self.fps}")
        for name, dim in (("state_dim", self.state_dim), ("action_dim", self.action_dim)):
            if not 1 <= dim <= MAX_VECTOR_DIM:
                raise ConfigError(f"{name} must be in 1..{MAX_VECTOR_DIM}, got {dim}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be non-empty and distinct, got {self.tasks!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.data_files_size_in_mb <= 0 or self.video_files_size_in_mb <= 0:
            raise ConfigError(
                "data_files_size_in_mb and video_files_size_in_mb must be > 0, got "
                f"{self.data_files_size_in_mb} and {self.video_files_size_in_mb}"
            )
        if self.chunks_size < 1:
            raise ConfigError(f"chunks_size must be >= 1, got {self.chunks_size}")
        names = [camera.key for camera in self.cameras] + list(self.image_keys)
        reserved = set(_NUMERIC_FEATURE_NAMES) | set(DEFAULT_FEATURE_NAMES)
        for name in names:
            if not name or "/" in name:
                raise ConfigError(f"feature name {name!r} must be non-empty without '/'")
            if name in reserved:
                raise ConfigError(f"feature name {name!r} is reserved for a numeric feature")
        if len(set(names)) != len(names):
            raise ConfigError(f"camera and image keys must be distinct, got {names}")
