"""The audit log's hash chain, checked: pure functions over rows, no I/O.

Each ``audit_log`` row carries ``hash = sha256(prev_hash || canonical(row))``, where ``prev_hash``
is the hash of the row before it in ``seq`` order (32 zero bytes for the first), and the chain
head keeps the last ``seq`` and hash. The database computes the hashes (migration 0013,
``broker_audit_canonical``); :func:`canonical` is the same text, so that a copy of the log (an
export) can be verified anywhere. An edited row no longer matches its hash, a deleted or moved
row breaks the positions and the links, and a deleted tail no longer reaches the head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "GENESIS",
    "AuditRow",
    "Break",
    "ChainHead",
    "Checker",
    "canonical",
    "digest",
    "timestamp",
    "verify",
]

GENESIS = bytes(32)
"""The ``prev_hash`` of the first row."""


@dataclass(frozen=True)
class AuditRow:
    """One row of ``audit_log`` as stored."""

    id: int
    seq: int | None
    """Position in the chain, from 1 (None: written past the chain's trigger)."""
    at: datetime
    actor: str
    action: str
    subject: str | None
    details_text: str
    """``details`` as PostgreSQL prints the jsonb (``details::text``): what the hash covers."""
    prev_hash: bytes | None
    hash: bytes | None


@dataclass(frozen=True)
class ChainHead:
    """The chain head: the last position and its hash."""

    last_seq: int
    last_hash: bytes


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold."""

    row_id: int | None
    """The first broken row (None: the rows are intact but the tail is gone)."""
    reason: str


def _field(value: str | None) -> str:
    return "-" if value is None else f"{len(value)}:{value}"


def timestamp(at: datetime) -> str:
    """``at`` in UTC to the microsecond, as the canonical text writes it."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(row: AuditRow, seq: int) -> bytes:
    """The bytes the row's hash covers (``broker_audit_canonical`` in migration 0013)."""
    text = "audit/1" + "".join(
        _field(v)
        for v in (
            str(row.id),
            str(seq),
            timestamp(row.at),
            row.actor,
            row.action,
            row.subject,
            row.details_text,
        )
    )
    return text.encode("utf-8")


def digest(prev_hash: bytes, row: AuditRow, seq: int) -> bytes:
    """The hash a row at position ``seq`` after ``prev_hash`` must carry."""
    return hashlib.sha256(prev_hash + canonical(row, seq)).digest()


class Checker:
    """Checks rows one at a time, in ``seq`` order, so that a reader can stream a long log."""

    def __init__(self) -> None:
        self.previous = GENESIS
        self.position = 0
        self.broken: Break | None = None

    def feed(self, row: AuditRow) -> Break | None:
        """The break this row shows (and every later feed returns it too), or None."""
        if self.broken is not None:
            return self.broken
        problem = _row_problem(row, self.position + 1, self.previous)
        if problem is not None:
            self.broken = Break(row.id, problem)
            return self.broken
        assert row.hash is not None
        self.position += 1
        self.previous = row.hash
        return None

    def finish(self, head: ChainHead) -> Break | None:
        """The first break, including a tail that no longer reaches the head; None: intact."""
        if self.broken is not None:
            return self.broken
        if (self.position, self.previous) == (head.last_seq, head.last_hash):
            return None
        if self.position < head.last_seq:
            reason = (
                f"the log ends at position {self.position} but the chain head says "
                f"{head.last_seq}: the last {head.last_seq - self.position} row(s) were deleted"
            )
        else:
            reason = (
                f"the log's last row (position {self.position}) is not the chain head's "
                f"(position {head.last_seq}): the head or the tail was rewritten"
            )
        self.broken = Break(None, reason)
        return self.broken


def verify(rows: Iterable[AuditRow], head: ChainHead) -> tuple[int, Break | None]:
    """How many rows hold, and the first break (None: the whole chain holds up to the head).

    ``rows`` in ``seq`` order, as the reader gives them.
    """
    checker = Checker()
    for row in rows:
        if checker.feed(row) is not None:
            break
    return checker.position, checker.finish(head)


def _row_problem(row: AuditRow, position: int, previous: bytes) -> str | None:
    if row.hash is None or row.prev_hash is None or row.seq is None:
        return "it has no hash: it was written past the chain's trigger"
    if row.seq != position:
        if row.seq > position:
            return (
                f"it is at position {row.seq} where {position} was due: "
                f"{row.seq - position} row(s) before it were deleted, or it was moved"
            )
        return f"it is at position {row.seq} where {position} was due: rows were reordered"
    if row.prev_hash != previous:
        return "its link to the row before does not match: a row before it was changed or moved"
    if row.hash != digest(previous, row, row.seq):
        return "its contents do not match its hash: it was edited"
    return None
