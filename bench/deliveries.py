"""Delivery benchmark: how fast the outbox drains into push peers, against the same peers written
to directly by a plain client with the same concurrency, in one run.

Home and the peers are real scim2-server processes (peers are tenants of one process per peer),
or with ``--servers memory`` the fast in-memory service of ``bench/store.py``.
N users are created in home; their syncs are enqueued at once (as the home poller or the
home-facing endpoint would) and the broker's worker drains them. The direct figure is N POSTs of
the same users straight to a fresh tenant of each peer.

The worker's pool is made as ``broker serve`` makes it: its size (``worker_pool_size``; since
2026-12-06 16:10, ``concurrency`` per peer before, 3 to 5% faster toward five peers), and commits
that do not wait for the WAL flush (``--synchronous-commit on`` for the figures measured before
2026-12-06 14:00, which waited).

    python bench/deliveries.py [--users 300] [--peers 1 5] [--concurrency 4] [--servers memory]
                               [--synchronous-commit off|on] [--count-statements] [--scoped]

Uses the embedded PostgreSQL in a temporary directory unless BROKER_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import asyncpg

from broker.db import create_pool, init_connection, migrated_pool
from broker.domains import DomainStore
from broker.home import HomeClient
from broker.propagation.delivery import worker_pool_size
from broker.propagation.journal import record
from broker.propagation.worker import Deliverer, WorkerSettings
from broker.propagation.writes import HomeWrite

sys.path.insert(0, str(Path(__file__).parent))
from run import free_port, wait_for

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"

SCOPED_PEER: dict[str, object] = {
    "scope_filter": "userName pr",
    "read_attributes": ["userName", "displayName", "title"],
}
"""A push peer with a scope and a read list (``--scoped``): every check of the delivery path in
play, every bench user in the scope, and the attributes they carry readable."""


@contextmanager
def scim_server(
    token: str,
    *args: str,
    memory: bool = False,
    latency: float = 0.0,
    port: int | None = None,
    bulk: bool = True,
) -> Iterator[str]:
    """A scim2-server process (``--dynamic-tenants``: tenants under ``/NAME/v2``), or with
    ``memory`` the fast in-memory service of ``bench/store.py`` (always with tenants; every
    answer ``latency`` seconds late; SCIM Bulk unless not ``bulk``), on ``port`` or a free one."""
    port = port or free_port()
    store = [sys.executable, str(Path(__file__).with_name("store.py")), str(port), token]
    command = (
        [*store, str(latency), *([] if bulk else ["--no-bulk"])]
        if memory
        else [
            sys.executable,
            "-m",
            "scim2_server.testserver.cli",
            "--port",
            str(port),
            "--bearer-token",
            token,
            *args,
        ]
    )
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        # With --dynamic-tenants, readiness is asked of a tenant of its own.
        probe = f"http://127.0.0.1:{port}" + ("/probe/v2" if "--dynamic-tenants" in args else "/v2")
        wait_for(probe + "/ServiceProviderConfig", {"Authorization": f"Bearer {token}"})
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def post(url: str, token: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


async def direct(
    urls: list[str], token: str, users: list[dict[str, object]], concurrency: int
) -> float:
    """Seconds for a plain client to POST every user to every peer, ``concurrency`` per peer."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:

        async def one_peer(url: str) -> None:
            gate = asyncio.Semaphore(concurrency)

            async def one(user: dict[str, object]) -> None:
                async with gate, session.post(f"{url}/Users", json=user) as response:
                    assert response.status == 201, await response.text()

            await asyncio.gather(*(one(u) for u in users))

        started = time.perf_counter()
        await asyncio.gather(*(one_peer(u) for u in urls))
        return time.perf_counter() - started


def postgres_pids(data_dir: Path) -> list[int]:
    """The embedded PostgreSQL's processes (its postmaster and backends), found with psutil
    (optional); none with BROKER_DATABASE_URL or without psutil."""
    try:
        import psutil  # optional: not a dependency of the project
    except ImportError:
        return []
    pids: list[int] = []
    for candidate in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(candidate.info["cmdline"] or [])
        if candidate.info["name"] == "postgres" and str(data_dir.resolve()) in cmdline:
            pids += [candidate.pid, *(c.pid for c in candidate.children(recursive=True))]
    return pids


def postgres_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds each of the processes ``pids`` used so far (user and system)."""
    used: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


@asynccontextmanager
async def worker_pool(
    url: str, size: int, statements: list[str] | None, synchronous_commit: str
) -> AsyncIterator[asyncpg.Pool]:
    """The delivery worker's pool as ``broker serve`` makes it (``broker/app.py``: its commits do
    not wait for the WAL flush, unless ``synchronous_commit`` is "on"); with ``statements``, its
    connections append every statement they send to it (asyncpg's query logger)."""
    settings = {"synchronous_commit": synchronous_commit}
    if statements is None:
        pool = await create_pool(url, min_size=1, max_size=size, settings=settings)
    else:
        logged = statements

        async def init(conn: asyncpg.Connection) -> None:
            await init_connection(conn)
            conn.add_query_logger(lambda query: logged.append(query.query))

        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=size,
            init=init,
            reset=_no_reset,
            server_settings=settings,
        )
    try:
        yield pool
    finally:
        await pool.close()


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """As the broker's pools: nothing to reset on release."""


async def through_broker(
    db_url: str | None,
    data_dir: Path,
    home_url: str,
    token: str,
    peer_urls: list[str],
    home_ids: list[str],
    concurrency: int,
    statements: list[str] | None = None,
    synchronous_commit: str = "off",
    scoped: bool = False,
) -> tuple[float, float, float]:
    """Seconds to drain, and the CPU seconds the broker (this process) and PostgreSQL used."""
    os.environ["BENCH_PEER_TOKEN"] = token
    async with (
        migrated_pool(db_url, data_dir, max_size=concurrency * len(peer_urls) + 4) as (
            pool,
            url,
        ),
        worker_pool(url, worker_pool_size(concurrency), statements, synchronous_commit) as workers,
    ):
        await pool.execute(
            "TRUNCATE outbox, peer_copies, id_mappings, entities, domain_tokens, domains CASCADE"
        )
        domains = DomainStore(pool)
        for n, url in enumerate(peer_urls):
            await domains.add(
                f"P{n}",
                scim_url=url,
                credential_ref="env:BENCH_PEER_TOKEN",
                push=True,
                **(SCOPED_PEER if scoped else {}),  # type: ignore[arg-type]
            )
        async with aiohttp.ClientSession() as session, HomeClient(home_url, token) as home:
            worker = Deliverer(
                workers,
                home,
                session,
                id_pattern="[0-9a-f]{32}",
                settings=WorkerSettings(concurrency=concurrency),
            )
            async with pool.acquire() as conn, conn.transaction():
                await record(conn, HomeWrite(written=dict.fromkeys(home_ids, "User")))
            # Backends the pool opens during the drain count in full.
            pg_before, cpu_before = postgres_cpu(postgres_pids(data_dir)), time.process_time()
            started = time.perf_counter()
            await worker.drain(within=3600)
            elapsed = time.perf_counter() - started
            broker_cpu = time.process_time() - cpu_before
            pg_after = postgres_cpu(postgres_pids(data_dir))
            pg_cpu = sum(used - pg_before.get(pid, 0.0) for pid, used in pg_after.items())
            recorder = getattr(worker.syncs.writes, "recorder", None)  # absent before batching
            if recorder is not None and recorder.batcher.batches:
                done, batches = recorder.batcher.items, recorder.batcher.batches
                print(
                    f"recorded in batches: {done} deliveries in {batches} transactions "
                    f"({done / batches:.1f} each)"
                )
            reads = getattr(worker.syncs.reads, "sent", None)  # counted since issue 15
            if reads is not None:
                print(f"home read {reads} times for {len(home_ids) * len(peer_urls)} deliveries")
            clients = getattr(worker.syncs.tools.clients, "_clients", {})
            combiners = [c.combiner for c in clients.values()]
            bulks = sum(c.bulk_requests for c in combiners)
            if bulks:
                operations = sum(c.bulk_operations for c in combiners)
                print(
                    f"SCIM Bulk: {operations} writes in {bulks} requests "
                    f"({operations / bulks:.1f} each)"
                )
            left = await pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'done'")
            assert left == 0, f"{left} deliveries did not finish"
            return elapsed, broker_cpu, pg_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--servers",
        choices=["scim2-server", "memory"],
        default="scim2-server",
        help="home and peers: scim2-server processes, or the fast in-memory bench/store.py",
    )
    parser.add_argument(
        "--no-bulk",
        action="store_true",
        help="the in-memory peers say bulk.supported false: one request per write",
    )
    parser.add_argument(
        "--count-statements",
        action="store_true",
        help="count the worker's statements and transactions per delivery (asyncpg's query "
        "logger: a little more broker CPU)",
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=["off", "on"],
        default="off",
        help="the worker pool's synchronous_commit: off as broker serve runs it; on, as this "
        "benchmark measured before 2026-12-06 14:00 (each commit waits for the WAL flush)",
    )
    parser.add_argument(
        "--scoped",
        action="store_true",
        help="every peer with a scope and a read list (SCOPED_PEER in bench/deliveries.py)",
    )
    args = parser.parse_args()
    load = os.getloadavg()
    token = secrets.token_hex(8)
    memory = args.servers == "memory"
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        home = stack.enter_context(scim_server(token, memory=memory)) + "/v2"
        peer_hosts = [
            stack.enter_context(
                scim_server(token, "--dynamic-tenants", memory=memory, bulk=not args.no_bulk)
            )
            for _ in range(max(args.peers))
        ]
        users = [
            {
                "schemas": [CORE_USER],
                "userName": f"bench-{uuid.uuid4().hex[:12]}",
                "displayName": "Bench User",
                "title": "benchmark",
            }
            for _ in range(args.users)
        ]
        home_ids = [str(post(home + "/Users", token, u)["id"]) for u in users]
        for count in args.peers:
            tenant = uuid.uuid4().hex[:8]
            direct_s = asyncio.run(
                direct(
                    [f"{h}/direct-{tenant}/v2" for h in peer_hosts[:count]],
                    token,
                    users,
                    args.concurrency,
                )
            )
            statements: list[str] | None = [] if args.count_statements else None
            broker_s, broker_cpu, pg_cpu = asyncio.run(
                through_broker(
                    os.environ.get("BROKER_DATABASE_URL"),
                    Path(tmp) / "pg",
                    home,
                    token,
                    [f"{h}/broker-{tenant}/v2" for h in peer_hosts[:count]],
                    home_ids,
                    args.concurrency,
                    statements,
                    args.synchronous_commit,
                    args.scoped,
                )
            )
            total = args.users * count
            if statements is not None:
                begins = sum(1 for q in statements if q.lstrip().upper().startswith("BEGIN"))
                print(
                    f"{count} peers: {len(statements) / total:.2f} statements and "
                    f"{begins / total:.2f} explicit transactions per delivery"
                )
                kinds = Counter(q.strip().splitlines()[0][:70] for q in statements)
                for kind, n in kinds.most_common(8):
                    print(f"  {n / total:.3f} per delivery: {kind}")
            rows.append(
                (count, total / direct_s, total / broker_s, broker_cpu / total, pg_cpu / total)
            )
    print(
        f"{args.users} users, concurrency {args.concurrency} per peer, home and peers: "
        f"{args.servers}, the worker's synchronous_commit {args.synchronous_commit}"
        + (", peers with a scope and a read list" if args.scoped else "")
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load)}")
    print(
        "| peers | direct POSTs/s | broker deliveries/s | broker / direct "
        "| broker CPU us/delivery | PostgreSQL CPU us/delivery |"
    )
    print("|---|---|---|---|---|---|")
    for count, d, b, bc, pc in rows:
        print(f"| {count} | {d:.0f} | {b:.0f} | {b / d:.0%} | {bc * 1e6:.0f} | {pc * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
