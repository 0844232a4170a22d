"""``broker events`` (domains' subscriptions) and ``broker keys`` (the SET signing keys)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import asyncpg

from broker.cli.common import actor, checked_box, pool
from broker.config import Config
from broker.db import query
from broker.errors import InvalidValueError, NotFoundError
from broker.events.keyring import KeyRing
from broker.http import outbound_url_problem
from broker.output import say, table

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_events", "cmd_keys", "register", "subscribe"]


def register(commands: Commands) -> None:
    """``events`` and ``keys``."""
    events = commands.add_parser("events", help="domains' subscriptions to change notification")
    events.set_defaults(run=cmd_events, asynchronous=True)
    actions = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    _subscribe_arguments(
        actions.add_parser("subscribe", help="make or replace a domain's subscription")
    )
    unsubscribe = actions.add_parser("unsubscribe", help="stop a domain's SETs")
    unsubscribe.add_argument("domain")
    actions.add_parser("list", help="subscriptions, with their SETs by state")

    keys = commands.add_parser("keys", help="the keys SETs are signed with")
    keys.set_defaults(run=cmd_keys, asynchronous=True)
    key_actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_actions.add_parser("rotate", help="add a key and sign with it; prints its kid")
    key_actions.add_parser("list", help="the keys, which signs, which are still published")


def _subscribe_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("domain")
    sub.add_argument(
        "--delivery",
        choices=("push", "poll"),
        required=True,
        help="push SETs to the domain (RFC 8935) or let it poll (RFC 8936)",
    )
    sub.add_argument("--endpoint", metavar="URL", help="push: the domain's SET receiver")
    sub.add_argument(
        "--token-env", metavar="VAR", help="push: environment variable with its bearer token"
    )
    sub.add_argument(
        "--resource-types", metavar="A,B", help="resource types of interest (default User,Group)"
    )
    sub.add_argument(
        "--attributes",
        metavar="A,B",
        help="attributes of interest: a change touching none of them is not sent (default all)",
    )
    sub.add_argument(
        "--detail",
        choices=("notice", "full"),
        default="notice",
        help="notice: attribute names only (default); full: values too, within the domain's "
        "read attributes",
    )
    sub.add_argument(
        "--identity-events",
        action="store_true",
        help="also notify merges and splits (an ID of the domain's now denotes another)",
    )


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _check_delivery(args: argparse.Namespace) -> None:
    """Push needs a receiver the broker may call; poll takes neither receiver nor token."""
    if args.delivery == "push":
        if not args.endpoint:
            raise InvalidValueError(
                "--delivery push needs --endpoint URL: the domain's RFC 8935 receiver"
            )
        problem = outbound_url_problem(args.endpoint, query=True)
        if problem is not None:
            raise InvalidValueError(
                f"--endpoint {args.endpoint!r} {problem}, for example "
                "https://receiver.example.org/events"
            )
    elif args.endpoint or args.token_env:
        raise InvalidValueError(
            "--endpoint and --token-env are for --delivery push; a polling domain calls "
            "POST /events/poll with its own token"
        )


async def subscribe(database: asyncpg.Pool, args: argparse.Namespace) -> asyncpg.Record:
    """The domain's subscription, made or replaced; errors say what to change."""
    _check_delivery(args)
    try:
        async with database.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(
                query("subscribe"),
                args.domain,
                _names(args.resource_types) or ["User", "Group"],
                _names(args.attributes),
                args.delivery,
                args.endpoint,
                f"env:{args.token_env}" if args.token_env else None,
                args.detail,
                args.identity_events,
            )
            assert record is not None
            await conn.execute(
                query("audit"),
                actor(),
                "events_subscribe",
                args.domain,
                {k: v for k, v in dict(record).items() if k not in ("created_at", "updated_at")},
            )
    except asyncpg.ForeignKeyViolationError:
        raise NotFoundError(
            f"there is no domain {args.domain}: `broker domain list` shows them"
        ) from None
    return record


def _lines(record: asyncpg.Record) -> list[str]:
    return [
        f"domain:          {record['domain_id']}",
        f"delivery:        {record['delivery']}"
        + (f" to {record['endpoint']}" if record["endpoint"] else " (POST /events/poll)"),
        f"resource types:  {', '.join(record['resource_types'])}",
        f"attributes:      {', '.join(record['attributes']) if record['attributes'] else 'all'}",
        f"detail:          {record['detail']}",
        f"merge/split:     {'notified' if record['identity_events'] else 'not notified'}",
    ]


async def cmd_events(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        if args.events_command == "subscribe":
            print("\n".join(_lines(await subscribe(database, args))))
        elif args.events_command == "unsubscribe":
            await _unsubscribe(database, args.domain)
            say(f"{args.domain} no longer gets SETs; those not yet delivered are dropped")
        else:
            await _list(database)
    return 0


async def _unsubscribe(database: asyncpg.Pool, domain: str) -> None:
    async with database.acquire() as conn, conn.transaction():
        gone = await conn.fetchval(query("unsubscribe"), domain)
        if gone is None:
            raise NotFoundError(f"domain {domain} has no event subscription")
        await conn.execute(query("audit"), actor(), "events_unsubscribe", gone, {})


async def _list(database: asyncpg.Pool) -> None:
    """Each subscription, with its SETs counted by state."""
    counts: dict[str, dict[str, int]] = {}
    for r in await database.fetch(query("event_stats")):
        counts.setdefault(r["domain_id"], {})[r["state"]] = r["events"]
    rows = [
        (
            r["domain_id"],
            r["delivery"],
            r["detail"],
            ",".join(r["resource_types"]),
            ",".join(r["attributes"]) if r["attributes"] else "all",
            *(
                str(counts.get(r["domain_id"], {}).get(state, 0))
                for state in ("pending", "sent", "acknowledged", "failed")
            ),
        )
        for r in await database.fetch(query("subscriptions"))
    ]
    headers = ("domain", "delivery", "detail", "types", "attributes")
    print(table((*headers, "pending", "unacked", "acked", "failed"), rows))


async def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        box = await checked_box(config, database)
        ring = KeyRing(database, lambda: box)
        if args.keys_command == "rotate":
            key = await ring.rotate(actor=actor())
            say(
                f"key {key.kid} signs new SETs from now on (running brokers follow within "
                f"{config.events.key_refresh:g} s); older keys stay in the JWKS while SETs "
                "they signed may still be pending"
            )
            print(key.kid)
            return 0
        rows = [
            (
                k.kid,
                k.created_at.isoformat(timespec="seconds"),
                "signing" if k.signing else ("published" if k.published else "retired"),
                str(k.unsettled),
            )
            for k in await ring.keys()
        ]
        print(table(("kid", "created", "state", "unsettled SETs"), rows))
    return 0
