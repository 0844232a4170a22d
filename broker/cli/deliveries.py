"""``broker deliveries list|retry|discard``: the outbox toward push peers, and its dead letters
(one by one by ID, or in bulk toward one peer after a count and a confirmation)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import asyncpg

from broker.cli.common import actor, pool
from broker.config import Config
from broker.db import query
from broker.errors import BrokerError, InvalidValueError
from broker.output import say, table
from broker.propagation.outbox import (
    count_dead_letters,
    dead_letter_window,
    settle_dead_letter,
    settle_dead_letters,
)

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_deliveries", "register"]

STATES = ("pending", "in_flight", "done", "dead", "cancelled")


def register(commands: Commands) -> None:
    """``deliveries`` and its actions."""
    deliveries = commands.add_parser(
        "deliveries", help="the outbox toward push peers: list, retry and discard dead letters"
    )
    deliveries.set_defaults(run=cmd_deliveries, asynchronous=True)
    actions = deliveries.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list deliveries (dead ones by default)")
    listing.add_argument("--domain", help="only toward this peer")
    listing.add_argument(
        "--state", default="dead", choices=STATES, help="which deliveries (default: dead letters)"
    )
    listing.add_argument("--limit", type=int, default=100)
    for action, text in (
        ("retry", "send dead letters again (attempts counted afresh)"),
        ("discard", "give up dead letters (kept, marked cancelled)"),
    ):
        settle = actions.add_parser(
            action,
            help=text,
            description=f"{text}: the deliveries named by ID, or in bulk those toward one "
            "peer (--domain D with --all or --since T), after a count and a confirmation",
        )
        settle.add_argument("ids", type=int, nargs="*", metavar="ID")
        settle.add_argument("--domain", metavar="D", help="in bulk: the dead letters toward D")
        settle.add_argument("--all", action="store_true", help="in bulk: every one of them")
        settle.add_argument(
            "--since",
            metavar="T",
            help="in bulk: those that died since T (ISO 8601, or a time ago: 30m, 2h, 7d)",
        )
        settle.add_argument("--yes", action="store_true", help="in bulk: do not ask to confirm")


async def cmd_deliveries(config: Config, args: argparse.Namespace) -> int:
    window = None if args.deliveries_command == "list" else _bulk_window(args)
    async with pool(config) as database:
        if args.deliveries_command == "list":
            await _list(database, args)
            return 0
        if not args.ids:
            return await _bulk(database, args, window)
        failed = await _settle(database, args.ids, args.deliveries_command)
    return 1 if failed else 0


def _bulk_window(args: argparse.Namespace) -> datetime | None:
    """The bulk action's window, checked before the database is opened."""
    bulk = args.domain is not None or args.all or args.since is not None
    if args.ids and bulk:
        raise InvalidValueError(
            "give delivery IDs, or --domain D with --all or --since T; not both"
        )
    if args.ids:
        return None
    if args.domain is None:
        raise InvalidValueError(
            "name the deliveries: their IDs (`broker deliveries list` shows them), or "
            "--domain D with --all or --since T"
        )
    return dead_letter_window(everything=args.all, since=args.since, now=datetime.now(UTC))


async def _bulk(database: asyncpg.Pool, args: argparse.Namespace, since: datetime | None) -> int:
    """Count, confirm, settle in batches with progress; 1 when the person said no."""
    action: Literal["retry", "discard"] = args.deliveries_command
    letters = await count_dead_letters(database, args.domain, since)
    window = f" that died since {since.isoformat(timespec='seconds')}" if since else ""
    if letters.count == 0:
        say(f"no dead letters toward {letters.domain}{window}: nothing to {action}")
        return 0
    verb = "retried (queued again, attempts counted afresh)" if action == "retry" else "discarded"
    say(f"{letters.count} dead letters toward {letters.domain}{window} will be {verb}")
    if not args.yes and not _confirmed():
        say("nothing changed (--yes skips this question)")
        return 1
    done = await settle_dead_letters(
        database,
        letters,
        action,
        actor(),
        progress=lambda n: say(f"  {n} of {letters.count}"),
    )
    say(f"{done.count} dead letters toward {letters.domain} {verb.split(' ')[0]}")
    if done.superseded:
        say(
            f"{len(done.superseded)} of them were syncs of entities with a sync pending already: "
            "cancelled, the pending sync delivers home's state"
        )
    if done.passwords_lost:
        ids = ", ".join(map(str, done.passwords_lost))
        say(f"deliveries {ids} carried a password that was not delivered: set it again in home")
    return 0


def _confirmed() -> bool:
    """The person's yes (an empty or closed input is a no)."""
    print("Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


async def _list(database: asyncpg.Pool, args: argparse.Namespace) -> None:
    records = await database.fetch(
        query("list_deliveries"), args.domain, args.state, max(1, args.limit)
    )
    rows = [
        (
            str(r["id"]),
            r["domain_id"],
            r["internal_id"] or "(an orphan account)",
            r["kind"],
            r["state"],
            str(r["attempts"]),
            (r["last_error"] or {}).get("reason") or "-",
        )
        for r in records
    ]
    print(table(("id", "domain", "entity", "kind", "state", "attempts", "reason"), rows))


async def _settle(
    database: asyncpg.Pool, ids: list[int], action: Literal["retry", "discard"]
) -> int:
    """Retry or discard each dead letter; how many could not be."""
    failed = 0
    for delivery_id in ids:
        try:
            await settle_dead_letter(database, delivery_id, action, "cli")
        except BrokerError as exc:
            say(f"broker: {exc.detail}")
            failed += 1
            continue
        done = "queued again" if action == "retry" else "discarded"
        say(f"delivery {delivery_id}: {done}")
    return failed
