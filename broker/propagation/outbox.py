"""Putting work in the outbox, always on the caller's transaction (so that the change that implies
it and the rows commit together or not at all)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["enqueue_changes"]


async def enqueue_changes(
    conn: Connection,
    changed: Mapping[str, str],
    *,
    deleted: Sequence[str] = (),
    origin: str | None = None,
) -> None:
    """Record entities home changed (internal ID -> resource type) or deleted, and enqueue their
    syncs toward every push peer but ``origin`` (a change is not sent back where it came from)."""
    await conn.execute(query("record_writes"), list(changed), list(changed.values()), list(deleted))
    await conn.execute(query("enqueue_sync"), [*changed, *deleted], origin)
