"""The ordering of one room on one process: no I/O, only decisions.

It takes a room's messages from any mix of sources (the broker, in any order,
lost or duplicated; the writer of this process; store reads) and hands them
out strictly by seq, each once. What makes that safe without any timer that
skips: the store assigns seqs in the same transaction that stores the rows
(see :mod:`quartchat.store`), so seqs are committed in order. Whoever has
seen seq ``n`` committed knows that every seq below ``n`` is committed too,
and a store read started after that sees all of them. So:

- a message ahead of the next expected seq is *held*, and the hole below it
  is read from the store (after ``wait`` seconds, to give the broker a chance
  to bring it first);
- a read that covered a range completely is the truth about that range: a
  seq in it that the store does not hold will never exist (a row deleted by
  an operator), so it is passed over, and every server reading the same store
  passes over the same seqs;
- a tail that nobody announced (a lost publish, a deaf subscription, a commit
  whose reply was lost) is found by comparing with the store's counter
  (:meth:`Ordering.hint`), and read the same way.

A read can never act on anything but its own range, so a slow or stale read
is harmless: its rows are facts, and its range was committed before it began.
"""

from __future__ import annotations

import attrs

__all__ = ["Entry", "Ordering", "ReadRange"]


@attrs.frozen
class Entry:
    """One message, ready to send: its seq, stored time (epoch ms) and frame text."""

    seq: int
    sent_ms: int
    frame: str


@attrs.frozen
class ReadRange:
    """Read ``after < seq <= upto`` from the store; ``upto`` None: up to the counter."""

    after: int
    upto: int | None


@attrs.define
class Ordering:
    """Next expected seq, held messages and the one store read in flight."""

    max_held: int
    delivered: int | None = None  # newest seq handed out (or passed over); None until started
    held: dict[int, Entry] = attrs.Factory(dict)
    known: int = 0  # highest seq known to be committed
    counter_due: bool = False  # the store's counter must be read (payloads may be lost)
    gap_since: float | None = None  # when the current hole was first seen
    reading: bool = False
    reading_counter: bool = False  # the read in flight starts with the store's counter
    retry_at: float = 0.0  # a failed read is not retried before this
    skipped: int = 0  # seqs passed over because the store holds nothing for them
    holds: int = 0  # messages that had to wait for a lower seq

    @property
    def started(self) -> bool:
        return self.delivered is not None

    def start(self, last_seq: int, now: float) -> list[Entry]:
        """Live delivery starts after ``last_seq`` (the store's counter when the room started)."""
        self.delivered = last_seq
        self.known = max(self.known, last_seq)
        for seq in [s for s in self.held if s <= last_seq]:
            del self.held[seq]
        return self._drain(now)

    def offer(self, entry: Entry, now: float) -> list[Entry]:
        """A message from any source; returns what may be sent now, in order."""
        seq = entry.seq
        self.known = max(self.known, seq)
        if self.delivered is not None and seq <= self.delivered:
            return []  # a duplicate (broker retry, a read racing the broker)
        if self.delivered is not None and seq == self.delivered + 1:
            self.delivered = seq
            return [entry, *self._drain(now)]
        if seq not in self.held:
            if len(self.held) >= self.max_held:
                # Bounded: drop it. It is in the store, and `known` makes the
                # next read fetch it.
                return []
            self.held[seq] = entry
            self.holds += 1
        if self.gap_since is None:
            self.gap_since = now
        return []

    def hint(self, last_seq: int | None) -> None:
        """The store holds the room up to ``last_seq``; None: find out (payloads may be lost)."""
        if last_seq is None:
            self.counter_due = True
        else:
            self.known = max(self.known, last_seq)

    def _drain(self, now: float) -> list[Entry]:
        assert self.delivered is not None
        out: list[Entry] = []
        held = self.held
        while self.delivered + 1 in held:
            self.delivered += 1
            out.append(held.pop(self.delivered))
        if not held:
            self.gap_since = None
        elif out:
            self.gap_since = now  # a new hole: it gets its own wait
        return out

    def behind(self) -> bool:
        """True while something known to be committed has not been handed out."""
        return self.started and (self.counter_due or self.known > (self.delivered or 0))

    def due(self, now: float, wait: float) -> float | None:
        """Seconds until :meth:`next_read` has something to do (0: now), None: nothing to do."""
        if not self.started or self.reading or not self.behind():
            return None
        at = self.retry_at
        if self.held and not self.counter_due and self.gap_since is not None:
            at = max(at, self.gap_since + wait)
        return max(0.0, at - now)

    def next_read(self, now: float, wait: float) -> ReadRange | None:
        """The store read to start now, if any (then one is in flight until :meth:`read_done`)."""
        delay = self.due(now, wait)
        if delay is None or delay > 0:
            return None
        assert self.delivered is not None
        self.reading = True
        if self.counter_due:
            self.counter_due = False
            self.reading_counter = True
            return ReadRange(self.delivered, None)
        upto = min(self.held) - 1 if self.held else self.known
        return ReadRange(self.delivered, upto)

    def read_done(self, entries: list[Entry], covered: int, target: int, now: float) -> list[Entry]:
        """A read's rows (ascending): all the store holds up to ``covered``;
        ``target``: the committed seq it was reading towards (more is read next)."""
        self.reading = self.reading_counter = False
        self.known = max(self.known, target)
        self.retry_at = 0.0
        out: list[Entry] = []
        for entry in entries:
            out += self.offer(entry, now)
        assert self.delivered is not None
        # Everything up to `covered` was committed before the read began, and the
        # read saw all of it: what it did not see does not exist.
        while self.delivered < covered:
            if self.delivered + 1 in self.held:
                out += self._drain(now)
            else:
                self.delivered += 1
                self.skipped += 1
        out += self._drain(now)
        return out

    def read_failed(self, now: float, backoff: float) -> None:
        """The store did not answer: try again after ``backoff`` s (never skip)."""
        self.reading = False
        self.retry_at = now + backoff
        if self.reading_counter:
            self.reading_counter = False
            self.counter_due = True  # still due
