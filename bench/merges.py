"""Merge benchmark: how many merges per second the broker commits, and how long its peers take to
follow N merges, against a trivial transaction and the peers' own speed in the same run.

Home and the peers are real scim2-server processes (the peers are tenants of one process). 2N
users are created in home directly, and an account of each in every peer, by direct POSTs. Their
mapping rows are recorded in one batch per peer, as if the broker had provisioned them. Then:

A. N merges (survivor user 2i, loser 2i+1) go through MappingStore.merge, ``--concurrency`` at a
   time, while no worker runs. Each commits the mapping change, its operation, its audit row and
   two outbox rows per peer (move_memberships, delete_alias). The comparison: N transactions of
   one outbox row and one audit row each, with the same concurrency, on the same database.
B. `broker serve` starts (the production entry point, a process of its own) and delivers the
   clean-up until no delivery is waiting or in flight and every operation is done. The
   comparison: N DELETEs of fresh accounts straight to each peer, with the same concurrency per
   peer, measured first.

At the end each peer must hold exactly the N survivors, and no mapping row may still wait for a
deletion.

    python bench/merges.py [--merges 10000] [--peers 5] [--concurrency 8]

Uses the embedded PostgreSQL in a temporary directory unless BROKER_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from broker.db import create_pool, query
from broker.domains import DomainStore
from broker.mapping.store import MappingStore, mint_ids

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    PEER_TOKEN_ENV,
    CpuMeter,
    analyze,
    bench_users,
    broker_serve,
    cpu_table,
    create_users,
    database,
    processes,
)
from deliveries import CORE_USER, scim_server

# One batch per peer: the rows the broker would have written when it provisioned the accounts.
INSERT_MAPPINGS = """
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         correlation_handle)
SELECT i, $1, e, true, 'peer', 'active', h
FROM unnest($2::text[], $3::text[], $4::text[]) AS m(i, e, h)
"""

# The trivial transaction: one outbox row (already done, so that no worker picks it up; its
# insert still notifies) and one audit row.
TRIVIAL_OUTBOX = """
INSERT INTO outbox (domain_id, internal_id, kind, state, payload)
VALUES ($1, $2, 'sync', 'done', '{"bench": "trivial"}')
"""


@dataclass
class Result:
    load: float
    create_s: float = 0.0
    merge_s: float = 0.0
    trivial_s: float = 0.0
    direct_s: float = 0.0
    startup_s: float = 0.0
    """From the broker process's start until its first delivery finished."""
    quiesce_s: float = 0.0
    """From the broker process's start until nothing waits and every operation is done."""
    last_delivery_s: float = 0.0
    """From the broker process's start until its last delivery finished."""
    deliveries: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)
    losers_held: int = 0
    survivors_missing: int = 0
    deletion_required: int = 0
    undone: int = 0
    operations_not_done: int = 0


def peer_accounts(count: int, prefix: str) -> list[dict[str, object]]:
    return [
        {"schemas": [CORE_USER], "userName": f"{prefix}-{uuid.uuid4().hex[:12]}"}
        for _ in range(count)
    ]


async def delete_all(base: str, token: str, ids: list[str], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:

        async def one(account: str) -> None:
            async with gate, session.delete(f"{base}/Users/{account}") as response:
                assert response.status == 204, await response.text()

        await asyncio.gather(*(one(i) for i in ids))


async def ids_held(base: str, token: str) -> set[str]:
    """Every user ID a peer tenant holds, a page at a time."""
    held: set[str] = set()
    start = 1
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        while True:
            params = {"attributes": "id", "startIndex": str(start), "count": "1000"}
            async with session.get(f"{base}/Users", params=params) as response:
                page = await response.json(content_type=None)
            resources = page.get("Resources", [])
            held.update(r["id"] for r in resources)
            start += len(resources)
            if not resources or start > int(page["totalResults"]):
                return held


async def bounded(count: int, concurrency: int, make: Callable[[int], Awaitable[None]]) -> float:
    """Seconds to run ``make(i)`` for every i below ``count``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await make(i)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started


async def run(args: argparse.Namespace, tmp: Path, home: str, token: str, peer: str) -> Result:
    n, result = args.merges, Result(args.load)
    tag = uuid.uuid4().hex[:8]
    peers = [f"{peer}/p{k}-{tag}/v2" for k in range(args.peers)]

    # ------------------------------------------------------------ data, created directly
    started = time.perf_counter()
    home_ids, *peer_ids = await asyncio.gather(
        create_users(home, token, bench_users(2 * n, "merge"), args.create_concurrency),
        *(
            create_users(url, token, peer_accounts(3 * n, f"p{k}"), args.create_concurrency)
            for k, url in enumerate(peers)
        ),
    )
    result.create_s = time.perf_counter() - started
    print(
        f"bench: {2 * n} users in home, {3 * n} accounts in each of {args.peers} peers, "
        f"in {result.create_s:.0f}s",
        file=sys.stderr,
    )

    # The peers' own speed: the last N accounts of each peer, deleted straight, concurrently.
    started = time.perf_counter()
    await asyncio.gather(
        *(
            delete_all(url, token, ids[2 * n :], args.delivery_concurrency)
            for url, ids in zip(peers, peer_ids, strict=True)
        )
    )
    result.direct_s = time.perf_counter() - started
    print(f"bench: {n * args.peers} direct DELETEs in {result.direct_s:.1f}s", file=sys.stderr)

    async with database(tmp / "pg") as (small_pool, db_url):
        pool = await create_pool(db_url, max_size=args.concurrency + 2)
        try:
            domains = DomainStore(small_pool)
            for k, url in enumerate(peers):
                await domains.add(
                    f"P{k}", scim_url=url, credential_ref=f"env:{PEER_TOKEN_ENV}", push=True
                )
            await small_pool.execute(query("register_entities"), home_ids, ["User"] * len(home_ids))
            for k, ids in enumerate(peer_ids):
                await small_pool.execute(
                    INSERT_MAPPINGS, f"P{k}", home_ids, ids[: 2 * n], mint_ids(2 * n)
                )
            await analyze(small_pool)

            # ------------------------------------------------------------ A: merges committed
            async def trivial(i: int) -> None:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(TRIVIAL_OUTBOX, "P0", home_ids[i])
                    await conn.execute(
                        query("audit"), "bench", "trivial", home_ids[i], {"bench": i}
                    )

            result.trivial_s = await bounded(n, args.concurrency, trivial)
            print(f"bench: {n} trivial transactions in {result.trivial_s:.1f}s", file=sys.stderr)
            await small_pool.execute("DELETE FROM outbox WHERE payload ? 'bench'")
            # Their audit rows stay: the log is append-only (0013), and nothing counts them.

            store = MappingStore(pool)

            async def merge(i: int) -> None:
                await store.merge(
                    home_ids[2 * i],
                    [home_ids[2 * i + 1]],
                    idempotency_key=f"bench-{tag}-{i}",
                    actor="bench",
                )

            result.merge_s = await bounded(n, args.concurrency, merge)
            print(f"bench: {n} merges in {result.merge_s:.1f}s", file=sys.stderr)
        finally:
            await pool.close()
        await small_pool.execute("VACUUM ANALYZE outbox")
        await analyze(small_pool)
        queued = await small_pool.fetchval(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
        )
        assert queued == 2 * n * args.peers, f"{queued} deliveries queued for {n} merges"

        # ------------------------------------------------------------ B: time to quiescence
        print(f"bench: {queued} deliveries queued; starting the broker", file=sys.stderr)
        t0 = time.time()
        async with broker_serve(
            db_url,
            home,
            token,
            token,
            tmp,
            home_poll_interval=0,
            concurrency=args.delivery_concurrency,
        ) as broker:
            print(f"bench: broker pid {broker.pid}", file=sys.stderr)
            meter = CpuMeter(lambda: processes(broker.pid, tmp / "pg"))
            meter.start()
            deadline = time.monotonic() + args.timeout
            polls = 0
            while True:
                depth, open_ops = await small_pool.fetchrow(
                    "SELECT (SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')),"
                    " (SELECT count(*) FROM operations WHERE state IN ('pending', 'propagating'))"
                )
                if depth == 0 and open_ops == 0:
                    break
                polls += 1
                if polls % 50 == 0:
                    print(
                        f"bench: {time.time() - t0:.0f}s: {depth} deliveries waiting, "
                        f"{open_ops} operations open",
                        file=sys.stderr,
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{depth} deliveries waiting after {args.timeout}s")
                await asyncio.sleep(0.2)
            result.quiesce_s = time.time() - t0
            result.cpu = meter.stop()
        span = await small_pool.fetchrow(
            "SELECT min(updated_at) AS first, max(updated_at) AS last, count(*) AS done "
            "FROM outbox WHERE state = 'done'"
        )
        result.startup_s = span["first"].timestamp() - t0
        result.last_delivery_s = span["last"].timestamp() - t0
        result.deliveries = span["done"]
        result.kinds = {
            r["kind"]: r["count"]
            for r in await small_pool.fetch(
                "SELECT kind, count(*) FROM outbox WHERE state = 'done' GROUP BY kind"
            )
        }
        result.undone = await small_pool.fetchval(
            "SELECT count(*) FROM outbox WHERE state <> 'done'"
        )
        result.operations_not_done = await small_pool.fetchval(
            "SELECT count(*) FROM operations WHERE state <> 'done'"
        )
        result.deletion_required = await small_pool.fetchval(
            "SELECT count(*) FROM id_mappings WHERE state = 'deletion_required'"
        )

    # ------------------------------------------------------------ the peers hold the survivors
    for url, ids in zip(peers, peer_ids, strict=True):
        held = await ids_held(url, token)
        result.held.append(len(held))
        result.survivors_missing += len(set(ids[0 : 2 * n : 2]) - held)
        result.losers_held += len(set(ids[1 : 2 * n : 2]) & held)
    return result


def report(args: argparse.Namespace, r: Result) -> str:
    n, p = args.merges, args.peers
    merges_rate, trivial_rate = n / r.merge_s, n / r.trivial_s
    direct_rate = n * p / r.direct_s
    deliver_s = r.last_delivery_s - r.startup_s
    broker_rate = r.deliveries / deliver_s
    deletes_rate = n * p / deliver_s
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores "
        f"(load average {r.load:.1f} before the run), {n} merges, {p} peers, "
        f"{args.concurrency} merges in flight, delivery concurrency {args.delivery_concurrency} "
        "per peer.",
        "",
        "| measure | seconds | per second |",
        "|---|---|---|",
        f"| trivial: {n} transactions of one outbox row and one audit row | {r.trivial_s:.1f} "
        f"| {trivial_rate:.0f} |",
        f"| **merges committed** (worker stopped) | {r.merge_s:.1f} | **{merges_rate:.0f}** |",
        f"| merge / trivial | | {merges_rate / trivial_rate:.0%} |",
        f"| direct: {n * p} DELETEs straight to the peers ({n} each) | {r.direct_s:.1f} "
        f"| {direct_rate:.0f} |",
        f"| broker: start until the first delivery | {r.startup_s:.1f} | |",
        f"| broker: {r.deliveries} deliveries, first to last | {deliver_s:.1f} "
        f"| {broker_rate:.0f} |",
        f"| broker: alias DELETEs among them | | {deletes_rate:.0f} |",
        f"| **broker / direct** (alias DELETEs) | | **{deletes_rate / direct_rate:.0%}** |",
        f"| **time to quiescence** (start until all {n} operations done) | **{r.quiesce_s:.1f}**"
        f" | {n / r.quiesce_s:.0f} merges |",
        "",
        f"- deliveries done by kind: {r.kinds}; not done: {r.undone}; "
        f"operations not done: {r.operations_not_done}",
        f"- accounts each peer holds at the end: {r.held} (expected {n}); survivors missing: "
        f"{r.survivors_missing}; losers still held: {r.losers_held}; "
        f"mapping rows still deletion_required: {r.deletion_required}",
        f"- setup (created directly): {2 * n} home users and {3 * n * p} peer accounts in "
        f"{r.create_s:.0f}s",
        "",
        f"CPU over the {r.quiesce_s:.0f}s from the broker's start to quiescence:",
        "",
        *cpu_table(r.cpu, r.quiesce_s),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=10_000, help="merges (2N users)")
    parser.add_argument("--peers", type=int, default=5, help="push peers")
    parser.add_argument("--concurrency", type=int, default=8, help="merge calls in flight")
    parser.add_argument(
        "--delivery-concurrency",
        type=int,
        default=4,
        help="deliveries in flight per peer, and direct DELETEs in flight per peer",
    )
    parser.add_argument(
        "--create-concurrency", type=int, default=8, help="POSTs in flight creating the data"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds quiescence may take")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]  # other work on the machine, for the reader
    token = secrets.token_hex(8)
    os.environ[PEER_TOKEN_ENV] = token
    with (
        tempfile.TemporaryDirectory(prefix="broker-merges-") as tmp,
        scim_server(token) as home,
        scim_server(token, "--dynamic-tenants") as peer,
    ):
        result = asyncio.run(run(args, Path(tmp), home + "/v2", token, peer))
    print(report(args, result))
    ok = (
        result.held == [args.merges] * args.peers
        and not result.survivors_missing
        and not result.losers_held
        and not result.deletion_required
        and not result.undone
        and not result.operations_not_done
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
