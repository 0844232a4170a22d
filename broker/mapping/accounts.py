"""The identity map's writes made on a caller's connection: the delivery worker's accounts in
peers (a create begun and finished, a primary or an alias retired) and the entities a change
records. They run on the caller's transaction, so a mapping change and the outbox rows it implies
commit together or not at all; ``MappingStore`` owns the other writes. Every statement that
writes ``id_mappings`` or ``entities`` is in ``sql/queries/mapping.sql``."""

from __future__ import annotations

import base64
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from broker.db import machine_memory, query
from broker.errors import ConflictError
from broker.mapping.fileformat import FIELDS, LineProblem, Record

if TYPE_CHECKING:
    from broker.db import Connection

    Executor: TypeAlias = asyncpg.Pool | Connection
    """A pool (one statement, its own transaction) or a connection (the caller's transaction)."""

__all__ = [
    "begin_create",
    "begin_creates",
    "begin_import",
    "commit_import",
    "finish_create",
    "finish_creates",
    "import_duplicates",
    "import_memory",
    "import_problems",
    "journal_write",
    "link_accounts",
    "merge_problems",
    "push_domains",
    "record_entities",
    "register_entities",
    "reserve_staging_memory",
    "retire_alias",
    "retire_primary",
    "stage_import",
    "take_bulk_path",
]


def import_memory(memory: int) -> dict[str, str]:
    """The memory an import asks for, on a machine with ``memory`` bytes (the embedded server
    shares it): ``work_mem`` for the checks' hash joins (a 32nd, 64 MB to 1 GB),
    ``maintenance_work_mem`` for each index build of the bulk path (an eighth, 256 MB to 2 GB:
    at 10 million rows a build then sorts in memory) and ``temp_buffers`` for the staging table
    (an eighth, 64 MB to 3 GB: 10 million staged lines take about 1.3 GB, which the default 8 MB
    makes a round trip through files for every scan). Each holds for the import only."""

    def share(part: int, low: int, high: int) -> str:
        return f"{min(max(memory // part >> 20, low), high)}MB"

    return {
        "work_mem": share(32, 64, 1024),
        "maintenance_work_mem": share(8, 256, 2048),
        "temp_buffers": share(8, 64, 3072),
    }


IMPORT_MEMORY = import_memory(machine_memory())
BULK_LOCK_TIMEOUT = "5s"
"""How long an import's bulk path waits for the mapping table's locks before it gives up."""
"""Memory for an import's hash joins and aggregates (its transaction only)."""


async def begin_create(db: Executor, internal_id: str, domain: str, handle: str) -> str | None:
    """The pending row of a create of ``internal_id`` in peer ``domain`` with correlation handle
    ``handle``; the handle when the row is new (no earlier attempt can have reached the peer),
    None when one exists already (or the entity is merged or deleted)."""
    fresh: str | None = await db.fetchval(query("begin_create"), internal_id, domain, handle)
    return fresh


async def begin_creates(db: Executor, creates: Sequence[tuple[str, str, str]]) -> set[str]:
    """``begin_create`` for several creates (internal ID, domain, handle) in one statement: the
    handles whose rows are new."""
    if not creates:
        return set()
    internal_ids, domains, handles = (list(column) for column in zip(*creates, strict=True))
    rows = await db.fetch(query("begin_creates"), internal_ids, domains, handles)
    return {row["correlation_handle"] for row in rows}


async def finish_create(conn: Connection, handle: str, domain: str, external_id: str) -> str | None:
    """The create of ``handle`` in peer ``domain`` succeeded as ``external_id``: the entity the
    row belongs to now (a merge may have moved it to its survivor), or None when the create is no
    longer wanted (a merge cancelled it). UniqueViolationError: the account is mapped already to
    another entity."""
    owner: str | None = await conn.fetchval(query("finish_create"), handle, domain, external_id)
    return owner


async def finish_creates(
    conn: Connection, creates: Sequence[tuple[str, str, str]]
) -> list[str | None]:
    """``finish_create`` for several creates (handle, domain, external ID) in one statement: the
    owner of each, in order. UniqueViolationError: one of the accounts is mapped already to
    another entity (nothing of the statement is written then)."""
    if not creates:
        return []
    handles, domains, external_ids = (list(column) for column in zip(*creates, strict=True))
    rows = await conn.fetch(query("finish_creates"), handles, domains, external_ids)
    return [row["owner"] for row in rows]


async def retire_primary(db: Executor, internal_id: str, domain: str, retention: float) -> None:
    """Peer ``domain`` no longer holds the entity: its primary is retired (kept ``retention``
    seconds so late references still resolve), or dropped if its create never finished."""
    await db.execute(query("retire_primary"), internal_id, domain, retention)


async def retire_alias(db: Executor, domain: str, alias: str, retention: float) -> None:
    """Peer ``domain`` deleted the alias ``alias``: retired for ``retention`` seconds, or removed
    at once when the retention is 0."""
    await db.execute(query("retire_alias"), domain, alias, retention)


async def record_entities(
    conn: Connection,
    changed: Sequence[str],
    resource_types: Sequence[str],
    deleted: Sequence[str] = (),
) -> bool:
    """Entities home now has (``changed``, aligned with ``resource_types``) or no longer has
    (``deleted``), recorded before their syncs are enqueued; whether any domain subscribes to
    SETs (if none, the change is not recorded for them)."""
    subscribed: bool = await conn.fetchval(
        query("record_writes"), list(changed), list(resource_types), list(deleted)
    )
    return subscribed


# ---------------------------------------------------------------------- import (broker mappings import)
# The three steps run on one transaction of the caller's: stage, check, commit. Nothing is written
# to id_mappings or entities unless every line passes.


async def reserve_staging_memory(conn: Connection) -> bool:
    """Give this session the staging table's ``temp_buffers``, outside any transaction; False
    when the session has used a temporary table already (PostgreSQL then refuses the change, and
    the import runs with what the session has). The buffers stay the session's: close it after
    the import."""
    try:
        await conn.execute(query("import_temp_buffers"), IMPORT_MEMORY["temp_buffers"])
    except asyncpg.PostgresError:
        return False
    return True


async def begin_import(conn: Connection) -> None:
    """Make the transaction's staging table."""
    await conn.execute(query("import_staging"))
    await conn.execute(query("import_memory"), IMPORT_MEMORY["work_mem"])


async def stage_import(conn: Connection, batches: Iterable[Sequence[Record]]) -> None:
    """Copy the well-formed lines into the staging table with one COPY, each with the random
    correlation handle its row will get (drawn a batch at a time). ``batches`` is read as COPY
    asks for rows: asyncpg sends a buffer whenever one is full, so a lazy ``batches`` is parsed
    while the server stores what came before."""
    await conn.copy_records_to_table(
        "mapping_import",
        records=itertools.chain.from_iterable(map(_with_handles, batches)),
        columns=("line", "internal_id", "domain_id", "external_id", "is_primary", "handle"),
    )


def _with_handles(records: Sequence[Record]) -> list[tuple[object, ...]]:
    handles = ((h,) for h in correlation_handles(len(records)))
    return list(map(tuple.__add__, records, handles))


def correlation_handles(count: int) -> list[str]:
    """``count`` random correlation handles of 22 URL-safe base64 characters (132 bits), as long
    as the ones the store mints, from one read of the random source and one encoding: an
    order of magnitude cheaper per row than a random UUID drawn and encoded in SQL."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(18 * count)).decode()
    return [raw[i : i + 22] for i in range(0, len(raw), 24)]


async def import_problems(
    conn: Connection, limit: int, *, duplicates: bool = True, bulk: bool = False
) -> tuple[list[LineProblem], int]:
    """The staged lines that break an invariant of the mapping table: the first ``limit`` by
    line, and how many there are in all; without ``duplicates``, all but the two duplicate
    checks (see :func:`import_duplicates`). The entities the lines name that exist already are
    share-locked first, so no merge, split or delete changes them before the import commits.
    With ``bulk`` the lines are the rows of the emptied table (:mod:`broker.mapping.bulkload`),
    whose lock covers the entities already."""
    if bulk:
        await conn.execute(query("import_analyze_table"))
    else:
        await conn.execute(query("import_analyze"))
        await conn.fetchval(query("import_lock_entities"))
    records = await conn.fetch(query("import_problems"), limit, bulk)
    found = _found(records)
    if duplicates:
        found = merge_problems(found, await import_duplicates(conn, limit), limit)
    return found


async def import_duplicates(
    conn: Connection, limit: int, line: Callable[[int], int] = int
) -> tuple[list[LineProblem], int]:
    """The staged lines that repeat an external ID in its domain or a primary of an entity in a
    domain: the first ``limit`` by line, and how many there are in all. ``line`` turns the
    staged numbers into the file's (the bulk path numbers its rows)."""
    records = await conn.fetch(query("import_duplicates"), limit)
    total = records[0]["total"] if records else 0
    problems = [
        LineProblem(line(r["line"]), f"{r['head']}{line(r['first'])}{r['tail']}") for r in records
    ]
    return problems, total


def _found(records: Sequence[asyncpg.Record]) -> tuple[list[LineProblem], int]:
    total = records[0]["total"] if records else 0
    return [LineProblem(r["line"], r["message"]) for r in records], total


def merge_problems(
    a: tuple[list[LineProblem], int], b: tuple[list[LineProblem], int], limit: int
) -> tuple[list[LineProblem], int]:
    """Two checks' findings as one: the first ``limit`` by line, and the total."""
    return sorted(a[0] + b[0])[:limit], a[1] + b[1]


async def commit_import(
    conn: Connection,
    *,
    actor: str,
    source: dict[str, Any],
    timings: dict[str, float] | None = None,
) -> tuple[int, int]:
    """Write the checked staged rows, the entities they name that are new, and the audit entry:
    (rows, new entities). ConflictError: a row was written meanwhile by another process.
    ``timings`` gets the seconds each step took (entities, rows)."""
    clock = _Steps(timings if timings is not None else {})
    try:
        entities = await clock.run("entities", conn.execute(query("import_entities")))
        rows = await clock.run("rows", conn.execute(query("import_rows")))
    except (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError) as exc:
        raise ConflictError(
            f"the mapping table changed while importing ({exc.constraint_name}): nothing was "
            "imported; run the import again, and it names the lines that now clash"
        ) from exc
    counts = int(rows.rsplit(" ", 1)[-1]), int(entities.rsplit(" ", 1)[-1])
    details = source | {"rows": counts[0], "entities": counts[1], "columns": list(FIELDS)}
    details["bulk"] = False
    await conn.execute(query("audit"), actor, "mappings_import", None, details)
    return counts


class _Steps:
    """Seconds per named step, into ``timings``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    async def run(self, name: str, step: Awaitable[str]) -> str:
        started = time.monotonic()
        try:
            return await step
        finally:
            self.timings[name] = time.monotonic() - started


async def push_domains(conn: Connection) -> set[str]:
    """The push peers' IDs."""
    return {r["id"] for r in await conn.fetch(query("push_domains"))}


class _NotEmpty(Exception):
    """Rolls the bulk path's savepoint (and its locks) back."""


async def take_bulk_path(conn: Connection) -> bool:
    """Lock the mapping table exclusively if it is empty (for the bulk path of an import); False (nothing held) otherwise, or
    when another session holds it longer than :data:`BULK_LOCK_TIMEOUT`."""
    previous = await conn.fetchval(query("import_lock_timeout"), BULK_LOCK_TIMEOUT)
    try:
        async with conn.transaction():  # a savepoint: its rollback releases the locks
            await conn.execute(query("import_bulk_lock"))
            if not await conn.fetchval(query("import_table_empty")):
                raise _NotEmpty
    except (_NotEmpty, asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
        return False
    finally:
        await conn.fetchval(query("import_lock_timeout"), previous)
    return True


async def link_accounts(
    conn: Connection,
    domain: str,
    links: Sequence[tuple[str, str, str]],
    handles: Sequence[str],
) -> set[str]:
    """Existing accounts of peer ``domain`` that reconciliation found to be entities' (each
    (internal ID, resource type, the peer's ID), with a fresh correlation handle): each becomes
    the entity's peer-assigned primary there. The entities linked; one that got a primary
    meanwhile (a create under way) keeps it and is left out."""
    records = await conn.fetch(
        query("link_accounts"),
        domain,
        [internal_id for internal_id, _, _ in links],
        [external_id for _, _, external_id in links],
        [resource_type for _, resource_type, _ in links],
        list(handles),
    )
    return {r["internal_id"] for r in records}


async def register_entities(
    conn: Connection, internal_ids: Sequence[str], resource_types: Sequence[str]
) -> None:
    """Entities home has (``internal_ids``, aligned with ``resource_types``), recorded before
    their syncs are enqueued; ones recorded already are left as they are."""
    await conn.execute(query("register_entities"), list(internal_ids), list(resource_types))


async def journal_write(db: Executor, *args: object) -> bool:
    """A home write recorded in one statement (``journal_write``: the entities, their history
    and the syncs toward the peers; see :func:`broker.propagation.journal.record_alone`); False,
    with nothing written, when a domain subscribes to SETs."""
    done: bool = await db.fetchval(query("journal_write"), *args)
    return done
