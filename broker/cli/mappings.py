"""``broker mappings``: an entity's rows of the mapping table; ``mappings import FILE`` and
``mappings export`` (in :mod:`broker.cli.transfer`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli import transfer
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
        "mappings",
        help="show an entity's rows of the mapping table, as seed 002 draws them; "
        "import FILE: load a mapping all or nothing; export: write the table out",
        description="broker mappings INTERNAL_ID|DOMAIN:EXTERNAL_ID shows an entity's rows. "
        "broker mappings import FILE loads a CSV or JSON Lines file (internal_id, domain, "
        "external_id, primary) all or nothing, naming every bad line. broker mappings export "
        "[--domain D] [--format csv|jsonl] [--output FILE] writes the same format.",
    )
    mappings.add_argument("id", metavar="INTERNAL_ID|DOMAIN:EXTERNAL_ID|import|export")
    mappings.add_argument("file", nargs="?", metavar="FILE", help="import: the file to load")
    transfer.add_arguments(mappings)
    mappings.set_defaults(run=cmd_mappings, asynchronous=True)


async def cmd_mappings(config: Config, args: argparse.Namespace) -> int:
    if args.id == "import":
        return await transfer.cmd_import(config, args)
    if args.id == "export":
        return await transfer.cmd_export(config, args)
    if args.file is not None:
        say(f"broker: mappings {args.id} takes no FILE: did you mean mappings import {args.file}?")
        return 2
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
