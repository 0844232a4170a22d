"""Reading the audit log: its entries, its chain verified (the logic is ``broker.auditchain``,
pure; this only streams the rows), and an export a copy can be verified from elsewhere.

The log is written with the named query ``audit`` (actor, action, subject, details); the
database chains each row as it is inserted (migration 0013).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import asyncpg

from broker.auditchain import AuditRow, Break, ChainHead, Checker, timestamp
from broker.db import query
from broker.errors import InvalidValueError

__all__ = [
    "chain_rows",
    "export_line",
    "head_line",
    "list_entries",
    "parse_export",
    "verify_database",
    "verify_lines",
]

BATCH = 1000
"""Rows read per round trip while streaming the log."""


def _row(record: asyncpg.Record) -> AuditRow:
    return AuditRow(
        id=record["id"],
        seq=record["seq"],
        at=record["at"],
        actor=record["actor"],
        action=record["action"],
        subject=record["subject"],
        details_text=record["details_text"],
        prev_hash=record["prev_hash"],
        hash=record["hash"],
    )


async def chain_rows(pool: asyncpg.Pool) -> AsyncIterator[AuditRow | ChainHead]:
    """Every row in chain order, then the chain head, read in one snapshot (a repeatable-read
    transaction), so that rows written meanwhile do not look like a broken tail."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(query("audit_chain_head"))
        assert head is not None, "migration 0013 writes the chain head"
        async for record in conn.cursor(query("audit_chain_rows"), prefetch=BATCH):
            yield _row(record)
        yield ChainHead(head["last_seq"], bytes(head["last_hash"]))


async def verify_database(
    pool: asyncpg.Pool, progress: Callable[[int], None] | None = None
) -> tuple[int, Break | None]:
    """How many rows hold, and the first break (None: intact up to the chain head)."""
    checker = Checker()
    async for item in chain_rows(pool):
        if isinstance(item, ChainHead):
            return checker.position, checker.finish(item)
        if checker.feed(item) is None and progress is not None and checker.position % 10000 == 0:
            progress(checker.position)
    raise AssertionError("chain_rows ends with the head")


def export_line(row: AuditRow) -> str:
    """One JSON Lines record of a row: its fields, the hashes in hex, and ``details_text``
    (what the hash covers; ``details`` is the same parsed)."""
    return json.dumps(
        {
            "id": row.id,
            "seq": row.seq,
            "at": timestamp(row.at),
            "actor": row.actor,
            "action": row.action,
            "subject": row.subject,
            "details": json.loads(row.details_text),
            "details_text": row.details_text,
            "prev_hash": row.prev_hash.hex() if row.prev_hash is not None else None,
            "hash": row.hash.hex() if row.hash is not None else None,
        },
        ensure_ascii=False,
    )


def head_line(head: ChainHead) -> str:
    """The export's last line: the chain head, so that a cut tail shows in the copy too."""
    return json.dumps(
        {"chain_head": {"last_seq": head.last_seq, "last_hash": head.last_hash.hex()}}
    )


def parse_export(lines: Iterable[str]) -> Iterator[AuditRow | ChainHead]:
    """The rows and the head of an export (:func:`export_line`, :func:`head_line`)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if "chain_head" in item:
                head = item["chain_head"]
                yield ChainHead(int(head["last_seq"]), bytes.fromhex(head["last_hash"]))
                continue
            if json.loads(item["details_text"]) != item["details"]:
                raise ValueError("details and details_text differ")
            yield AuditRow(
                id=int(item["id"]),
                seq=item["seq"],
                at=datetime.fromisoformat(item["at"]),
                actor=item["actor"],
                action=item["action"],
                subject=item["subject"],
                details_text=item["details_text"],
                prev_hash=_hex(item["prev_hash"]),
                hash=_hex(item["hash"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidValueError(
                f"line {number} is not a line of `broker audit export` ({exc}): "
                "verify the file the export wrote, unchanged"
            ) from None


def _hex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def verify_lines(lines: Iterable[str]) -> tuple[int, Break | None]:
    """:func:`verify_database` for an export."""
    checker = Checker()
    for item in parse_export(lines):
        if isinstance(item, ChainHead):
            return checker.position, checker.finish(item)
        checker.feed(item)
    raise InvalidValueError(
        "the file ends without the chain head line: it is cut short, or not an export of "
        "`broker audit export`"
    )


async def list_entries(
    pool: asyncpg.Pool,
    *,
    entity: str | None = None,
    domain: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest ``limit`` entries matching, in the order they were written."""
    records = await pool.fetch(query("audit_list"), entity, domain, since, limit)
    return [dict(r) for r in records]
