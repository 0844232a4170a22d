"""Loading an existing mapping from a file, all or nothing, and writing the mapping table out as
one (``broker mappings import`` and ``export``).

An import streams the file: its well-formed lines go into a staging table with one COPY, fed a
batch at a time (the server stores one batch while the next is parsed);
the set-based checks of :func:`broker.mapping.accounts.import_problems` then find every line
that breaks an invariant; only when none does is the table written, with one INSERT ... SELECT,
in the same transaction. An export reads through a server-side cursor, so neither holds the
file in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import asyncpg

from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection
from broker.errors import ConflictError, InvalidValueError
from broker.mapping import accounts
from broker.mapping.fileformat import (
    FileFormat,
    LineProblem,
    Record,
    detect_format,
    format_header,
    format_row,
    parse_lines,
)

__all__ = ["ImportReport", "export_mappings", "import_mappings"]

BATCH = 50_000
"""Lines copied into the staging table at a time (and between two progress reports)."""
BULK_ROWS = 100_000
"""From this many rows, an import into an empty mapping table takes the bulk path (indexes and
foreign keys dropped, and built again after the load: see
:func:`broker.mapping.accounts.commit_import`)."""


@dataclass
class ImportReport:
    """What an import did, or why it did nothing."""

    file_format: FileFormat
    lines: int = 0
    """Lines read (the last line's number)."""
    rows: int = 0
    """Mapping rows written (0 when refused)."""
    entities: int = 0
    """Entities the broker had not seen before."""
    problems: list[LineProblem] = field(default_factory=list)
    """The first bad lines, by line number."""
    problem_count: int = 0
    """How many bad lines there are in all."""
    seconds: float = 0.0
    staged: int = 0
    """Well-formed lines copied into the staging table."""
    bulk: bool = False
    """Whether the rows were loaded by the bulk path."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading and staging the file, checking it, and writing the table."""
    write_steps: dict[str, float] = field(default_factory=dict)
    """Seconds the write's steps took: the new entities, the rows, and (bulk path) the indexes
    and foreign keys built again."""

    @property
    def refused(self) -> bool:
        return self.problem_count > 0


class _Refused(Exception):
    """Rolls the import's transaction back."""


async def import_mappings(
    pool: asyncpg.Pool,
    path: Path,
    *,
    actor: str,
    limit: int = 100,
    progress: Callable[[int], None] = lambda lines: None,
    batch: int = BATCH,
    bulk_rows: int = BULK_ROWS,
) -> ImportReport:
    """Load the mapping file ``path`` (CSV or JSON Lines) all or nothing; the report names the
    first ``limit`` bad lines, if any, and then nothing was written."""
    started = time.monotonic()
    try:
        with path.open(encoding="utf-8", newline="") as file:
            report = ImportReport(detect_format(path, file.read(4096)))
            file.seek(0)
            source = {"file": path.name, "format": report.file_format.value}
            async with pool.acquire() as conn:
                reserved = await accounts.reserve_staging_memory(conn)
                try:
                    steps = _Import(conn, report, limit, actor, source, progress)
                    await steps.run(parse_lines(file, report.file_format), batch, bulk_rows)
                finally:
                    if reserved:  # the session's staging buffers go back: it is closed
                        await pool.expire_connections()
    except UnicodeDecodeError as exc:
        raise InvalidValueError(
            f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8 and import it again"
        ) from exc
    except FileNotFoundError as exc:
        raise InvalidValueError(f"there is no file {path}: check the path") from exc
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Import:
    """One import's transaction: stage, check, write (or refuse)."""

    conn: Connection
    report: ImportReport
    limit: int
    actor: str
    source: dict[str, str]
    progress: Callable[[int], None]

    async def run(self, items: Iterator[Record | LineProblem], batch: int, bulk_rows: int) -> None:
        started = time.monotonic()
        try:
            async with self.conn.transaction():
                await accounts.begin_import(self.conn)
                await _stage(self.conn, items, self.report, self.limit, batch, self.progress)
                self.report.phases["stage"] = time.monotonic() - started
                await _check_and_write(
                    self.conn,
                    self.report,
                    self.limit,
                    self.actor,
                    self.source,
                    large=self.report.staged >= bulk_rows,
                )
        except _Refused:
            pass


async def _check_and_write(
    conn: Connection,
    report: ImportReport,
    limit: int,
    actor: str,
    source: dict[str, str],
    *,
    large: bool,
) -> None:
    """Check the staged lines and, if none is bad, write them; _Refused otherwise. A large file
    into an empty table takes the bulk path, whose unique index builds do the duplicate checks:
    only when one fails are the duplicates looked for, to name them."""
    checked = time.monotonic()
    bulk = large and await accounts.take_bulk_path(conn)
    found = await accounts.import_problems(conn, limit, duplicates=not bulk)
    found = accounts.merge_problems((report.problems, report.problem_count), found, limit)
    report.problems, report.problem_count = found
    report.phases["check"] = time.monotonic() - checked
    written = None
    if not report.refused:
        written = await accounts.commit_import(
            conn, actor=actor, source=source, bulk=bulk, timings=report.write_steps
        )
    if written is None:  # refused, or the bulk path's unique index builds found duplicates
        if bulk:
            duplicates = await accounts.import_duplicates(conn, limit)
            report.problems, report.problem_count = accounts.merge_problems(
                (report.problems, report.problem_count), duplicates, limit
            )
        if not report.refused:  # a unique violation no duplicate explains: a clash of handles
            raise ConflictError("two rows drew the same correlation handle: import the file again")
        raise _Refused
    report.rows, report.entities = written
    report.bulk = bulk
    report.phases["write"] = time.monotonic() - checked - report.phases["check"]


async def _stage(
    conn: Connection,
    items: Iterator[Record | LineProblem],
    report: ImportReport,
    limit: int,
    batch: int,
    progress: Callable[[int], None],
) -> None:
    """Copy the well-formed lines into the staging table, with one COPY fed a batch at a time;
    count the others. The batches are parsed as COPY asks for rows, so the server stores one
    buffer while the next is parsed here."""
    await accounts.stage_import(conn, _batches(items, report, limit, batch, progress))
    progress(report.lines)


def _batches(
    items: Iterator[Record | LineProblem],
    report: ImportReport,
    limit: int,
    batch: int,
    progress: Callable[[int], None],
) -> Iterator[list[Record]]:
    """The well-formed lines, ``batch`` at a time; each bad one counted (and the first ``limit``
    kept) in ``report``."""
    pending: list[Record] = []
    for item in items:
        if isinstance(item, LineProblem):
            report.problem_count += 1
            if len(report.problems) < limit:
                report.problems.append(item)
            report.lines = item.line
            continue
        pending.append(item)
        if len(pending) >= batch:
            report.lines = item.line
            report.staged += len(pending)
            yield pending
            pending = []
            progress(report.lines)
    if pending:
        report.lines = pending[-1].line
        report.staged += len(pending)
        yield pending


async def export_mappings(
    pool: asyncpg.Pool,
    out: TextIO,
    *,
    domain: str | None = None,
    file_format: FileFormat = FileFormat.CSV,
    progress: Callable[[int], None] = lambda rows: None,
    every: int = BATCH,
) -> int:
    """Write the mapping rows of live entities (one domain's, or all) to ``out`` in the format
    :func:`import_mappings` reads, streamed through a server-side cursor; how many rows."""
    count = 0
    out.write(format_header(file_format))
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        async for r in conn.cursor(query("export_mappings"), domain, prefetch=10_000):
            out.write(
                format_row(
                    file_format, r["internal_id"], r["domain_id"], r["external_id"], r["is_primary"]
                )
            )
            count += 1
            if count % every == 0:
                progress(count)
    progress(count)
    return count
