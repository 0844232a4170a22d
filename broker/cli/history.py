"""``broker history ENTITY|DOMAIN:EXTERNAL_ID``: what touched one entity, across all domains."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from broker.cli.audit import parse_since
from broker.cli.common import pool
from broker.config import Config
from broker.history import EntityHistory, Event, entity_history
from broker.mapping.render import mapping_table
from broker.mapping.store import MappingStore
from broker.output import table, when

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_history", "register"]


def register(commands: Commands) -> None:
    """``history``."""
    history = commands.add_parser(
        "history",
        help="what touched one entity: writes, deliveries, SETs, merges, splits, audit entries",
    )
    history.add_argument("entity", metavar="ENTITY|DOMAIN:EXTERNAL_ID")
    history.add_argument(
        "--since", metavar="T", help="from T: an ISO 8601 time, or a duration ago (7d, 12h)"
    )
    history.add_argument("--limit", type=int, default=1000, help="the newest N (default 1000)")
    history.add_argument("--json", action="store_true", help="one JSON document")
    history.set_defaults(run=cmd_history, asynchronous=True)


async def cmd_history(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        found = await entity_history(
            database,
            args.entity,
            since=parse_since(args.since, datetime.now(UTC)),
            limit=max(1, args.limit),
        )
        if args.json:
            print(json.dumps(found.to_json(), ensure_ascii=False, indent=2))
            return 0
        rows = await MappingStore(database).rows_of([found.internal_id])
    print(_heading(found))
    print(mapping_table(rows) if rows else "(no rows in the mapping table)")
    print()
    print(_events(found.events) if found.events else "(nothing recorded in the retention)")
    return 0


def _heading(found: EntityHistory) -> str:
    parts = [f"entity {found.internal_id}"]
    if found.resource_type:
        parts.append(f"{found.resource_type}, {found.state}")
    if found.merged_into:
        parts.append(f"merged into {found.merged_into}")
    if found.merged:
        parts.append(f"{', '.join(found.merged)} merged into it (listed too)")
    return "; ".join(parts)


def _events(events: list[Event]) -> str:
    rows = [
        (
            when(e.at, "-"),
            e.entity,
            e.kind,
            e.domain or "-",
            e.status,
            _summary(e),
        )
        for e in events
    ]
    return table(("at", "entity", "what", "domain", "status", "details"), rows)


def _summary(event: Event) -> str:
    details = dict(event.details)
    if event.actor:
        details = {"actor": event.actor} | details
    return json.dumps(details, separators=(",", ":"), ensure_ascii=False) if details else "-"
