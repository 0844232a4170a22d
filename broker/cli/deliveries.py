"""``broker deliveries list|retry|discard``: the outbox toward push peers, and its dead letters."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal

import asyncpg

from broker.cli.common import pool
from broker.config import Config
from broker.db import query
from broker.errors import BrokerError
from broker.output import say, table
from broker.propagation.outbox import settle_dead_letter

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
        settle = actions.add_parser(action, help=text)
        settle.add_argument("ids", type=int, nargs="+", metavar="ID")


async def cmd_deliveries(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        if args.deliveries_command == "list":
            await _list(database, args)
            return 0
        failed = await _settle(database, args.ids, args.deliveries_command)
    return 1 if failed else 0


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
