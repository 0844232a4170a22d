"""``broker provision DOMAIN ENTITY|DOMAIN:EXTERNAL_ID``: provisioning on demand (RFC 7642
section 2.3.4): one entity into one push peer now, through the outbox, delivered by the running
``broker serve``; prints the peer's ID."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli.common import pool
from broker.config import Config
from broker.output import say
from broker.propagation.ondemand import provision

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_provision", "register"]


def register(commands: Commands) -> None:
    """``provision``."""
    command = commands.add_parser(
        "provision",
        help="provision one entity into a push peer now, and print the peer's ID",
        description="Provision ENTITY (an internal ID, or DOMAIN:EXTERNAL_ID of any domain) into "
        "push peer DOMAIN now, through the outbox (broker serve delivers it), and print the "
        "peer's ID. Idempotent: an entity provisioned already prints its ID at once.",
    )
    command.add_argument("domain", metavar="DOMAIN", help="the push peer")
    command.add_argument("entity", metavar="ENTITY|DOMAIN:EXTERNAL_ID")
    command.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the delivery (default 30)",
    )
    command.set_defaults(run=cmd_provision, asynchronous=True)


async def cmd_provision(config: Config, args: argparse.Namespace) -> int:
    if args.wait < 0:
        say("broker: --wait is a number of seconds, 0 or more")
        return 2
    async with pool(config) as database:
        done = await provision(database, domain=args.domain, entity=args.entity, wait=args.wait)
    say(
        f"{done.internal_id} {'provisioned now' if done.created else 'was provisioned already'}"
        f" in {done.domain} as:"
    )
    print(done.external_id)
    return 0
