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
    "skip_delivered",
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


def skip_delivered(results: list[Any], seq: int, skip_results: int) -> list[Any]:
    """``results`` of source item ``seq``, less the ``skip_results`` a resume already delivered.

    Only the first item of a resumed iteration (``seq == 0``) can have been partly delivered.
    """
    return results[skip_results:] if seq == 0 and skip_results else results


@dataclass
class Failure:
    """An exception raised by ``stage`` on source item number ``seq``."""

    stage: str
    item: object
    seq: int
    error: BaseException

    @property
    def skippable(self) -> bool:
        """Whether ``on_error="skip"`` may drop it: not a failing source, which ends the data.

        Skipping a source failure would end the epoch early without a word.
        """
        return self.stage != "source"

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
    """One source item on its way from the source to the collate stage.

    A fetch that is a generator gives several results for one item: the item's packet then
    becomes one packet per result when it leaves the reordering, and all but the last of them
    have ``done=False`` and ``part`` = the results of the item delivered with this one.
    """

    seq: int
    item: object
    source_state: dict[str, Any] | None
    """The source's state after this item (None for a source without state)."""
    result: object = None
    failure: Failure | None = None
    state_before: dict[str, Any] | None = None
    """The source's state before this item: where a resume in the middle of it starts."""
    many: bool = False
    """``result`` is the list of a generator fetch's results."""
    done: bool = True
    """This packet finishes its source item."""
    part: int = 0
    """For ``done=False``: results of the item delivered up to and including this one."""

    def output(self, value: object, label: object, failure: Failure | None = None) -> Output:
        """An output that ends with this packet, with the progress it stands for."""
        if self.done:
            return Output(value, label, self.seq + 1, self.source_state, failure)
        return Output(value, label, self.seq, self.state_before, failure, partial=self.part)


@dataclass
class Output:
    """One output on its way from the collate stage to the consumer."""

    value: object
    label: object  # the source item(s), for error messages
    consumed: int  # source items consumed by this output and those before it (input order)
    source_state: dict[str, Any] | None
    failure: Failure | None = None
    partial: int = 0  # results of the next item already delivered (a generator fetch)

    @property
    def seq(self) -> int:
        """The source item this output ends with: the last consumed one, or the partial one."""
        return self.consumed if self.partial else self.consumed - 1


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
