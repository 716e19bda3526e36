"""What travels between the `Loader`'s stages: items, results, failures and the end marker.

A source item becomes a `Packet` (its sequence number, the source's state after it, then the
fetch result or a `Failure`); the collate stage turns packets into `Output` objects (a value
for the consumer, or a failure to re-raise there as a `PipelineError`). `END` closes a queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FramefeedError

__all__ = [
    "END",
    "End",
    "Failure",
    "Output",
    "Packet",
    "PipelineError",
    "SourceItem",
    "short_repr",
]


class PipelineError(FramefeedError):
    """A pipeline stage failed (or timed out); ``__cause__`` is the original exception."""

    def __init__(self, message: str, *, stage: str, item: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        """The stage that failed, or the stage the consumer was waiting on for a timeout."""
        self.item = item
        """``repr`` of the failing item (truncated), if there was one."""


def short_repr(item: object, limit: int = 80) -> str:
    """``repr(item)``, cut to ``limit`` characters (ending in ``...`` when cut)."""
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Failure:
    """An exception raised by ``stage`` on source item number ``seq``."""

    stage: str
    item: object
    seq: int
    error: BaseException

    def to_error(self) -> PipelineError:
        item = short_repr(self.item)
        error = PipelineError(
            f"stage {self.stage!r} failed on item #{self.seq} {item}: "
            f"{type(self.error).__name__}: {self.error}",
            stage=self.stage,
            item=item,
        )
        error.__cause__ = self.error
        return error


@dataclass
class Packet:
    """One source item on its way from the source to the collate stage."""

    seq: int
    item: object
    source_state: dict[str, Any] | None
    result: object = None
    failure: Failure | None = None


@dataclass
class Output:
    """One output on its way from the collate stage to the consumer."""

    value: object
    label: object  # the source item(s), for error messages
    consumed: int  # source items consumed by this output and those before it (input order)
    source_state: dict[str, Any] | None
    failure: Failure | None = None


class SourceItem:
    """The label of the item a fetch thread is pulling from the source (formatted lazily)."""

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def __repr__(self) -> str:
        return f"<item #{self.seq}>"


class End:
    """End of stream marker."""


END = End()
