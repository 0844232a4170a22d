"""The ``broker`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from broker import __version__
from broker.app import create_app
from broker.config import Config, ConfigError, load_config
from broker.db import MigrationError, migrated_pool, query
from broker.demo import add_demo_command
from broker.domains import Domain, DomainStore
from broker.errors import BrokerError
from broker.events.commands import add_event_commands
from broker.logsafe import protect_handlers
from broker.mapping.rules import MappingRow
from broker.mapping.store import MappingStore, Operation
from broker.propagation.outbox import settle_dead_letter
from broker.tables import table as _table
from broker.tokens import TokenStore, parse_duration

__all__ = ["main"]

log = logging.getLogger("broker")


def _say(message: str) -> None:
    """Progress and diagnostics go to stderr; stdout carries only what a command answers."""
    print(message, file=sys.stderr, flush=True)


@asynccontextmanager
async def _pool(config: Config) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database for one CLI command (joining a running embedded server if there is one)."""
    if config.database.url is None:
        _say(f"using the embedded PostgreSQL in {config.database.data_dir}")
    async with migrated_pool(
        config.database.url,
        config.database.data_dir,
        max_size=2,
        on_applied=lambda m: _say(f"applied migration {m.name}"),
    ) as (pool, _url):
        yield pool


# --------------------------------------------------------------------------- commands


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    protect_handlers()  # no record, from any logger, writes a bearer token
    if config.database.url is None:
        _say(
            f"starting the embedded PostgreSQL in {config.database.data_dir} "
            "(the first start initialises it)"
        )
    web.run_app(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        shutdown_timeout=config.server.shutdown_timeout,
        print=lambda _: _say(
            f"broker {__version__} ready: {config.public_url} (/healthz, /readyz"
            + (", /scim/v2" if config.home.scim_url else "; set [home] scim_url to serve /scim/v2")
            + ")"
            + (
                f"; admin API and /metrics on "
                f"http://{config.server.admin_host}:{config.server.admin_port}"
                if config.server.admin_port
                else ""
            )
            + "; Ctrl-C or SIGTERM stops it"
        ),
        access_log=None,
    )
    _say("broker stopped")
    return 0


async def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool, pool.acquire() as conn:
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    print(f"database is at migration {version:04d}: up to date")
    return 0


def _domain_lines(domain: Domain) -> list[str]:
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
        *(
            [
                f"deprovision: {domain.deprovision}"
                + (
                    f" (delete after {domain.suspend_for})"
                    if domain.deprovision == "suspend"
                    else ""
                ),
                f"on conflict: {domain.on_conflict.replace('_', '-')}",
                f"failing:     since {domain.failing_since.isoformat(timespec='seconds')}"
                if domain.failing_since
                else "failing:     no",
            ]
            if domain.push
            else []
        ),
    ]


def _split_list(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


async def cmd_domain(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        domains = DomainStore(pool)
        if args.domain_command == "add":
            domain = await domains.add(
                args.domain,
                kind="home" if args.home else "peer",
                scim_url=args.scim_url,
                credential_ref=f"env:{args.token_env}" if args.token_env else None,
                push=args.push,
                scope_filter=args.scope,
                read_attributes=_split_list(args.read_attributes),
                write_attributes=_split_list(args.write_attributes),
                deprovision=args.deprovision,
                suspend_for=parse_duration(args.suspend_for),
                on_conflict=args.on_conflict.replace("-", "_"),
                unlinkable=args.unlinkable,
                timestamp_precision=args.timestamp_precision,
            )
            print("\n".join(_domain_lines(domain)))
        elif args.domain_command == "update":
            domain = await domains.set_scim_url(args.domain, args.scim_url)
            print("\n".join(_domain_lines(domain)))
        elif args.domain_command == "list":
            rows = [
                (d.id, d.kind, "push" if d.push else "-", d.status, d.scim_url or "-")
                for d in await domains.list()
            ]
            print(_table(("domain", "kind", "push", "status", "scim url"), rows))
        else:
            domain = await domains.get(args.domain)
            counts = await domains.mapping_counts(domain.id)
            summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
            print("\n".join([*_domain_lines(domain), f"mappings:    {summary}"]))
    return 0


async def cmd_token(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        tokens = TokenStore(pool)
        if args.token_command == "issue":
            token, info = await tokens.issue(
                args.domain,
                scopes=_split_list(args.scopes),
                expires_in=parse_duration(args.expires_in) if args.expires_in else None,
            )
            expiry = info.expires_at.isoformat(timespec="seconds") if info.expires_at else "never"
            _say(
                f"token {info.id} for {info.domain_id} ({', '.join(info.scopes)}; expires {expiry}). "
                "It is shown once and stored only as a hash:"
            )
            print(token)
        elif args.token_command == "list":
            rows = [
                (
                    str(t.id),
                    t.domain_id,
                    t.prefix + "...",
                    ",".join(t.scopes),
                    _when(t.expires_at, "never"),
                    _when(t.last_used_at, "never"),
                    "revoked " + _when(t.revoked_at, "") if t.revoked_at else "active",
                )
                for t in await tokens.list(args.domain)
            ]
            print(
                _table(("id", "domain", "token", "scopes", "expires", "last used", "state"), rows)
            )
        else:
            info = await tokens.revoke(args.id)
            _say(f"token {info.id} of {info.domain_id} revoked (takes effect within seconds)")
    return 0


async def cmd_deliveries(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        if args.deliveries_command == "list":
            records = await pool.fetch(
                query("list_deliveries"), args.domain, args.state, max(1, args.limit)
            )
            rows = [
                (
                    str(r["id"]),
                    r["domain_id"],
                    r["internal_id"],
                    r["kind"],
                    r["state"],
                    str(r["attempts"]),
                    (r["last_error"] or {}).get("reason") or "-",
                )
                for r in records
            ]
            print(_table(("id", "domain", "entity", "kind", "state", "attempts", "reason"), rows))
            return 0
        failed = 0
        for delivery_id in args.ids:
            try:
                await settle_dead_letter(pool, delivery_id, args.deliveries_command, "cli")
            except BrokerError as exc:
                _say(f"broker: {exc.detail}")
                failed += 1
                continue
            done = "queued again" if args.deliveries_command == "retry" else "discarded"
            _say(f"delivery {delivery_id}: {done}")
    return 1 if failed else 0


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _moves(new: Sequence[str], specs: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """--move DOMAIN:EXTERNAL_ID (to the first new entity) or NEW=DOMAIN:EXTERNAL_ID."""
    moves: dict[str, list[tuple[str, str]]] = {entity: [] for entity in new}
    for spec in specs:
        target, sep, ref = spec.partition("=")
        if not sep:
            target, ref = new[0], spec
        domain, colon, external_id = ref.partition(":")
        if target not in moves or not colon or not domain or not external_id:
            raise BrokerError(
                f"--move {spec}: write DOMAIN:EXTERNAL_ID, or NEW_ID=DOMAIN:EXTERNAL_ID naming one "
                "of the new entities",
                status=400,
            )
        moves[target].append((domain, external_id))
    return moves


async def cmd_merge(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        operation = await MappingStore(pool).merge(
            args.survivor, args.losers, idempotency_key=args.idempotency_key, actor=_actor()
        )
        return await _follow(pool, operation, args.wait)


async def cmd_split(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        operation = await MappingStore(pool).split(
            args.source,
            _moves(args.new, args.move),
            idempotency_key=args.idempotency_key,
            actor=_actor(),
            provision=args.provision,
        )
        return await _follow(pool, operation, args.wait)


async def cmd_operations(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        store = MappingStore(pool)
        if args.id is None:
            records = await pool.fetch(query("recent_operations"), max(1, args.limit))
            print(
                _table(
                    ("operation", "kind", "state", "created", "request"),
                    [
                        (
                            str(r["id"]),
                            r["kind"],
                            r["state"],
                            _when(r["created_at"], "-"),
                            json.dumps(r["request"], separators=(",", ":")),
                        )
                        for r in records
                    ],
                )
            )
            return 0
        try:
            op_id = uuid.UUID(args.id)
        except ValueError:
            raise BrokerError(
                f"{args.id} is not an operation ID: `broker operations` lists them", status=404
            ) from None
        return await _follow(pool, await store.operation(op_id), args.wait, announce=False)


async def _follow(
    pool: asyncpg.Pool, operation: Operation, wait: bool, *, announce: bool = True
) -> int:
    """Print the operation (and with ``wait``, its progress until it is done or failed)."""
    store = MappingStore(pool)
    if announce:
        if operation.replayed:
            _say(f"key {operation.idempotency_key} named an earlier operation: nothing done again")
        else:
            _say(
                f"{operation.kind} recorded (idempotency key {operation.idempotency_key}); "
                "the mapping table changed, the peers follow"
            )
    shown = ""
    quiet_since = time.monotonic()
    hinted = False
    while True:
        text = _progress_table(operation)
        if text != shown:
            print(text, flush=True)
            shown, quiet_since = text, time.monotonic()
        if not wait or operation.state in ("done", "failed"):
            break
        if not hinted and time.monotonic() - quiet_since > 30:
            _say(
                "nothing has moved for 30 s: is `broker serve` running, with [propagation] "
                "enabled and the peers reachable? (`broker deliveries list --state pending`)"
            )
            hinted = True
        await asyncio.sleep(0.5)
        operation = await store.operation(operation.id)
    return 1 if operation.state == "failed" else 0


def _progress_table(operation: Operation) -> str:
    rows = [
        (
            domain,
            str(p.get("state", "-")),
            f"{p.get('done', 0)}/{p.get('tasks', 0)}",
            str(p.get("reason") or "-"),
        )
        for domain, p in sorted(operation.progress.items())
    ]
    head = f"{operation.kind} {operation.id}: {operation.state}"
    if not rows:
        return head + " (no peer has anything to do)"
    return head + "\n" + _table(("domain", "state", "tasks done", "reason"), rows)


def _when(moment: datetime | None, default: str) -> str:
    return moment.isoformat(timespec="seconds") if moment else default


async def cmd_mappings(config: Config, args: argparse.Namespace) -> int:
    async with _pool(config) as pool:
        store = MappingStore(pool)
        domain, sep, external_id = args.id.partition(":")
        rows: list[MappingRow] = []
        if sep and domain in {d.id for d in await DomainStore(pool).list()}:
            rows = await store.rows_by_external(domain, external_id)
        else:
            rows = await store.rows_of([args.id])
        if not rows:
            _say(f"no mapping rows for {args.id}")
            return 1
        print(
            _table(
                ("internal ID", "domain", "external ID", "primary", "state"),
                [
                    (
                        r.internal_id,
                        r.domain,
                        r.external_id or "(pending)",
                        str(r.primary).lower(),
                        r.state.value,
                    )
                    for r in rows
                ],
            )
        )
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Federated ID-mapping broker: SCIM 2.0 between identity domains, no internal ID exposed.",
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (also $BROKER_CONFIG)"
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        help="data directory of the embedded PostgreSQL (also $BROKER_DATA_DIR)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="listen address (default from [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default from [server] port)")
    serve.set_defaults(run=cmd_serve, asynchronous=False)

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(run=cmd_migrate, asynchronous=True)

    domain = commands.add_parser("domain", help="manage the home and peer domains")
    domain.set_defaults(run=cmd_domain, asynchronous=True)
    domain_commands = domain.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    add = domain_commands.add_parser("add", help="register a domain")
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
    update = domain_commands.add_parser("update", help="change a domain's SCIM base URL")
    update.add_argument("domain")
    update.add_argument(
        "--scim-url", required=True, help="the domain's SCIM base URL, http(s)://HOST/PATH"
    )
    domain_commands.add_parser("list", help="list the domains")
    show = domain_commands.add_parser("show", help="show one domain")
    show.add_argument("domain")

    token = commands.add_parser("token", help="issue, list and revoke domains' bearer tokens")
    token.set_defaults(run=cmd_token, asynchronous=True)
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    issue = token_commands.add_parser("issue", help="issue a token; prints it alone on stdout")
    issue.add_argument("domain")
    issue.add_argument(
        "--scopes",
        metavar="S,S",
        help="scim:read,scim:write (default: both); admin (the admin API) only for the home domain",
    )
    issue.add_argument(
        "--expires-in", metavar="DURATION", help="for example 90d, 12h (default: never)"
    )
    token_list = token_commands.add_parser("list", help="list tokens (never the tokens themselves)")
    token_list.add_argument("domain", nargs="?")
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", type=int)

    deliveries = commands.add_parser(
        "deliveries", help="the outbox toward push peers: list, retry and discard dead letters"
    )
    deliveries.set_defaults(run=cmd_deliveries, asynchronous=True)
    delivery_commands = deliveries.add_subparsers(
        dest="deliveries_command", required=True, metavar="ACTION"
    )
    delivery_list = delivery_commands.add_parser(
        "list", help="list deliveries (dead ones by default)"
    )
    delivery_list.add_argument("--domain", help="only toward this peer")
    delivery_list.add_argument(
        "--state",
        default="dead",
        choices=("pending", "in_flight", "done", "dead", "cancelled"),
        help="which deliveries (default: dead letters)",
    )
    delivery_list.add_argument("--limit", type=int, default=100)
    for action, text in (
        ("retry", "send dead letters again (attempts counted afresh)"),
        ("discard", "give up dead letters (kept, marked cancelled)"),
    ):
        sub = delivery_commands.add_parser(action, help=text)
        sub.add_argument("ids", type=int, nargs="+", metavar="ID")

    mappings = commands.add_parser(
        "mappings", help="show an entity's rows of the mapping table, as seed 002 draws them"
    )
    mappings.add_argument("id", metavar="INTERNAL_ID|DOMAIN:EXTERNAL_ID")
    mappings.set_defaults(run=cmd_mappings, asynchronous=True)

    key_help = "makes a retry of this command the same operation (default: a new random key)"
    wait_help = "show progress until the peers have followed (needs `broker serve` running)"
    merge = commands.add_parser(
        "merge", help="merge entities found to be one (false negative); peers follow"
    )
    merge.add_argument("survivor", metavar="SURVIVOR")
    merge.add_argument("losers", nargs="+", metavar="LOSER")
    merge.add_argument("--idempotency-key", default=None, help=key_help)
    merge.add_argument("--wait", action="store_true", help=wait_help)
    merge.set_defaults(run=cmd_merge, asynchronous=True)

    split = commands.add_parser(
        "split", help="split an entity found to be several (false positive); peers follow"
    )
    split.add_argument("source", metavar="SOURCE")
    split.add_argument("new", nargs="+", metavar="NEW", help="new entities, already in home")
    split.add_argument(
        "--move",
        action="append",
        default=[],
        metavar="[NEW=]DOMAIN:EXTERNAL_ID",
        help="a row that moves from SOURCE (to the first NEW unless named); repeatable",
    )
    split.add_argument(
        "--provision",
        choices=("eager", "on_demand"),
        default="on_demand",
        help="create the new entities in push peers now, or when first needed (default)",
    )
    split.add_argument("--idempotency-key", default=None, help=key_help)
    split.add_argument("--wait", action="store_true", help=wait_help)
    split.set_defaults(run=cmd_split, asynchronous=True)

    operations = commands.add_parser(
        "operations", help="merges and splits: recent ones, or one with its progress per peer"
    )
    operations.add_argument("id", nargs="?", metavar="OPERATION")
    operations.add_argument("--limit", type=int, default=20)
    operations.add_argument("--wait", action="store_true", help=wait_help)
    operations.set_defaults(run=cmd_operations, asynchronous=True)
    add_event_commands(commands, _pool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "idempotency_key", "") is None:
        args.idempotency_key = str(uuid.uuid4())
    config: Config | None = None
    try:
        config = load_config(args.config)
        if args.data_dir is not None:
            config.database.data_dir = args.data_dir
        run: Callable[[Config, argparse.Namespace], Any] = args.run
        if args.asynchronous:
            coroutine: Awaitable[int] = run(config, args)
            return asyncio.run(coroutine)  # type: ignore[arg-type]
        return int(run(config, args))
    except (ConfigError, MigrationError) as exc:
        _say(f"broker: {exc}")
        return 2
    except BrokerError as exc:
        _say(f"broker: {exc.detail}")
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        if config is not None and config.database.url is None:
            _say(
                f"broker: the embedded PostgreSQL in {config.database.data_dir} could not start "
                f"or be reached: {exc}. Check that directory (--data-dir, BROKER_DATA_DIR), or "
                "use a server of your own: [database] url (BROKER_DATABASE_URL)."
            )
        else:
            _say(
                f"broker: the database is not reachable: {exc}. "
                "Check [database] url (BROKER_DATABASE_URL)."
            )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
