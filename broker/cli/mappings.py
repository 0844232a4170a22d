"""``broker mappings``: an entity's rows of the mapping table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli.common import pool
from broker.config import Config
from broker.domains import DomainStore
from broker.mapping.render import mapping_table
from broker.mapping.rules import MappingRow
from broker.mapping.store import MappingStore
from broker.output import say

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_mappings", "register"]


def register(commands: Commands) -> None:
    """``mappings``."""
    mappings = commands.add_parser(
        "mappings", help="show an entity's rows of the mapping table, as seed 002 draws them"
    )
    mappings.add_argument("id", metavar="INTERNAL_ID|DOMAIN:EXTERNAL_ID")
    mappings.set_defaults(run=cmd_mappings, asynchronous=True)


async def cmd_mappings(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        store = MappingStore(database)
        domain, sep, external_id = args.id.partition(":")
        rows: list[MappingRow] = []
        if sep and domain in {d.id for d in await DomainStore(database).list()}:
            rows = await store.rows_by_external(domain, external_id)
        else:
            rows = await store.rows_of([args.id])
        if not rows:
            say(f"no mapping rows for {args.id}")
            return 1
        print(mapping_table(rows))
    return 0
