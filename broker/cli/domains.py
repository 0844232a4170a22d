"""``broker domain add|update|list|show``: the home and peer domains."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli.common import pool, split_list
from broker.cli.reconcile import correlate_rule, sync_lines
from broker.config import Config
from broker.domains import Domain, DomainStore
from broker.errors import BrokerError
from broker.output import table
from broker.tokens import parse_duration

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_domain", "register"]


def register(commands: Commands) -> None:
    """``domain`` and its actions."""
    domain = commands.add_parser("domain", help="manage the home and peer domains")
    domain.set_defaults(run=cmd_domain, asynchronous=True)
    actions = domain.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="register a domain")
    _add_arguments(add)
    _push_arguments(add)
    update = actions.add_parser("update", help="change a domain's SCIM base URL or correlation")
    update.add_argument("domain")
    update.add_argument("--scim-url", help="the domain's SCIM base URL, http(s)://HOST/PATH")
    for parser in (add, update):
        parser.add_argument(
            "--correlate",
            metavar="ATTR[,ATTR]",
            help="how reconciliation recognises a peer's existing account as a home entity's: "
            "attributes compared case-insensitively (default userName)",
        )
    actions.add_parser("list", help="list the domains")
    show = actions.add_parser("show", help="show one domain")
    show.add_argument("domain")


def _add_arguments(add: argparse.ArgumentParser) -> None:
    """``domain add``: the name, how the broker reaches the domain, and what it may see."""
    add.add_argument("domain", help="the domain's name: letters, digits, '.', '_', '-'")
    add.add_argument("--home", action="store_true", help="this is the home domain")
    add.add_argument("--scim-url", help="the domain's SCIM base URL (needed with --push)")
    add.add_argument(
        "--token-env", metavar="VAR", help="environment variable with its outbound token"
    )
    add.add_argument(
        "--push", action="store_true", help="provision into this domain (peer-assigned IDs)"
    )
    add.add_argument("--scope", metavar="FILTER", help="SCIM filter bounding what the domain sees")
    add.add_argument("--read-attributes", metavar="A,B", help="attributes the domain may read")
    add.add_argument("--write-attributes", metavar="A,B", help="attributes the domain may write")


def _push_arguments(add: argparse.ArgumentParser) -> None:
    """``domain add``: what a push peer gets on deprovisioning and conflicts; unlinkability."""
    add.add_argument(
        "--deprovision",
        choices=("delete", "suspend"),
        default="delete",
        help="push peers: when home deletes, DELETE at once, or suspend (active false) first",
    )
    add.add_argument(
        "--suspend-for",
        metavar="DURATION",
        default="30d",
        help="with --deprovision suspend: how long before the DELETE (default 30d)",
    )
    add.add_argument(
        "--on-conflict",
        choices=("link", "dead-letter"),
        default="dead-letter",
        help="push peers: a create refused as a duplicate links to the peer's resource, or waits "
        "for a person as a dead letter (default)",
    )
    add.add_argument(
        "--unlinkable",
        action="store_true",
        help="coarsen meta.created, meta.lastModified and SET iat for this domain, and refuse "
        "filters and sortBy on them (versions and SET txn are per domain for every domain)",
    )
    add.add_argument(
        "--timestamp-precision",
        metavar="SECONDS",
        type=int,
        default=1,
        help="with --unlinkable: the seconds timestamps are truncated to (default 1, at most 86400)",
    )


async def cmd_domain(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        domains = DomainStore(database)
        rule = correlate_rule(args.correlate) if getattr(args, "correlate", None) else None
        if args.domain_command == "add":
            domain = await _add(domains, args)
            if rule is not None:
                await domains.set_correlate(domain.id, rule)
            print("\n".join([*_domain_lines(domain), *await sync_lines(database, domain.id)]))
        elif args.domain_command == "update":
            if args.scim_url is None and rule is None:
                raise BrokerError("domain update: give --scim-url URL or --correlate ATTR[,ATTR]")
            if rule is not None:
                await domains.set_correlate(args.domain, rule)
            domain = await (
                domains.set_scim_url(args.domain, args.scim_url)
                if args.scim_url is not None
                else domains.get(args.domain)
            )
            print("\n".join([*_domain_lines(domain), *await sync_lines(database, domain.id)]))
        elif args.domain_command == "list":
            rows = [
                (d.id, d.kind, "push" if d.push else "-", d.status, d.scim_url or "-")
                for d in await domains.list()
            ]
            print(table(("domain", "kind", "push", "status", "scim url"), rows))
        else:
            domain = await domains.get(args.domain)
            counts = await domains.mapping_counts(domain.id)
            summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
            lines = [*_domain_lines(domain), *await sync_lines(database, domain.id)]
            print("\n".join([*lines, f"mappings:    {summary}"]))
    return 0


async def _add(domains: DomainStore, args: argparse.Namespace) -> Domain:
    return await domains.add(
        args.domain,
        kind="home" if args.home else "peer",
        scim_url=args.scim_url,
        credential_ref=f"env:{args.token_env}" if args.token_env else None,
        push=args.push,
        scope_filter=args.scope,
        read_attributes=split_list(args.read_attributes),
        write_attributes=split_list(args.write_attributes),
        deprovision=args.deprovision,
        suspend_for=parse_duration(args.suspend_for),
        on_conflict=args.on_conflict.replace("-", "_"),
        unlinkable=args.unlinkable,
        timestamp_precision=args.timestamp_precision,
    )


def _domain_lines(domain: Domain) -> list[str]:
    """``domain show``: one line for each setting."""
    policy = domain.attribute_policy
    return [
        f"domain:      {domain.id}",
        f"kind:        {domain.kind}",
        f"status:      {domain.status}",
        f"scim url:    {domain.scim_url or '-'}",
        f"credential:  {domain.credential_ref or '-'}",
        f"push:        {'yes (peer-assigned IDs)' if domain.push else 'no (broker-minted IDs)'}",
        f"scope:       {domain.scope_filter or '(everything)'}",
        f"read attrs:  {', '.join(policy['read']) if 'read' in policy else '(all)'}",
        f"write attrs: {', '.join(policy['write']) if 'write' in policy else '(all)'}",
        "unlinkable:  "
        + (f"yes (timestamps to {domain.timestamp_precision} s)" if domain.unlinkable else "no"),
        *(_push_lines(domain) if domain.push else []),
    ]


def _push_lines(domain: Domain) -> list[str]:
    """A push peer's deprovisioning, conflict handling and failure state."""
    return [
        f"deprovision: {domain.deprovision}"
        + (f" (delete after {domain.suspend_for})" if domain.deprovision == "suspend" else ""),
        f"on conflict: {domain.on_conflict.replace('_', '-')}",
        f"failing:     since {domain.failing_since.isoformat(timespec='seconds')}"
        if domain.failing_since
        else "failing:     no",
    ]
