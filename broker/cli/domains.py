"""``broker domain add|update|list|show|disable|enable|remove|test``: the home and peer domains
and their lifecycle (README, "Serving domains")."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from broker.cli.common import actor, pool, split_list
from broker.cli.reconcile import correlate_rule, sync_lines
from broker.config import Config
from broker.credentials import Reserved, credential_ref, describe_ref, reserved_secrets
from broker.domains import Domain, DomainStore, DomainUpdate
from broker.errors import InvalidValueError
from broker.mapping.removal import remove_domain
from broker.output import say, table
from broker.probe import ProbeReport, probe
from broker.tokens import parse_duration

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_domain", "register", "update_of"]


def register(commands: Commands) -> None:
    """``domain`` and its actions."""
    domain = commands.add_parser("domain", help="manage the home and peer domains")
    domain.set_defaults(run=cmd_domain, asynchronous=True)
    actions = domain.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="register a domain (a push domain is tested after)")
    _add_arguments(add, update=False)
    _push_arguments(add, update=False)
    update = actions.add_parser(
        "update",
        help="change any setting of add (a push domain is tested after)",
        description="Only the options given change. An empty value takes a setting away "
        "(--scope '', --token-env '', --read-attributes ''); --push/--no-push and "
        "--unlinkable/--no-unlinkable switch.",
    )
    _add_arguments(update, update=True)
    _push_arguments(update, update=True)
    for parser in (add, update):
        parser.add_argument(
            "--correlate",
            metavar="ATTR[,ATTR]",
            help="how reconciliation recognises a peer's existing account as a home entity's: "
            "attributes compared case-insensitively (default userName)",
        )
    actions.add_parser("list", help="list the domains")
    for name, text in (
        ("show", "show one domain: settings, state, and its rows"),
        ("disable", "refuse the domain's tokens (403) and hold its deliveries until enabled"),
        ("enable", "accept the domain's tokens again and deliver what waited"),
        ("test", "call the domain's SCIM service with its credential and say what works"),
    ):
        actions.add_parser(name, help=text).add_argument("domain")
    remove = actions.add_parser("remove", help="remove a domain, saying what happens to its rows")
    remove.add_argument("domain")
    remove.add_argument(
        "--keep-mappings",
        action="store_true",
        help="keep its external IDs (adding it again under its name gives them back)",
    )
    remove.add_argument(
        "--force", action="store_true", help="even with deliveries pending (they are discarded)"
    )


def _add_arguments(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The name, how the broker reaches the domain, and what it may see (add and update)."""
    parser.add_argument(
        "domain",
        help="the domain's name: 1 to 63 letters, digits, '.', '_', '-' (no '..'), starting "
        "with a letter or digit",
    )
    if not update:
        parser.add_argument("--home", action="store_true", help="this is the home domain")
    parser.add_argument("--scim-url", help="the domain's SCIM base URL (needed with --push)")
    credential = parser.add_mutually_exclusive_group()
    credential.add_argument(
        "--token-env", metavar="VAR", help="environment variable with its outbound token"
    )
    credential.add_argument(
        "--token-file",
        metavar="PATH",
        help="file with its outbound token, read again whenever it changes (and on SIGHUP)",
    )
    parser.add_argument(
        "--push",
        action=argparse.BooleanOptionalAction if update else "store_true",
        default=None if update else False,
        help="provision into this domain (peer-assigned IDs)",
    )
    parser.add_argument("--scope", metavar="FILTER", help="SCIM filter bounding what it sees")
    parser.add_argument("--read-attributes", metavar="A,B", help="attributes it may read")
    parser.add_argument("--write-attributes", metavar="A,B", help="attributes it may write")


def _push_arguments(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """What a push peer gets on deprovisioning and conflicts; unlinkability (add and update:
    update has no defaults, so that what is not given stays)."""
    parser.add_argument(
        "--deprovision",
        choices=("delete", "suspend"),
        default=None if update else "delete",
        help="push peers: when home deletes, DELETE at once, or suspend (active false) first",
    )
    parser.add_argument(
        "--suspend-for",
        metavar="DURATION",
        default=None if update else "30d",
        help="with --deprovision suspend: how long before the DELETE (default 30d)",
    )
    parser.add_argument(
        "--on-conflict",
        choices=("link", "dead-letter"),
        default=None if update else "dead-letter",
        help="push peers: a create refused as a duplicate links to the peer's resource, or waits "
        "for a person as a dead letter (default)",
    )
    parser.add_argument(
        "--unlinkable",
        action=argparse.BooleanOptionalAction if update else "store_true",
        default=None if update else False,
        help="coarsen meta.created, meta.lastModified and SET iat for this domain, and refuse "
        "filters and sortBy on them (versions and SET txn are per domain for every domain)",
    )
    parser.add_argument(
        "--timestamp-precision",
        metavar="SECONDS",
        type=int,
        default=None if update else 1,
        help="with --unlinkable: the seconds timestamps are truncated to (default 1, at most 86400)",
    )


async def cmd_domain(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        domains = DomainStore(database)
        command = args.domain_command
        if command in ("add", "update"):
            reserved = reserved_secrets(config)
            rule = correlate_rule(args.correlate) if args.correlate else None
            if command == "add":
                domain = await _add(domains, args, reserved)
            elif rule is not None and update_of(args).empty:
                domain = await domains.get(args.domain)  # the correlation rule alone
            else:
                domain = await _update(domains, args, reserved)
            if rule is not None:
                await domains.set_correlate(domain.id, rule, actor=actor())
            print("\n".join([*_domain_lines(domain), *await sync_lines(database, domain.id)]))
            if domain.push and domain.scim_url:
                report = await _test(domain)
                if not report.ok:
                    say(
                        f"broker: warning: domain {domain.id} is saved, but the test failed: "
                        "its deliveries wait until what FAIL says is fixed"
                    )
        elif command == "list":
            rows = [
                (d.id, d.kind, "push" if d.push else "-", d.status, d.scim_url or "-")
                for d in await domains.list()
            ]
            print(table(("domain", "kind", "push", "status", "scim url"), rows))
        elif command == "show":
            await _show(database, domains, args.domain)
        elif command in ("disable", "enable"):
            await _switch(domains, args.domain, command == "enable")
        elif command == "remove":
            await _remove(database, args)
        else:
            return await _test_command(domains, args.domain)
    return 0


async def _add(domains: DomainStore, args: argparse.Namespace, reserved: Reserved) -> Domain:
    """The domain ``add`` registers, checked as the admin API checks a domain's settings."""
    return await domains.add(
        args.domain,
        kind="home" if args.home else "peer",
        scim_url=args.scim_url,
        credential_ref=credential_ref(args.token_env, args.token_file),
        push=args.push,
        scope_filter=args.scope,
        read_attributes=split_list(args.read_attributes),
        write_attributes=split_list(args.write_attributes),
        deprovision=args.deprovision,
        suspend_for=parse_duration(args.suspend_for),
        on_conflict=args.on_conflict.replace("-", "_"),
        unlinkable=args.unlinkable,
        timestamp_precision=args.timestamp_precision,
        actor=actor(),
        reserved=reserved,
    )


def update_of(args: argparse.Namespace) -> DomainUpdate:
    """``domain update``'s options as the update they ask for (pure): what is not given stays;
    an empty value takes the setting away."""
    clear = set()
    texts = {"scim_url": args.scim_url, "scope_filter": args.scope}
    for name, value in texts.items():
        if value == "":
            clear.add(name)
    lists = {"read": args.read_attributes, "write": args.write_attributes}
    for name, value in lists.items():
        if value == "":
            clear.add(name)
    ref = None
    if args.token_env == "" or args.token_file == "":
        clear.add("credential_ref")
    elif args.token_env or args.token_file:
        ref = credential_ref(args.token_env, args.token_file)
    return DomainUpdate(
        scim_url=args.scim_url or None,
        credential_ref=ref,
        push=args.push,
        scope_filter=args.scope or None,
        read=split_list(args.read_attributes) if args.read_attributes else None,
        write=split_list(args.write_attributes) if args.write_attributes else None,
        deprovision=args.deprovision,
        suspend_for=parse_duration(args.suspend_for) if args.suspend_for else None,
        on_conflict=args.on_conflict.replace("-", "_") if args.on_conflict else None,
        unlinkable=args.unlinkable,
        timestamp_precision=args.timestamp_precision,
        clear=frozenset(clear),
    )


async def _update(domains: DomainStore, args: argparse.Namespace, reserved: Reserved) -> Domain:
    return await domains.update(args.domain, update_of(args), actor=actor(), reserved=reserved)


async def _show(database: asyncpg.Pool, domains: DomainStore, name: str) -> None:
    domain = await domains.get(name)
    counts = await domains.mapping_counts(domain.id)
    footprint = await domains.footprint(domain.id)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
    rows = ", ".join(f"{n} {what}" for what, n in footprint.items() if n and what != "mappings")
    print(
        "\n".join(
            [
                *_domain_lines(domain),
                *await sync_lines(database, domain.id),
                f"mappings:    {summary}",
                f"rows:        {rows or 'none'}",
            ]
        )
    )


async def _switch(domains: DomainStore, name: str, enabled: bool) -> None:
    domain, changed = await domains.set_enabled(name, enabled, actor=actor())
    if not changed:
        say(f"domain {name} is {domain.status} already: nothing changed")
    elif enabled:
        say(f"domain {name} enabled: its tokens work again and what waited is delivered now")
    else:
        say(
            f"domain {name} disabled: its tokens answer 403, its deliveries and SETs wait "
            f"(nothing is lost); `broker domain enable {name}` resumes them"
        )


async def _remove(database: asyncpg.Pool, args: argparse.Namespace) -> None:
    removal = await remove_domain(
        database,
        args.domain,
        keep_mappings=args.keep_mappings,
        force=args.force,
        actor=actor(),
    )
    print(f"domain {removal.domain} removed:")
    print("\n".join(f"  {line}" for line in removal.effects))


async def _test(domain: Domain) -> ProbeReport:
    assert domain.scim_url is not None
    say(f"testing domain {domain.id}: its SCIM service with its credential")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        report = await probe(session, domain.id, domain.scim_url, domain.credential_ref)
    print("\n".join(report.lines()))
    return report


async def _test_command(domains: DomainStore, name: str) -> int:
    domain = await domains.get(name)
    if not domain.scim_url:
        raise InvalidValueError(
            f"domain {name} has no SCIM URL: nothing to test (it calls the broker; the broker "
            f"does not call it). `broker domain update {name} --scim-url URL` gives it one"
        )
    return 0 if (await _test(domain)).ok else 1


def _domain_lines(domain: Domain) -> list[str]:
    """``domain show``: one line for each setting."""
    policy = domain.attribute_policy
    return [
        f"domain:      {domain.id}",
        f"kind:        {domain.kind}",
        f"status:      {domain.status}",
        f"scim url:    {domain.scim_url or '-'}",
        f"credential:  {describe_ref(domain.credential_ref)}",
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
