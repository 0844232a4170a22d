"""``broker merge``, ``broker split`` and ``broker operations`` (with their progress per peer)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from broker.cli.common import actor, pool
from broker.config import Config
from broker.db import query
from broker.errors import BrokerError
from broker.mapping.render import TASK_HEADER, mapping_table, peer_tasks
from broker.mapping.store import (
    MappingStore,
    Operation,
    Preview,
    merge_planner,
    split_planner,
)
from broker.output import say, table, when

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_merge", "cmd_operations", "cmd_split", "dry_run_text", "moves", "register"]

KEY_HELP = "makes a retry of this command the same operation (default: a new random key)"
WAIT_HELP = "show progress until the peers have followed (needs `broker serve` running)"
DRY_RUN_HELP = "print the mapping table before and after and each peer's tasks; change nothing"
HINT_AFTER = 30.0
"""Seconds without progress before ``--wait`` asks whether ``broker serve`` runs."""


def register(commands: Commands) -> None:
    """``merge``, ``split`` and ``operations``."""
    merge = commands.add_parser(
        "merge", help="merge entities found to be one (false negative); peers follow"
    )
    merge.add_argument("survivor", metavar="SURVIVOR")
    merge.add_argument("losers", nargs="+", metavar="LOSER")
    merge.add_argument("--idempotency-key", default=None, help=KEY_HELP)
    merge.add_argument("--wait", action="store_true", help=WAIT_HELP)
    merge.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    merge.set_defaults(run=cmd_merge, asynchronous=True)
    _register_split(commands)
    operations = commands.add_parser(
        "operations",
        help="merges, splits and reconciliations: recent ones, or one with its progress per peer",
    )
    operations.add_argument("id", nargs="?", metavar="OPERATION")
    operations.add_argument("--limit", type=int, default=20)
    operations.add_argument("--wait", action="store_true", help=WAIT_HELP)
    operations.set_defaults(run=cmd_operations, asynchronous=True)


def _register_split(commands: Commands) -> None:
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
    split.add_argument("--idempotency-key", default=None, help=KEY_HELP)
    split.add_argument("--wait", action="store_true", help=WAIT_HELP)
    split.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    split.set_defaults(run=cmd_split, asynchronous=True)


def moves(new: Sequence[str], specs: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """--move DOMAIN:EXTERNAL_ID (to the first new entity) or NEW=DOMAIN:EXTERNAL_ID."""
    moved: dict[str, list[tuple[str, str]]] = {entity: [] for entity in new}
    for spec in specs:
        target, sep, ref = spec.partition("=")
        if not sep:
            target, ref = new[0], spec
        domain, colon, external_id = ref.partition(":")
        if target not in moved or not colon or not domain or not external_id:
            raise BrokerError(
                f"--move {spec}: write DOMAIN:EXTERNAL_ID, or NEW_ID=DOMAIN:EXTERNAL_ID naming one "
                "of the new entities",
                status=400,
            )
        moved[target].append((domain, external_id))
    return moved


async def cmd_merge(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        if args.dry_run:
            involved = [args.survivor, *args.losers]
            preview = await MappingStore(database).preview(
                involved, merge_planner(args.survivor, args.losers)
            )
            print(dry_run_text("merge", preview))
            return 0
        operation = await MappingStore(database).merge(
            args.survivor, args.losers, idempotency_key=args.idempotency_key, actor=actor()
        )
        return await _follow(database, operation, args.wait)


async def cmd_split(config: Config, args: argparse.Namespace) -> int:
    moved = moves(args.new, args.move)
    async with pool(config) as database:
        if args.dry_run:
            preview = await MappingStore(database).preview(
                [args.source, *moved], split_planner(args.source, moved, args.provision)
            )
            print(dry_run_text("split", preview))
            return 0
        operation = await MappingStore(database).split(
            args.source,
            moved,
            idempotency_key=args.idempotency_key,
            actor=actor(),
            provision=args.provision,
        )
        return await _follow(database, operation, args.wait)


async def cmd_operations(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        if args.id is None:
            await _recent(database, args.limit)
            return 0
        try:
            op_id = uuid.UUID(args.id)
        except ValueError:
            raise BrokerError(
                f"{args.id} is not an operation ID: `broker operations` lists them", status=404
            ) from None
        operation = await MappingStore(database).operation(op_id)
        return await _follow(database, operation, args.wait, announce=False)


async def _recent(database: asyncpg.Pool, limit: int) -> None:
    records = await database.fetch(query("recent_operations"), max(1, limit))
    rows = [
        (
            str(r["id"]),
            r["kind"],
            r["state"],
            when(r["created_at"], "-"),
            json.dumps(r["request"], separators=(",", ":")),
        )
        for r in records
    ]
    print(table(("operation", "kind", "state", "created", "request"), rows))


async def _follow(
    database: asyncpg.Pool, operation: Operation, wait: bool, *, announce: bool = True
) -> int:
    """Print the operation (and with ``wait``, its progress until it is done or failed)."""
    store = MappingStore(database)
    if announce:
        _announce(operation)
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
        if not hinted and time.monotonic() - quiet_since > HINT_AFTER:
            say(
                "nothing has moved for 30 s: is `broker serve` running, with [propagation] "
                "enabled and the peers reachable? (`broker deliveries list --state pending`)"
            )
            hinted = True
        await asyncio.sleep(0.5)
        operation = await store.operation(operation.id)
    return 1 if operation.state == "failed" else 0


def dry_run_text(kind: str, preview: Preview) -> str:
    """A dry run as seed 002 draws it: the table before, after, and each peer's tasks."""
    tasks = peer_tasks(preview.plan)
    return "\n".join(
        [
            f"dry run of the {kind}: nothing was changed",
            "",
            "The mapping table now:",
            mapping_table(preview.before),
            "",
            f"The mapping table after the {kind}:",
            mapping_table(preview.after),
            "",
            "What each peer will get:",
            table(TASK_HEADER, tasks) if tasks else "(no peer has anything to do)",
        ]
    )


def _announce(operation: Operation) -> None:
    if operation.replayed:
        say(f"key {operation.idempotency_key} named an earlier operation: nothing done again")
    else:
        say(
            f"{operation.kind} recorded (idempotency key {operation.idempotency_key}); "
            "the mapping table changed, the peers follow"
        )


def _progress_table(operation: Operation) -> str:
    if operation.kind == "reconcile":
        return _reconcile_table(operation)
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
    return head + "\n" + table(("domain", "state", "tasks done", "reason"), rows)


def _reconcile_table(operation: Operation) -> str:
    """A reconciliation: its counts per situation once it ran, and why it stopped if it did
    (``broker reconcile --json`` and the admin API give its items)."""
    head = f"reconcile {operation.id}: {operation.state}"
    lines = [head]
    for domain, p in sorted(operation.progress.items()):
        counts = p.get("counts", {}).get("situations", {})
        found = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing"
        lines.append(f"{domain}: {p.get('state', '-')}: {found}")
        if p.get("reason"):
            lines.append(f"  {p['reason']}")
    if len(lines) == 1:
        lines[0] += " (under way)"
    return "\n".join(lines)
