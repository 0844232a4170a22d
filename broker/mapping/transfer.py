"""Loading an existing mapping from a file, all or nothing, and writing the mapping table out as
one (``broker mappings import`` and ``export``).

An import streams the file: its well-formed lines go into a staging table with one COPY, fed a
batch at a time (the server stores one batch while the next is parsed); the set-based checks of
:func:`broker.mapping.accounts.import_problems` then find every line that breaks an invariant;
only when none does is the table written, with one INSERT ... SELECT, in the same transaction.
A large file into an empty table goes straight into the table instead
(:mod:`broker.mapping.bulkload`), with the same checks. An export reads through a server-side cursor, so neither holds the
file in memory.
"""

from __future__ import annotations

import contextlib
import gc
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
from broker.mapping import accounts, bulkload
from broker.mapping.fileformat import (
    Batch,
    FileFormat,
    LineProblem,
    Record,
    detect_format,
    format_header,
    format_row,
    parse_batches,
)

__all__ = ["ImportReport", "export_mappings", "import_mappings"]

BATCH = 50_000
"""Records parsed and handed to COPY at a time (and between two progress reports)."""
BULK_ROWS = 100_000
"""From this many lines, an import into an empty mapping table takes the bulk path (the rows
copied straight into the table, its keys and indexes built again after: see
:mod:`broker.mapping.bulkload`)."""


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
    """Well-formed lines copied (into the staging table, or on the bulk path the table)."""
    bulk: bool = False
    """Whether the rows were loaded by the bulk path."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading and staging the file, checking it, and writing the table."""
    write_steps: dict[str, float] = field(default_factory=dict)
    """Seconds the write's steps took: the new entities, and the rows (ordinary path) or the
    keys and indexes built again (bulk path, whose rows went in while the file was read)."""

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
    first ``limit`` bad lines, if any, and then nothing was written. A file of ``bulk_rows``
    lines or more into an empty table takes the bulk path (:mod:`broker.mapping.bulkload`)."""
    started = time.monotonic()
    try:
        large = _count_lines(path) > bulk_rows  # the header aside
        with _fewer_collections(), path.open(encoding="utf-8", newline="") as file:
            report = ImportReport(detect_format(path, file.read(4096)))
            file.seek(0)
            source = {"file": path.name, "format": report.file_format.value}
            async with pool.acquire() as conn:
                reserved = await accounts.reserve_staging_memory(conn)
                try:
                    steps = _Import(conn, report, limit, actor, source, progress, batch)
                    await steps.run(parse_batches(file, report.file_format, batch), large=large)
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


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """No cyclic garbage collection every 700 new objects while the import runs: it makes
    millions of tuples and lists, none of them in a cycle, and the collections cost a third of
    the parse (4.8 -> 3.0 s for a million lines). The thresholds are set back after."""
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _count_lines(path: Path) -> int:
    """Newlines in the file, read in large blocks (about a second for 10 million lines)."""
    count = 0
    with path.open("rb") as raw:
        while block := raw.read(1 << 22):
            count += block.count(b"\n")
    return count


@dataclass
class _Import:
    """One import's transaction: stage, check, write (or refuse)."""

    conn: Connection
    report: ImportReport
    limit: int
    actor: str
    source: dict[str, str]
    progress: Callable[[int], None]
    batch: int
    _since: float = 0.0

    async def run(self, items: Iterator[Batch], *, large: bool) -> None:
        try:
            async with self.conn.transaction():
                if large and await accounts.take_bulk_path(self.conn):
                    await self._bulk(items)
                else:
                    await self._staged(items)
        except _Refused:
            pass

    def _batches(
        self, items: Iterator[Batch], lines: bulkload.RowLines | None = None
    ) -> Iterator[list[Record]]:
        return _batches(items, self.report, self.limit, self.progress, lines)

    async def _staged(self, items: Iterator[Batch]) -> None:
        """The ordinary path: the lines staged, checked against the table, then inserted."""
        self._lap()
        await accounts.begin_import(self.conn)
        await accounts.stage_import(self.conn, self._batches(items))
        self._lap("stage")
        self._found(await accounts.import_problems(self.conn, self.limit))
        self._lap("check")
        if self.report.refused:
            raise _Refused
        counts = await accounts.commit_import(
            self.conn, actor=self.actor, source=self.source, timings=self.report.write_steps
        )
        self.report.rows, self.report.entities = counts
        self._lap("write")

    async def _bulk(self, items: Iterator[Batch]) -> None:
        """The bulk path: the rows copied straight into the emptied table, checked there, and
        the keys and indexes built again; their unique builds do the duplicate checks."""
        self._lap()
        await bulkload.begin(self.conn)
        lines = bulkload.RowLines()
        push = await accounts.push_domains(self.conn)
        rows = await bulkload.load(self.conn, self._batches(items, lines), push)
        self._lap("stage")
        found = await accounts.import_problems(self.conn, self.limit, duplicates=False, bulk=True)
        self._found(lines.lines(found))
        self._lap("check")
        entities = None
        if not self.report.refused:
            entities = await bulkload.finish(
                self.conn,
                rows,
                actor=self.actor,
                source=self.source,
                timings=self.report.write_steps,
            )
        if entities is None:  # refused, or a unique build found duplicates: name them
            self._found(await accounts.import_duplicates(self.conn, self.limit, lines.line))
            if not self.report.refused:  # a unique violation no duplicate explains
                raise ConflictError("two rows drew the same correlation handle: import it again")
            raise _Refused
        self.report.rows, self.report.entities, self.report.bulk = rows, entities, True
        self._lap("write")

    def _lap(self, phase: str | None = None) -> None:
        """The seconds since the last lap, as ``phase`` of the report (none: start the clock)."""
        now = time.monotonic()
        if phase is not None:
            self.report.phases[phase] = now - self._since
        self._since = now

    def _found(self, found: tuple[list[LineProblem], int]) -> None:
        """Merge a check's findings into the report's (the first ``limit`` by line)."""
        mine = (self.report.problems, self.report.problem_count)
        self.report.problems, self.report.problem_count = accounts.merge_problems(
            mine, found, self.limit
        )


def _batches(
    batches: Iterator[Batch],
    report: ImportReport,
    limit: int,
    progress: Callable[[int], None],
    lines: bulkload.RowLines | None,
) -> Iterator[list[Record]]:
    """The well-formed lines, a batch at a time (each noted in ``lines``, if given); the bad ones
    counted (and the first ``limit`` kept) in ``report``."""
    for batch in batches:
        report.problem_count += len(batch.problems)
        report.problems += batch.problems[: max(0, limit - len(report.problems))]
        report.lines = batch.last
        if batch.records:
            report.staged += len(batch.records)
            if lines is not None:
                lines.add(batch.records)
            yield batch.records
        progress(report.lines)


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
