"""Catch-up benchmark: how fast the broker drains a long queue toward one push peer after an
outage, and how much memory it holds meanwhile, against the peer's own speed in the same run.

Home and the peer are real scim2-server processes, or with ``--servers memory`` the in-memory
service of ``bench/store.py`` (``--peer-latency MS``: the peer answers that late). N users are created in home directly, and a
sync of each toward the peer is put in the outbox (as the home poller or the home-facing
endpoint would) while no broker runs: the outage is modelled as a broker whose worker was not
delivering, so that the queue is whole when delivery starts. Then `broker serve` starts (the
production entry point, a process of its own) and drains the queue; its resident memory is
sampled every second. The comparison is N POSTs of the same users straight to a fresh tenant of
a fresh peer process, with the same concurrency, measured first.

With ``--outage SECONDS`` the outage is a real one: the broker starts with the queue whole and
the peer down (nothing listens on its port), retries, backs off and quarantines it with its
default settings, and the peer process starts SECONDS later. The report then also says how long
after the peer came back the first delivery landed.

    python bench/catchup.py [--queued 50000] [--concurrency 4] [--outage 600]

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
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from broker.domains import DomainStore
from broker.propagation.journal import record
from broker.propagation.writes import HomeWrite

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
    outbox_depth,
    processes,
    rss_mib,
)
from deliveries import direct, scim_server
from run import free_port


@dataclass
class Sample:
    at: float
    """Seconds since the broker process was started."""
    rss_mib: float
    depth: int


@dataclass
class Drain:
    startup: float
    """From the broker process's start until its first delivery finished, in seconds."""
    total: float
    """From the broker process's start until its last delivery finished, in seconds."""
    samples: list[Sample]
    cpu: dict[str, float]
    undone: int
    """Deliveries not done at the end (dead letters, for example)."""
    held: int
    """Users the peer holds at the end."""
    back: float | None = None
    """With ``--outage``: when the peer came back, in seconds since the broker's start."""


async def drain(
    args: argparse.Namespace,
    tmp: Path,
    home: str,
    token: str,
    peer: str,
    users: list[dict[str, object]],
    come_back: Callable[[], AbstractContextManager[str]] | None = None,
) -> Drain:
    """Drain the queue toward ``peer``; with ``come_back``, the peer is down until it is
    entered, ``args.outage`` seconds after the broker's start."""
    started = time.perf_counter()
    ids = await create_users(home, token, users, args.create_concurrency)
    print(
        f"bench: {len(ids)} users created in home in {time.perf_counter() - started:.0f}s",
        file=sys.stderr,
    )
    async with database(tmp / "pg") as (pool, db_url):
        await DomainStore(pool).add(
            "P0", scim_url=peer, credential_ref=f"env:{PEER_TOKEN_ENV}", push=True
        )
        async with pool.acquire() as conn, conn.transaction():
            await record(conn, HomeWrite(written=dict.fromkeys(ids, "User")))
        if not args.stale_statistics:
            await analyze(pool)
        queued = await outbox_depth(pool)
        assert queued == args.queued, f"{queued} deliveries queued for {args.queued} users"
        print(f"bench: {queued} deliveries queued; starting the broker", file=sys.stderr)
        samples: list[Sample] = []
        back: float | None = None
        t0 = time.time()
        with ExitStack() as revived:
            async with broker_serve(
                db_url,
                home,
                token,
                token,
                tmp,
                home_poll_interval=0,
                concurrency=args.concurrency,
            ) as broker:
                print(f"bench: broker pid {broker.pid}", file=sys.stderr)
                meter = CpuMeter(lambda: processes(broker.pid, tmp / "pg"))
                meter.start()
                deadline = time.monotonic() + args.timeout
                while True:
                    if come_back is not None and back is None and time.time() - t0 >= args.outage:
                        await asyncio.to_thread(revived.enter_context, come_back())
                        back = time.time() - t0
                        print(f"bench: {back:.0f}s: the peer is back", file=sys.stderr)
                    depth = await outbox_depth(pool)
                    samples.append(Sample(time.time() - t0, rss_mib(broker.pid), depth))
                    if len(samples) % 30 == 0:
                        print(
                            f"bench: {samples[-1].at:.0f}s: {depth} waiting, "
                            f"RSS {samples[-1].rss_mib:.0f} MiB",
                            file=sys.stderr,
                        )
                    if depth == 0 and (come_back is None or back is not None):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{depth} deliveries still waiting after {args.timeout}s"
                        )
                    await asyncio.sleep(1)
                cpu = meter.stop()
                held = await peer_holds(peer, token)
        span = await pool.fetchrow(
            "SELECT min(updated_at) AS first, max(updated_at) AS last FROM outbox "
            "WHERE state = 'done'"
        )
        assert span is not None and span["first"] is not None, "nothing was delivered"
        undone = await pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'done'")
    return Drain(
        span["first"].timestamp() - t0,
        span["last"].timestamp() - t0,
        samples,
        cpu,
        undone,
        held,
        back,
    )


async def peer_holds(peer: str, token: str) -> int:
    """How many users the peer holds."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
        session.get(f"{peer}/Users", params={"count": "1", "attributes": "id"}) as response,
    ):
        return int((await response.json(content_type=None))["totalResults"])


def report(args: argparse.Namespace, direct_s: float, result: Drain) -> str:
    n = args.queued
    samples = result.samples
    # Memory once 10% of the queue is delivered: the base the rest is compared with.
    settled = next(s for s in samples if s.depth <= 0.9 * n)
    peak = max(samples, key=lambda s: s.rss_mib)
    broker_rate = n / (result.total - result.startup)
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores "
        f"(load average {args.load:.1f} before the run), "
        f"{n} deliveries queued toward one peer, concurrency {args.concurrency}, "
        f"home and peer: {args.servers}"
        + (f", the peer answering {args.peer_latency:g} ms late" if args.peer_latency else "")
        + ".",
        "",
        "| measure | seconds | per second |",
        "|---|---|---|",
        f"| direct: {n} POSTs straight to the peer | {direct_s:.1f} | {n / direct_s:.0f} |",
        f"| broker: start until the first delivery | {result.startup:.1f} | |",
        f"| broker: first delivery until the queue is empty | {result.total - result.startup:.1f} "
        f"| {broker_rate:.0f} |",
        f"| broker / direct | | {broker_rate / (n / direct_s):.0%} |",
    ]
    if result.back is not None:
        lines += [
            f"| the peer down from the broker's start until | {result.back:.1f} | |",
            f"| the peer back until the first delivery | {result.startup - result.back:.1f} | |",
            f"| the peer back until the queue is empty | {result.total - result.back:.1f} | |",
        ]
    lines += [
        "",
        "| broker RSS MiB: ready | after 10% delivered | max | at the end | max - after 10% |",
        "|---|---|---|---|---|",
        f"| {samples[0].rss_mib:.0f} | {settled.rss_mib:.0f} | {peak.rss_mib:.0f} "
        f"(at {peak.at:.0f}s) | {samples[-1].rss_mib:.0f} | {peak.rss_mib - settled.rss_mib:+.0f} |",
        "",
        "| progress | seconds since start | deliveries/s since the previous row | RSS MiB |",
        "|---|---|---|---|",
    ]
    previous_at, previous_left = result.startup, n
    for share in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        row = next(s for s in samples if s.depth <= (1 - share) * n)
        if row.at == previous_at:
            continue  # reached within the same sample as the row before
        rate = (previous_left - row.depth) / (row.at - previous_at)
        lines.append(f"| {share:.0%} | {row.at:.0f} | {rate:.0f} | {row.rss_mib:.0f} |")
        previous_at, previous_left = row.at, row.depth
    lines += [
        "",
        f"- the peer holds {result.held} users; deliveries not done: {result.undone}",
        "",
        f"CPU over the {samples[-1].at:.0f}s from the broker's start to the empty queue:",
        "",
        *cpu_table(result.cpu, samples[-1].at),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=50_000, help="deliveries queued")
    parser.add_argument("--concurrency", type=int, default=4, help="deliveries in flight")
    parser.add_argument(
        "--create-concurrency", type=int, default=8, help="POSTs in flight creating home's users"
    )
    parser.add_argument(
        "--stale-statistics",
        action="store_true",
        help="start delivering before the planner's statistics know of the queue",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the drain may take")
    parser.add_argument(
        "--servers",
        choices=["scim2-server", "memory"],
        default="scim2-server",
        help="home and peer: scim2-server processes, or the fast in-memory bench/store.py",
    )
    parser.add_argument(
        "--peer-latency",
        type=float,
        default=0.0,
        help="milliseconds each answer of the in-memory peer waits, as a remote peer's would "
        "(with --servers memory)",
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=0.0,
        help="seconds the peer is down after the broker starts (a real outage; default: none, "
        "the queue waits for a broker that was not running)",
    )
    args = parser.parse_args()
    args.load = os.getloadavg()[0]  # other work on the machine, for the reader
    token = secrets.token_hex(8)
    tenant = uuid.uuid4().hex[:8]
    memory = args.servers == "memory"
    if args.peer_latency and not memory:
        parser.error("--peer-latency needs --servers memory")
    slow = args.peer_latency / 1000
    port = free_port()

    def peer_process() -> AbstractContextManager[str]:
        return scim_server(token, "--dynamic-tenants", memory=memory, latency=slow, port=port)

    with (
        tempfile.TemporaryDirectory(prefix="broker-catchup-") as tmp,
        scim_server(token, memory=memory) as home,
    ):
        users = bench_users(args.queued, "catchup")
        with scim_server(token, "--dynamic-tenants", memory=memory, latency=slow) as peer:
            print(f"bench: {args.queued} POSTs straight to the peer", file=sys.stderr)
            direct_s = asyncio.run(
                direct([f"{peer}/direct-{tenant}/v2"], token, users, args.concurrency)
            )
        peer = f"http://127.0.0.1:{port}/broker-{tenant}/v2"
        if args.outage:
            result = asyncio.run(
                drain(args, Path(tmp), home + "/v2", token, peer, users, peer_process)
            )
        else:
            with peer_process():
                result = asyncio.run(drain(args, Path(tmp), home + "/v2", token, peer, users))
    print(report(args, direct_s, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
