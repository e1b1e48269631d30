"""Responses leave the decode loop: a thread of their own sends them, merging what queued up.

In Triton's Python backend a response's `send` is a blocking round trip to the server process;
sent on the scheduler's thread, every step of a batch of n streaming rows waited for n of them
(under AIPerf at concurrency 16 on ONNX Runtime, sending took more of that thread than the
decode step itself: docs/design.md §6.3). So the model's `Reply` only records each update
(`Outgoing`: the text, tokens and log probs the update adds, and the sequence's counters,
timings and flags as they are after it) and hands it to a `ResponseQueue`; its thread sends
them in order.

When updates queue up faster than they are sent, the queued streaming updates of one sequence
are merged (`merge`) into one response that carries all their text, tokens and log probs and
the state after the last of them: a client gets the same tokens, in the same order, in fewer
and larger responses, and the final flag still comes with the reply's last response. An error
response is never merged; nothing of its reply is sent after it.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Outgoing:
    """One update of one returned sequence of a reply, or the reply's error (`error` set)."""

    reply: object
    """The request's reply (identity only: updates of one reply and sequence merge)."""
    index: int = 0
    """The returned sequence (`sequence_index`)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    """Everything else of the response as it is after this update (finish reason, counters,
    timings, cumulative log prob): a later update's replaces an earlier one's."""
    final: bool = False
    """The reply's last response (Triton's FINAL flag)."""
    error: object = None
    """An error response to send instead (ends the reply)."""

    @property
    def key(self) -> tuple[int, int]:
        return id(self.reply), self.index


def merge(earlier: Outgoing, later: Outgoing) -> Outgoing:
    """One update with the text, tokens and log probs of both, in order, and `later`'s state."""
    return dataclasses.replace(later, text=earlier.text + later.text, token_ids=earlier.token_ids + later.token_ids,
                               log_probs=earlier.log_probs + later.log_probs)


def coalesce(pending: list[Outgoing]) -> list[Outgoing]:
    """`pending` in order, each sequence's updates merged into one at the place of its last (so a
    reply's final update stays its last); errors are kept as they are and close their reply."""
    out: list[Outgoing | None] = []
    where: dict[tuple[int, int], int] = {}
    closed: set[int] = set()
    for item in pending:
        if id(item.reply) in closed:
            continue
        if item.error is not None:
            closed.add(id(item.reply))
            out.append(item)
            continue
        previous = where.pop(item.key, None)
        if previous is not None:
            item = merge(out[previous], item)
            out[previous] = None
        where[item.key] = len(out)
        out.append(item)
        if item.final:
            closed.add(id(item.reply))
    return [item for item in out if item is not None]


class ResponseQueue:
    """Sends `Outgoing` updates on a thread of its own with `send(item)`, merged when they queue up.
    `send` raising marks nothing here: the caller's `send` handles its own failures."""

    _CLOSE = object()

    def __init__(self, send: Callable[[Outgoing], None], name: str = "tidar-responses"):
        self._send = send
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self.sent = 0
        """Responses sent (after merging)."""
        self.queued = 0
        """Updates queued."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Outgoing) -> None:
        self.queued += 1  # a statistic (the decode thread puts; a request refused at submission rarely does)
        self._pending.put(item)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._pending.put(self._CLOSE)
        self._thread.join(timeout)

    def _run(self) -> None:
        closing = False
        while not closing:
            batch = [self._pending.get()]  # wait for one, then take all that queued behind it
            while True:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            closing = any(item is self._CLOSE for item in batch)
            for item in coalesce([item for item in batch if item is not self._CLOSE]):
                try:
                    self._send(item)
                except Exception:  # a sender failing must not stop the others' responses
                    pass
                self.sent += 1
