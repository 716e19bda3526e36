"""Putting fetched items back in input order and cutting them into chunks of one batch.

The fetch threads finish items in any order; `Reorder` holds the early ones until those before
them arrive (``in_order``), or passes each on at once (completion order), and appends them to
the current chunk. A chunk is cut when it holds ``chunk`` packets that the collate stage keeps
(failures to skip don't count), so every batch is one chunk and any collate thread can collate
it alone; a failure to raise ends its chunk at once, so it reaches the consumer without waiting
for the rest of its batch. A generator fetch's results become one packet each here, so batches
cut across source items.

All of it runs under `Reorder.lock`, which the fetch threads take for each delivered item; the
``room`` condition on the same lock lets the source side wait while too many items are between
the source and the end of the reordering.
"""

from __future__ import annotations

import threading
from typing import Any, cast

from .packets import Packet

__all__ = ["Reorder"]


class Reorder:
    """Input-order reassembly and batch-sized chunking of one `Loader` iteration."""

    def __init__(self, *, in_order: bool, chunk: int, skip: bool, skip_results: int) -> None:
        self.in_order = in_order
        self.chunk = chunk  # packets per chunk (a batch's worth; 1 without batching)
        self.skip = skip  # failures are skipped: they don't count towards a chunk
        self.skip_results = skip_results  # results of item 0 delivered before a resume
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)  # notified whenever an item leaves
        self.room_waiting = 0
        self.released = 0  # items that left the reordering (input order: the next seq)
        self.cut = 0  # chunks handed on so far: the next chunk's number
        self._pending: dict[int, Packet] = {}
        self._ready: list[Packet] = []  # the chunk being filled
        self._ready_kept = 0  # packets in `_ready` that the collate stage keeps
        self._chunks: list[list[Packet]] = []  # cut chunks not yet taken

    def add(self, packet: Packet) -> None:
        """Reorder ``packet``; the chunks it completes wait for `take` (holding `lock`)."""
        if self.in_order:
            pending = self._pending
            pending[packet.seq] = packet
            while self.released in pending:
                self._release(pending.pop(self.released))
        else:
            self._release(packet)
        if self.room_waiting:
            self.room.notify()

    def take(self) -> list[list[Packet]]:
        """The chunks cut since the last call, in order (holding `lock`)."""
        if not self._chunks:
            return []
        chunks, self._chunks = self._chunks, []
        return chunks

    def finish(self) -> list[list[Packet]]:
        """`take`, with the last, incomplete chunk cut too: nothing more will arrive."""
        if self._ready:
            self._cut_chunk()
        return self.take()

    def _release(self, packet: Packet) -> None:
        self.released += 1
        if packet.many and packet.failure is None:
            self._release_many(packet)
        else:
            self._append(packet)

    def _release_many(self, packet: Packet) -> None:
        """One packet per result of a generator fetch, all but the last marked not done."""
        results = cast(list[Any], packet.result)
        first = self.skip_results if packet.seq == 0 else 0
        last = len(results) - 1
        for j, result in enumerate(results):
            self._append(
                Packet(
                    packet.seq,
                    packet.item,
                    packet.source_state,
                    result=result,
                    state_before=packet.state_before,
                    done=j == last,
                    part=first + j + 1,
                )
            )

    def _append(self, packet: Packet) -> None:
        self._ready.append(packet)
        if packet.failure is None:
            self._ready_kept += 1
            if self._ready_kept < self.chunk:
                return
        elif self.skip and packet.failure.skippable:
            return
        self._cut_chunk()

    def _cut_chunk(self) -> None:
        self._chunks.append(self._ready)
        self._ready, self._ready_kept = [], 0
