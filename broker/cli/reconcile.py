"""``broker reconcile DOMAIN`` (situations, a plan, actions through the outbox) and ``broker sync
DOMAIN`` (restart a push domain's initial sync): see docs/reconciliation.md."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import asyncpg

from broker.cli.common import actor, pool, split_list
from broker.config import Config
from broker.db import query
from broker.errors import BrokerError
from broker.output import say, table
from broker.reconcile.initial import INITIAL_OPTIONS, request_initial_sync
from broker.reconcile.runner import Report
from broker.reconcile.session import open_reconciler
from broker.reconcile.situations import (
    ACTIONS,
    DEFAULT_ACTIONS,
    SITUATIONS,
    Options,
    parse_correlate,
)

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_reconcile", "cmd_sync", "correlate_rule", "register", "sync_lines"]

_PLAN_PAGE = 1000


def register(commands: Commands) -> None:
    """``reconcile`` and ``sync``."""
    run = commands.add_parser(
        "reconcile",
        help="compare a push peer with home and the mapping table; link, sync, create, report",
    )
    run.add_argument("domain", metavar="DOMAIN")
    run.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    run.add_argument("--only", metavar="SITUATION,...", help="act on and report these only")
    run.add_argument("--json", action="store_true", help="the report (and plan) as JSON")
    for situation, choices in ACTIONS.items():
        run.add_argument(
            f"--on-{situation}",
            choices=choices,
            default=DEFAULT_ACTIONS[situation],
            help=f"default {DEFAULT_ACTIONS[situation]}",
        )
    run.add_argument(
        "--confirm-deletions",
        type=int,
        default=0,
        metavar="N",
        help="allow this run to deprovision exactly N accounts past the deletion threshold",
    )
    run.add_argument("--page-size", type=int, default=None, help="peer accounts per page")
    run.add_argument("--rate", type=float, default=None, help="peer pages a second (0: no limit)")
    run.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    run.set_defaults(run=cmd_reconcile, asynchronous=True)
    sync = commands.add_parser(
        "sync", help="restart a push domain's initial sync (home's entities in its scope)"
    )
    sync.add_argument("domain", metavar="DOMAIN")
    sync.add_argument(
        "--now", action="store_true", help="run it in this process instead of `broker serve`"
    )
    sync.set_defaults(run=cmd_sync, asynchronous=True)


def options_of(args: argparse.Namespace) -> Options:
    """The run's options from the command line; BrokerError naming the fix."""
    only = split_list(args.only)
    if only is not None:
        unknown = [s for s in only if s not in SITUATIONS]
        if unknown or not only:
            raise BrokerError(
                f"--only {args.only}: name situations among {', '.join(SITUATIONS)}", status=400
            )
    if args.confirm_deletions < 0:
        raise BrokerError("--confirm-deletions is the number of accounts, 0 or more", status=400)
    actions = {s: getattr(args, f"on_{s}") for s in ACTIONS}
    return Options(
        actions=actions,
        only=frozenset(only) if only is not None else None,
        dry_run=args.dry_run,
        confirm_deletions=args.confirm_deletions,
    )


async def cmd_reconcile(config: Config, args: argparse.Namespace) -> int:
    options = options_of(args)
    async with (
        pool(config) as database,
        open_reconciler(
            config, database, args.domain, progress=say, page_size=args.page_size, rate=args.rate
        ) as reconciler,
    ):
        run = await reconciler.start(options, actor=actor(), fresh=args.fresh)
        report = await reconciler.run(run)
        await print_report(database, report, options, as_json=args.json, plan=args.dry_run)
    if report.phase == "stopped":
        say(f"broker: {report.reason}")
        return 1
    return 0


async def cmd_sync(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        await request_initial_sync(database, args.domain, actor=actor())
        if not args.now:
            say(
                f"initial sync of {args.domain} requested: `broker serve` runs it; "
                f"`broker domain show {args.domain}` shows its progress"
            )
            return 0
        async with open_reconciler(config, database, args.domain, progress=say) as reconciler:
            await database.execute(query("set_initial_sync"), args.domain, "running")
            run = await reconciler.start(INITIAL_OPTIONS, actor=actor(), initial_sync=True)
            report = await reconciler.run(run)
            await database.execute(
                query("set_initial_sync"),
                args.domain,
                "done" if report.phase == "done" else "failed",
            )
            await print_report(database, report, INITIAL_OPTIONS, as_json=False, plan=False)
    return 0 if report.phase == "done" else 1


async def print_report(
    database: asyncpg.Pool, report: Report, options: Options, *, as_json: bool, plan: bool
) -> None:
    """The counts per situation (and with ``plan``, every item), as a table or JSON; items are
    read a page at a time, so a large peer's plan is never held whole."""
    only = sorted(options.only) if options.only is not None else None
    if as_json:
        print(json.dumps(report.to_json())[:-1] + ', "items": [', end="")
        first = True
        async for item in _items(database, report, only):
            print(("" if first else ",") + json.dumps(item), end="")
            first = False
        print("]}")
        return
    if plan:
        rows: list[list[str]] = []
        async for item in _items(database, report, only):
            rows.append(_row(item))
            if len(rows) == _PLAN_PAGE:
                print(table(_HEADER, rows))
                rows = []
        if rows:
            print(table(_HEADER, rows))
    situations = report.counts.get("situations", {})
    print(
        f"run {report.run} of {report.domain}: {report.phase}"
        + (" (dry run: nothing changed)" if report.dry_run else "")
    )
    print(table(("situation", "count"), [(s, str(situations.get(s, 0))) for s in SITUATIONS]))
    actions = report.counts.get("actions", {})
    if actions:
        verb = "planned" if report.dry_run else "taken"
        print(f"actions {verb}: " + ", ".join(f"{n} {a}" for a, n in sorted(actions.items())))


_HEADER = ("situation", "type", "peer id", "entity", "action", "detail")


def _row(item: dict[str, Any]) -> list[str]:
    detail = item["detail"]
    text = detail.get("reason") or ", ".join(detail.get("attributes", [])) or "-"
    return [
        item["situation"],
        item["resourceType"],
        item["externalId"] or "-",
        item["internalId"] or "-",
        item["action"],
        text,
    ]


async def _items(database: asyncpg.Pool, report: Report, only: list[str] | None) -> Any:
    after = 0
    while True:
        records = await database.fetch(query("report_items"), report.run, only, after, _PLAN_PAGE)
        for r in records:
            yield {
                "situation": r["situation"],
                "resourceType": r["resource_type"],
                "externalId": r["external_id"],
                "internalId": r["internal_id"],
                "action": r["action"],
                "done": r["done"],
                "detail": r["detail"],
            }
        if len(records) < _PLAN_PAGE:
            return
        after = records[-1]["seq"]


def correlate_rule(value: str) -> list[str]:
    """``--correlate`` as the rule's attributes; BrokerError naming the fix."""
    try:
        return list(parse_correlate(value))
    except ValueError as exc:
        raise BrokerError(str(exc), status=400) from None


async def sync_lines(database: asyncpg.Pool, domain: str) -> list[str]:
    """``domain show``: the correlation rule, and a push domain's initial sync with its progress."""
    record = await database.fetchrow(query("domain_correlate"), domain)
    if record is None:
        return []
    lines = [f"correlate:   {', '.join(record['correlate'])}"]
    for p in await database.fetch(query("initial_sync_progress"), domain):
        lines.append(
            f"initial sync: {p['initial_sync'] or '-'} ({p['arrived']}/{p['wanted']} in the peer)"
        )
    return lines
