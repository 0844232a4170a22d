"""Lag benchmark: how long a change made in home takes to reach a push peer at a steady rate of
changes, against the same writes' own round trip to home, in one run.

Home and the peers are real scim2-server processes (one per peer), or with ``--servers memory``
the in-memory service of ``bench/store.py``. The broker is `broker serve`,
a process of its own, with the home poller off: home's tools write through its home-facing
endpoint (`{admin}/home/scim/v2`, a token of the home domain), as the README describes. In front
of each peer sits a tap, a small reverse proxy in this process, that notes when each body carrying
a change's marker arrives and forwards it to the real peer.

Users are created through the broker first and reach the peers. Then, for `--duration` seconds
at `--rate` writes per second, PATCHes replace a user's `title` (users in turn) with a marker
holding a sequence number and a timestamp. Writes are sent open-loop, at fixed times whatever the
answers, so that a slow broker shows as lag and not as fewer writes. The lag of a write is the
time from when it was due to be sent until the peer first receives that value or a later one of
the same user (a sync delivers home's state when it runs, so a newer write can carry an older
one's change). The comparison is the same stream of writes sent straight to home, before.

    python bench/lag.py [--rate 200] [--duration 30] [--peers 1] [--users 500] [--concurrency 4]
                        [--servers memory] [--scoped]

Uses the embedded PostgreSQL in a temporary directory unless BROKER_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from broker.domains import DomainStore
from broker.tokens import TokenStore

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
    drained,
    outbox_depth,
    percentile,
    processes,
)
from deliveries import SCOPED_PEER, scim_server
from run import free_port

PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
MARK = re.compile(rb"lag-(\d+)-\d+")


def marker(seq: int) -> str:
    return f"lag-{seq}-{time.time_ns()}"


@dataclass
class Write:
    seq: int
    user: int
    due: float
    sent: float = math.nan
    answered: float = math.nan
    status: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Tap:
    """A reverse proxy in front of each peer (`/PEER/v2/...` to that peer's real URL) that notes
    when a body carrying a marker first arrives. It costs the broker one more hop per delivery."""

    def __init__(self, upstreams: dict[str, str]) -> None:
        self.upstreams = upstreams
        self.port = free_port()
        self.arrivals: dict[str, dict[int, float]] = {p: {} for p in upstreams}
        self.requests: dict[str, Counter[str]] = {p: Counter() for p in upstreams}
        self.times: dict[str, list[float]] = {p: [] for p in upstreams}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    def reset(self) -> None:
        """Forget the requests seen so far (not the arrivals of markers)."""
        for counts in self.requests.values():
            counts.clear()
        for times in self.times.values():
            times.clear()

    def url(self, peer: str) -> str:
        return f"http://127.0.0.1:{self.port}/{peer}/v2"

    async def _handle(self, request: web.Request) -> web.Response:
        peer, tail = request.match_info["peer"], request.match_info["tail"]
        body = await request.read()
        arrived = time.perf_counter()
        self.requests[peer][request.method] += 1
        self.times[peer].append(arrived)
        if body:
            seen = self.arrivals[peer]
            for match in MARK.finditer(body):
                seen.setdefault(int(match.group(1)), arrived)
        assert self._session is not None
        async with self._session.request(
            request.method,
            f"{self.upstreams[peer]}/{tail}",
            params=request.query,
            data=body or None,
            headers={
                k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")
            },
        ) as response:
            answer = await response.read()
            headers = {
                k: v
                for k, v in response.headers.items()
                if k in ("Content-Type", "Location", "ETag")
            }
            return web.Response(status=response.status, body=answer, headers=headers)

    async def __aenter__(self) -> Tap:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        app = web.Application(client_max_size=10 * 1024 * 1024)
        app.router.add_route("*", "/{peer}/v2/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


async def open_loop(
    rate: float, duration: float, users: int, send: Callable[[Write], Awaitable[int]]
) -> list[Write]:
    """``rate * duration`` writes, each started at its due time whatever the earlier ones are
    doing (open loop), users in turn."""
    writes: list[Write] = []
    tasks: list[asyncio.Task[None]] = []

    async def fire(write: Write) -> None:
        write.sent = time.perf_counter()
        try:
            write.status = await send(write)
        except (aiohttp.ClientError, TimeoutError):
            write.status = 0
        write.answered = time.perf_counter()

    start = time.perf_counter() + 0.05
    for seq in range(round(rate * duration)):
        write = Write(seq, seq % users, start + seq / rate)
        delay = write.due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        writes.append(write)
        tasks.append(asyncio.create_task(fire(write)))
    await asyncio.gather(*tasks)
    return writes


def lags(writes: Sequence[Write], arrivals: dict[int, float]) -> dict[int, float]:
    """Each successful write's lag: from its due time until the peer first received its value or
    a later one of the same user. Writes never seen at the peer are left out."""
    by_user: dict[int, list[Write]] = defaultdict(list)
    for write in writes:
        by_user[write.user].append(write)
    out = {}
    for user_writes in by_user.values():
        first_seen = math.inf  # the earliest arrival of this write's value or a later one
        for write in sorted(user_writes, key=lambda w: -w.seq):
            first_seen = min(first_seen, arrivals.get(write.seq, math.inf))
            if write.ok and first_seen < math.inf:
                out[write.seq] = first_seen - write.due
    return out


def row(name: str, values_s: Sequence[float], count: int, seconds: float) -> str:
    ms = [v * 1000 for v in values_s]
    return (
        f"| {name} | {count} | {count / seconds:.0f} | {percentile(ms, 50):.1f} "
        f"| {percentile(ms, 90):.1f} | {percentile(ms, 99):.1f} | {max(ms, default=math.nan):.1f} |"
    )


@dataclass
class Outcome:
    direct: list[Write]
    """The writes straight to home."""
    through: list[Write]
    """The writes through the broker's home-facing endpoint."""
    backlog: int
    """Deliveries waiting when the last write through the broker was answered."""
    peak: int
    """The most deliveries waiting at once, sampled every second."""
    drained_after: float
    """Seconds from the last answer until the outbox was empty."""
    dead: int
    cpu: dict[str, float]
    busy: float
    """Seconds of the CPU measurement: the writes through the broker and the drain."""
    behind: dict[str, int]
    """Per peer: users whose title at the peer differs from home's once the outbox is empty."""
    overtaken: int
    """Users whose final value in home is not their last write (a later write reached home
    before an earlier one): such a last write is never seen at a peer, rightly."""


async def titles(session: aiohttp.ClientSession, base: str, token: str) -> dict[str, str]:
    """userName -> title of every user of a SCIM service."""
    async with session.get(
        f"{base}/Users",
        params={"count": "100000", "attributes": "userName,title"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        body = await response.json(content_type=None)
    return {r["userName"]: r.get("title", "") for r in body.get("Resources", [])}


async def run(args: argparse.Namespace, tmp: Path, home: str, token: str, peers: list[str]) -> str:
    names = [f"P{n}" for n in range(len(peers))]
    tenant = uuid.uuid4().hex[:8]
    upstreams = {name: f"{host}/lag-{tenant}/v2" for name, host in zip(names, peers, strict=True)}
    users = bench_users(args.users, f"lag{tenant}")
    async with database(tmp / "pg") as (pool, db_url), Tap(upstreams) as tap:
        domains = DomainStore(pool)
        await domains.add("H", kind="home")
        for name in names:
            await domains.add(
                name,
                scim_url=tap.url(name),
                credential_ref=f"env:{PEER_TOKEN_ENV}",
                push=True,
                **(SCOPED_PEER if args.scoped else {}),  # type: ignore[arg-type]
            )
        tools_token, _ = await TokenStore(pool).issue("H")
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
            tools = f"{broker.admin_url}/home/scim/v2"
            started = time.perf_counter()
            ids = await create_users(tools, tools_token, users)
            await drained(pool, within=600)
            await analyze(pool)
            print(
                f"bench: {args.users} users created and delivered in "
                f"{time.perf_counter() - started:.1f}s",
                file=sys.stderr,
            )
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:

                def sender(
                    base: str, auth: str, mark: Callable[[int], str]
                ) -> Callable[[Write], Awaitable[int]]:
                    headers = {
                        "Authorization": f"Bearer {auth}",
                        "Content-Type": "application/scim+json",
                    }

                    async def send(write: Write) -> int:
                        body = {
                            "schemas": [PATCH_OP],
                            "Operations": [
                                {"op": "replace", "path": "title", "value": mark(write.seq)}
                            ],
                        }
                        async with session.patch(
                            f"{base}/Users/{ids[write.user]}", json=body, headers=headers
                        ) as response:
                            await response.read()
                            return response.status

                    return send

                print(f"bench: {args.duration:g}s of writes straight to home", file=sys.stderr)
                direct = await open_loop(
                    args.rate, args.duration, args.users, sender(home, token, "direct-{}".format)
                )

                print(f"bench: {args.duration:g}s of writes through the broker", file=sys.stderr)
                depths: list[int] = []

                async def sample() -> None:
                    while True:
                        depths.append(await outbox_depth(pool))
                        await asyncio.sleep(1)

                tap.reset()
                meter = CpuMeter(lambda: processes(broker.pid, tmp / "pg"))
                meter.start()
                sampler = asyncio.create_task(sample())
                phase_start = time.perf_counter()
                through = await open_loop(
                    args.rate, args.duration, args.users, sender(tools, tools_token, marker)
                )
                backlog = await outbox_depth(pool)
                after = await drained(pool, within=max(120, 10 * args.duration))
                sampler.cancel()
                cpu = meter.stop()
                busy = time.perf_counter() - phase_start

                at_home = await titles(session, home, token)
                behind = {}
                for name, upstream in upstreams.items():
                    at_peer = await titles(session, upstream, token)
                    behind[name] = sum(
                        at_peer.get(user) != title for user, title in at_home.items()
                    )
            dead = await pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'")
    last: dict[str, int] = {}  # userName -> the last successful write through the broker
    for write in through:
        if write.ok:
            last[str(users[write.user]["userName"])] = write.seq
    overtaken = sum(f"lag-{seq}-" not in at_home[name] for name, seq in last.items())
    outcome = Outcome(
        direct, through, backlog, max(depths, default=0), after, dead, cpu, busy, behind, overtaken
    )
    return report(args, outcome, tap)


def report(args: argparse.Namespace, out: Outcome, tap: Tap) -> str:
    span = args.duration
    peers = len(tap.upstreams)
    ok = [w for w in out.through if w.ok]
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores "
        f"(load average {args.load:.1f} before the run), {args.rate:g} writes/s for {span:g}s, "
        f"{args.users} users, {peers} peer(s), concurrency {args.concurrency} per peer, "
        f"home and peers: {args.servers}"
        + (", peers with a scope and a read list." if args.scoped else "."),
        "",
        "| measure | writes | writes/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
        row(
            "write straight to home: round trip",
            [w.answered - w.due for w in out.direct if w.ok],
            sum(w.ok for w in out.direct),
            span,
        ),
        row(
            "write through the broker's home endpoint: round trip",
            [w.answered - w.due for w in ok],
            len(ok),
            span,
        ),
    ]
    per_peer = {}
    for peer, arrivals in tap.arrivals.items():
        per_peer[peer] = lags(out.through, arrivals)
        lines.append(row(f"lag to peer {peer}", list(per_peer[peer].values()), len(ok), span))
    lines += [
        "",
        "| part of the run | lag p50 ms | lag p99 ms | requests at the peers per second |",
        "|---|---|---|---|",
    ]
    start = min(w.due for w in out.through)
    for third in range(3):
        window = [
            lag
            for found in per_peer.values()
            for seq, lag in found.items()
            if third / 3 <= (out.through[seq].due - start) / span < (third + 1) / 3
        ]
        ms = [v * 1000 for v in window]
        arrived = sum(
            third / 3 <= (t - start) / span < (third + 1) / 3
            for times in tap.times.values()
            for t in times
        )
        lines.append(
            f"| {third * span / 3:.0f}-{(third + 1) * span / 3:.0f} s "
            f"| {percentile(ms, 50):.1f} | {percentile(ms, 99):.1f} "
            f"| {arrived / (span / 3) / peers:.0f} per peer |"
        )
    late = [w.sent - w.due for w in out.through]
    all_lags = [lag for found in per_peer.values() for lag in found.values()]
    # The queue holds at most one waiting sync per user and peer: once it holds one for most
    # users, further writes only fold into waiting syncs and the lag is the time to go round.
    saturated = out.peak >= 0.5 * args.users * peers
    sustained = not saturated and out.backlog <= args.rate * peers and percentile(all_lags, 99) < 5
    never = sum(w.seq not in found for found in per_peer.values() for w in ok)
    requests = {p: sum(c.values()) for p, c in tap.requests.items()}
    lines += [
        "",
        f"- rate sustained: {'yes' if sustained else 'NO'}. At most {out.peak} deliveries waited "
        f"at once (a user has at most one waiting per peer, besides one in flight: "
        f"{args.users * peers}); {out.backlog} waited "
        f"when the last write was answered, and the outbox was empty "
        f"{out.drained_after:.1f}s later. Dead letters: {out.dead}.",
        "- requests the peers received during the run: "
        + ", ".join(f"{p} {n}" for p, n in requests.items())
        + f", for {len(ok)} writes (a sync that runs after several writes carries them all)",
        f"- the generator sent {len(out.through)} writes, at most {max(late) * 1000:.1f} ms late "
        f"(p99 {percentile(late, 99) * 1000:.1f} ms); failed: {len(out.through) - len(ok)} "
        f"through the broker, {sum(not w.ok for w in out.direct)} straight to home",
        "- once the outbox was empty, users whose title at a peer differs from home's: "
        + ", ".join(f"{p} {n}" for p, n in out.behind.items())
        + f"; writes never seen at a peer: {never}; users whose last write was overtaken on its "
        f"way to home by their previous one (home keeps the older value): {out.overtaken}",
        "",
        f"CPU over the {out.busy:.0f}s of writes through the broker and the drain after them:",
        "",
        *cpu_table(out.cpu, out.busy),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="writes per second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of writes")
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--users", type=int, default=500, help="users written to in turn")
    parser.add_argument("--concurrency", type=int, default=4, help="deliveries in flight per peer")
    parser.add_argument(
        "--servers",
        choices=["scim2-server", "memory"],
        default="scim2-server",
        help="home and peers: scim2-server processes, or the fast in-memory bench/store.py",
    )
    parser.add_argument(
        "--scoped",
        action="store_true",
        help="every peer with a scope and a read list (SCOPED_PEER in bench/deliveries.py)",
    )
    args = parser.parse_args()
    args.load = os.getloadavg()[0]  # other work on the machine, for the reader
    token = secrets.token_hex(8)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="broker-lag-") as tmp:
        memory = args.servers == "memory"
        home = stack.enter_context(scim_server(token, memory=memory)) + "/v2"
        peers = [
            stack.enter_context(scim_server(token, "--dynamic-tenants", memory=memory))
            for _ in range(args.peers)
        ]
        print(asyncio.run(run(args, Path(tmp), home, token, peers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
