"""``broker audit list|verify|export``: the tamper-evident audit log (a hash chain, see
``broker.auditchain``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

import asyncpg

from broker.auditchain import Break, ChainHead
from broker.auditlog import (
    chain_rows,
    export_line,
    head_line,
    list_entries,
    verify_database,
    verify_lines,
)
from broker.cli.common import pool
from broker.config import Config
from broker.errors import InvalidValueError
from broker.output import say, table, when
from broker.tokens import parse_duration

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_audit", "parse_since", "register"]


def register(commands: Commands) -> None:
    """``audit`` and its actions."""
    audit = commands.add_parser(
        "audit", help="the audit log: list it, verify its hash chain, export it"
    )
    audit.set_defaults(run=cmd_audit, asynchronous=True)
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="entries, oldest first (the newest --limit)")
    listing.add_argument("--entity", metavar="E", help="about this internal ID")
    listing.add_argument("--domain", metavar="D", help="about this domain")
    listing.add_argument(
        "--since", metavar="T", help="from T: an ISO 8601 time, or a duration ago (7d, 12h)"
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    verify = actions.add_parser(
        "verify", help="check the hash chain; exit status 1 and the first broken row if broken"
    )
    verify.add_argument(
        "--file", metavar="FILE", help="verify an export (`broker audit export`) instead"
    )
    export = actions.add_parser(
        "export", help="the whole log as JSON Lines with its hashes, then the chain head"
    )
    export.add_argument("--output", metavar="FILE", help="write there (default: stdout)")


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """``--since``: an ISO 8601 time (UTC unless it says), or a duration before ``now``."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_duration(text)
        except InvalidValueError:
            raise InvalidValueError(
                f"--since {text}: write an ISO 8601 time (2026-12-01 or 2026-12-01T08:00:00Z) "
                "or a duration ago (7d, 12h, 30m)"
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    if args.audit_command == "verify" and args.file:
        return _verdict(*_verify_file(args.file))
    async with pool(config) as database:
        if args.audit_command == "list":
            await _list(database, args)
            return 0
        if args.audit_command == "verify":
            return _verdict(*await verify_database(database, progress=_progress))
        with _output(args.output) as out:
            written = await _export(database, out)
        say(f"exported {written} audit row(s) and the chain head")
        return 0


def _verify_file(path: str) -> tuple[int, Break | None]:
    try:
        with open(path, encoding="utf-8") as lines:
            return verify_lines(lines)
    except OSError as exc:
        raise InvalidValueError(f"cannot read {path}: {exc.strerror}") from None


def _output(path: str | None) -> contextlib.AbstractContextManager[TextIO]:
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise InvalidValueError(f"cannot write {path}: {exc.strerror}") from None


async def _export(database: asyncpg.Pool, out: TextIO) -> int:
    written = 0
    async for item in chain_rows(database):
        if isinstance(item, ChainHead):
            print(head_line(item), file=out)
            break
        print(export_line(item), file=out)
        written += 1
        if written % 10000 == 0:
            _progress(written)
    return written


def _progress(rows: int) -> None:
    say(f"... {rows} rows")


def _verdict(intact: int, broken: Break | None) -> int:
    if broken is None:
        say(f"audit log intact: {intact} row(s), chained up to the head")
        return 0
    where = f"row {broken.row_id}" if broken.row_id is not None else "the end of the log"
    say(f"audit log BROKEN at {where}: {broken.reason} ({intact} row(s) before it hold)")
    return 1


async def _list(database: asyncpg.Pool, args: argparse.Namespace) -> None:
    entries = await list_entries(
        database,
        entity=args.entity,
        domain=args.domain,
        since=parse_since(args.since, datetime.now(UTC)),
        limit=max(1, args.limit),
    )
    if args.json:
        for e in entries:
            print(json.dumps(e | {"at": e["at"].isoformat()}, ensure_ascii=False))
        return
    rows = [
        (
            str(e["id"]),
            when(e["at"], "-"),
            e["actor"],
            e["action"],
            e["subject"] or "-",
            json.dumps(e["details"], separators=(",", ":"), ensure_ascii=False),
        )
        for e in entries
    ]
    print(table(("id", "at", "actor", "action", "subject", "details"), rows))
