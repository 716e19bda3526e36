"""The exception tree: every error framefeed raises on purpose derives from `FramefeedError`."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "FormatError",
    "FrameTimestampError",
    "FramefeedError",
    "StorageError",
]


class FramefeedError(Exception):
    """Base class of every error framefeed raises on purpose."""


class ConfigError(FramefeedError, ValueError):
    """A bad argument or configuration (windows, fields, episode subsets, ...)."""


class FormatError(FramefeedError):
    """A dataset on disk does not match its format (missing file, bad metadata, wrong version)."""


class StorageError(FramefeedError, OSError):
    """A file or URL could not be read."""


class DecodeError(FramefeedError):
    """A frame or value could not be decoded (truncated or corrupt file, bad packet)."""


class FrameTimestampError(DecodeError):
    """A requested timestamp has no frame within tolerance (LeRobot's ``FrameTimestampError``)."""
