"""The bulk path of ``broker mappings import``: a large file into an EMPTY mapping table.

PostgreSQL's "Populating a Database", taken as far as it goes. The table is locked against every
reader and writer and truncated in the import's transaction (with ``wal_level = minimal``, the
embedded server's, nothing written to its new files goes to the write-ahead log); its keys and
indexes are dropped; the file's rows are copied straight into it with one COPY, parsed while the
server stores; the checks read the table itself through a temporary view named like the staging
table of the ordinary path (``mapping_import``: the same named checks run on both paths); the
new entities are recorded; and the keys and indexes are built again, by sorting. The unique
builds do the two duplicate checks. All of it is one transaction: a refusal leaves the table and
its definition as they were.

The view's ``line`` is the row's ``id``, 1, 2, ... in the order COPY stored the rows
(``TRUNCATE ... RESTART IDENTITY``); :class:`RowLines` turns it back into the file's line.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from broker.db import query
from broker.mapping.accounts import IMPORT_MEMORY, correlation_handles
from broker.mapping.fileformat import FIELDS, LineProblem, Record

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["RowLines", "begin", "finish", "load"]

COLUMNS = (
    "internal_id",
    "domain_id",
    "external_id",
    "is_primary",
    "origin",
    "state",
    "correlation_handle",
)


class RowLines:
    """Which line of the file each copied row came from: row ``n`` (from 1) is line
    ``n + shift`` for the last segment starting at or before it. A file whose every line is a
    row (after its header) is one segment; each blank, bad or multi-line record starts another."""

    def __init__(self) -> None:
        self.rows = 0
        self._starts: list[int] = []
        self._shifts: list[int] = []

    def add(self, records: Sequence[Record]) -> None:
        """Note a batch of rows, in the order they are copied."""
        first = self.rows + 1
        if not self._shifts or records[0].line - first != self._shifts[-1]:
            self._open(first, records[0].line)
        if records[-1].line - records[0].line != len(records) - 1:  # a gap inside the batch
            for n, record in enumerate(records, start=first):
                if record.line - n != self._shifts[-1]:
                    self._open(n, record.line)
        self.rows += len(records)

    def _open(self, row: int, line: int) -> None:
        self._starts.append(row)
        self._shifts.append(line - row)

    def line(self, row: int) -> int:
        return row + self._shifts[bisect.bisect_right(self._starts, row) - 1]

    def lines(self, found: tuple[list[LineProblem], int]) -> tuple[list[LineProblem], int]:
        """Checks' findings, numbered by row, numbered by line."""
        problems, total = found
        return [LineProblem(self.line(p.line), p.message) for p in problems], total


async def begin(conn: Connection) -> None:
    """After :func:`broker.mapping.accounts.take_bulk_path`: the table truncated, its keys and
    indexes dropped (their definitions kept), the checks' view and memory set."""
    await conn.execute(query("import_truncate"))
    await conn.execute(query("import_shed_indexes"))
    await conn.execute(query("import_bulk_view"))
    await conn.execute(query("import_memory"), IMPORT_MEMORY["work_mem"])


async def load(conn: Connection, batches: Iterable[Sequence[Record]], push: set[str]) -> int:
    """Copy the well-formed lines into the mapping table with one COPY (read lazily: parsed as
    COPY asks for rows), each as :data:`broker.mapping.accounts` would write it: a push peer's
    IDs are the ones it assigned (origin peer), any other domain's behave as minted; a
    non-primary line is an alias kept for good; each row a fresh correlation handle. A line of
    an unknown domain is copied as it is, for the checks to name. How many rows."""

    origin = {domain: "peer" for domain in push}
    state = {True: "active", False: "retired"}

    def rows(records: Sequence[Record]) -> list[tuple[Any, ...]]:
        handles = correlation_handles(len(records))
        return [
            (r[1], r[2], r[3], r[4], origin.get(r[2], "minted"), state[r[4]], handle)
            for r, handle in zip(records, handles, strict=True)
        ]

    status = await conn.copy_records_to_table(
        "id_mappings",
        records=itertools.chain.from_iterable(map(rows, batches)),
        columns=COLUMNS,
    )
    return int(status.rsplit(" ", 1)[-1])


async def finish(
    conn: Connection, rows: int, *, actor: str, source: dict[str, Any], timings: dict[str, float]
) -> int | None:
    """The new entities recorded, every key and index built again, the view dropped and the
    audit entry written: how many new entities. None when a unique build failed (a duplicate
    in the file): its savepoint is rolled back, the rows stay for the duplicate check to name,
    and the caller refuses the file."""
    started = time.monotonic()
    entities = int((await conn.execute(query("import_entities"))).rsplit(" ", 1)[-1])
    timings["entities"] = time.monotonic() - started
    await conn.execute(query("import_build_memory"), IMPORT_MEMORY["maintenance_work_mem"])
    started = time.monotonic()
    try:
        async with conn.transaction():  # a savepoint: a failed build leaves the rows to check
            await conn.execute(query("import_build_indexes"))
    except asyncpg.UniqueViolationError:
        return None
    finally:
        timings["indexes"] = time.monotonic() - started
    await conn.execute(query("import_bulk_view_drop"))
    details = source | {"rows": rows, "entities": entities, "columns": list(FIELDS), "bulk": True}
    await conn.execute(query("audit"), actor, "mappings_import", None, details)
    return entities
