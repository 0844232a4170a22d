"""``broker mappings import FILE`` and ``broker mappings export``: an existing mapping loaded from
a file all or nothing, and the mapping table written out in the same format."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from broker.cli.common import actor, pool
from broker.config import Config
from broker.domains import DomainStore
from broker.mapping.fileformat import FileFormat
from broker.mapping.transfer import export_mappings, import_mappings
from broker.output import say

__all__ = ["add_arguments", "cmd_export", "cmd_import"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mappings import`` and ``mappings export``."""
    parser.add_argument(
        "--max-errors",
        type=int,
        default=100,
        metavar="N",
        help="import: name at most N bad lines, then count the rest (default 100)",
    )
    parser.add_argument("--domain", metavar="DOMAIN", help="export: only this domain's rows")
    parser.add_argument(
        "--format",
        choices=[f.value for f in FileFormat],
        help="export: csv or jsonl (default: by --output's extension, else csv)",
    )
    parser.add_argument(
        "--output", metavar="FILE", type=Path, help="export: write to FILE (default stdout)"
    )


def _rate(started: float, what: str) -> Callable[[int], None]:
    def report(count: int) -> None:
        seconds = max(time.monotonic() - started, 1e-9)
        say(f"{what} {count:,} ({count / seconds:,.0f}/s)")

    return report


async def cmd_import(config: Config, args: argparse.Namespace) -> int:
    if args.file is None:
        say("broker: mappings import needs the FILE to import (CSV or JSON Lines)")
        return 2
    if args.max_errors < 1:
        say("broker: --max-errors must be at least 1")
        return 2
    path = Path(args.file)
    async with pool(config) as database:
        report = await import_mappings(
            database,
            path,
            actor=actor(),
            limit=args.max_errors,
            progress=_rate(time.monotonic(), "lines read:"),
        )
    if report.refused:
        for problem in report.problems:
            say(f"{path}:{problem.line}: {problem.message}")
        more = report.problem_count - len(report.problems)
        if more > 0:
            say(
                f"... and {more:,} more bad lines (--max-errors {report.problem_count} names them all)"
            )
        say(
            f"broker: {report.problem_count:,} bad lines in {path}: nothing was imported; "
            "fix them and import the whole file again"
        )
        return 1
    rate = report.rows / report.seconds if report.seconds else 0.0
    print(
        f"imported {report.rows:,} mapping rows ({report.entities:,} new entities) from {path} "
        f"({report.file_format.value}) in {report.seconds:.1f} s, {rate:,.0f} rows/s"
    )
    return 0


@contextlib.contextmanager
def _opened(output: Path | None) -> Iterator[TextIO]:
    if output is None:
        yield sys.stdout
        return
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as file:
            yield file
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


async def cmd_export(config: Config, args: argparse.Namespace) -> int:
    if args.file is not None:
        say(f"broker: mappings export takes no FILE ({args.file}): use --output FILE")
        return 2
    output: Path | None = args.output
    if args.format is not None:
        file_format = FileFormat(args.format)
    elif output is not None and output.suffix.lower() in (".jsonl", ".ndjson"):
        file_format = FileFormat.JSONL
    else:
        file_format = FileFormat.CSV
    async with pool(config) as database:
        if args.domain is not None and args.domain not in {
            d.id for d in await DomainStore(database).list()
        }:
            say(f"broker: there is no domain {args.domain}: see broker domain list")
            return 1
        with _opened(output) as out:
            count = await export_mappings(
                database,
                out,
                domain=args.domain,
                file_format=file_format,
                progress=_rate(time.monotonic(), "rows written:"),
            )
    if output is not None:
        say(f"exported {count:,} mapping rows to {output} ({file_format.value})")
    return 0
