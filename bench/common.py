"""Helpers shared by the propagation and event benchmarks (bench/lag.py, bench/catchup.py,
bench/merges.py, bench/events.py): the database, `broker serve` as a process of its own and other
`broker` commands, fast user creation, percentiles, and the memory and CPU of the processes taking
part.

The broker runs as `broker serve` (the production entry point, `create_app` behind aiohttp's
runner) in a process of its own, so that the load generator and the measuring side never share
its event loop or its core.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from broker.db import migrated_pool

sys.path.insert(0, str(Path(__file__).parent))
from deliveries import CORE_USER
from run import free_port, process, wait_for

PEER_TOKEN_ENV = "BENCH_PEER_TOKEN"
HOME_ID_PATTERN = "[0-9a-f]{32}"  # scim2-server's IDs


def bench_users(count: int, prefix: str = "bench") -> list[dict[str, object]]:
    """Users as bench/deliveries.py creates them."""
    return [
        {
            "schemas": [CORE_USER],
            "userName": f"{prefix}-{uuid.uuid4().hex[:12]}",
            "displayName": "Bench User",
            "title": "benchmark",
        }
        for _ in range(count)
    ]


async def create_users(
    base: str, token: str, users: Sequence[dict[str, object]], concurrency: int = 8
) -> list[str]:
    """POST every user to ``base``/Users, ``concurrency`` at a time; their IDs, in order."""
    ids: list[str] = [""] * len(users)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(n: int, user: dict[str, object]) -> None:
            async with gate, session.post(f"{base}/Users", json=user) as response:
                assert response.status == 201, await response.text()
                ids[n] = (await response.json(content_type=None))["id"]

        await asyncio.gather(*(one(n, u) for n, u in enumerate(users)))
    return ids


# --------------------------------------------------------------------------- the database


@asynccontextmanager
async def database(data_dir: Path) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """The embedded PostgreSQL in ``data_dir`` (or the server BROKER_DATABASE_URL names),
    migrated and emptied of domains and deliveries; the pool and the server's URL."""
    async with migrated_pool(os.environ.get("BROKER_DATABASE_URL"), data_dir, max_size=4) as (
        pool,
        url,
    ):
        await pool.execute(
            "TRUNCATE outbox, peer_copies, id_mappings, entities, domain_tokens, domains CASCADE"
        )
        yield pool, url


async def analyze(pool: asyncpg.Pool) -> None:
    """Fresh planner statistics for the broker's tables, as autovacuum keeps them on a database
    that has been running for a while. Right after the TRUNCATE above and a large insert, the
    planner believes the outbox nearly empty and may choose a claim plan quadratic in the queue
    (docs/performance.md)."""
    await pool.execute("ANALYZE outbox, entities, id_mappings, peer_copies")


async def outbox_depth(pool: asyncpg.Pool) -> int:
    """Deliveries waiting or in flight."""
    depth: int = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
    )
    return depth


async def drained(pool: asyncpg.Pool, within: float, every: float = 0.2) -> float:
    """Wait until no delivery is waiting or in flight; the seconds it took."""
    started = time.perf_counter()
    while await outbox_depth(pool):
        if time.perf_counter() - started > within:
            raise TimeoutError(f"the outbox did not drain within {within:.0f}s")
        await asyncio.sleep(every)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the broker


def broker_env(db_url: str) -> dict[str, str]:
    """This process's environment without its ``BROKER_*`` settings, on ``db_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = db_url
    return env


async def broker_command(db_url: str, *args: str) -> str:
    """``broker ARGS...`` (the CLI, a process of its own) on ``db_url``; what it printed on
    stdout. Fails with its stderr when it does."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "broker.cli", *args],
        env=broker_env(db_url),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"broker {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


@dataclass
class BrokerProcess:
    pid: int
    url: str
    admin_url: str
    log: Path


@asynccontextmanager
async def broker_serve(
    db_url: str, home_url: str, home_token: str, peer_token: str, work: Path, **propagation: object
) -> AsyncIterator[BrokerProcess]:
    """`broker serve` in a process of its own on ``db_url``, in front of ``home_url``, with
    ``[propagation]`` settings overridden by ``propagation`` (``concurrency=4``, ...). Ready when
    yielded; its log is ``work/broker.log``."""
    port, admin_port = free_port(), free_port()
    env = broker_env(db_url)
    env.update(
        BROKER_SERVER__PORT=str(port),
        BROKER_SERVER__ADMIN_PORT=str(admin_port),
        BROKER_HOME__SCIM_URL=home_url,
        BROKER_HOME__TOKEN_ENV="BENCH_HOME_TOKEN",
        BROKER_HOME__ID_PATTERN=HOME_ID_PATTERN,
        BENCH_HOME_TOKEN=home_token,
        **{PEER_TOKEN_ENV: peer_token},
        **{f"BROKER_PROPAGATION__{k.upper()}": str(v).lower() for k, v in propagation.items()},
    )
    log = work / "broker.log"
    with process([sys.executable, "-m", "broker.cli", "serve"], env=env, log=log) as proc:
        try:
            await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/readyz")
        except RuntimeError:
            print(log.read_text(), file=sys.stderr)
            raise
        yield BrokerProcess(
            proc.pid, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log
        )


# --------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0-100) of ``values``; nan when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(broker_pid: int, data_dir: Path) -> dict[str, list[int]]:
    """The processes taking part, by role: the broker, this benchmark, the SCIM servers it
    started (scim2-server or bench/store.py), and the embedded PostgreSQL (its postmaster and backends). Needs psutil for all
    but the first two; without it, only those are named."""
    roles: dict[str, list[int]] = {"broker": [broker_pid], "benchmark": [os.getpid()]}
    try:
        import psutil  # optional: not a dependency of the project
    except ImportError:
        return roles
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "scim2_server" in command:
                roles.setdefault("scim2-server (home, peers)", []).append(child.pid)
            elif "bench/store.py" in command:
                roles.setdefault("in-memory SCIM (home, peers)", []).append(child.pid)
        except psutil.Error:
            continue
    for candidate in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(candidate.info["cmdline"] or [])
        if candidate.info["name"] == "postgres" and str(data_dir.resolve()) in cmdline:
            tree = [candidate, *candidate.children(recursive=True)]
            roles["postgres"] = [p.pid for p in tree]
    return roles


class CpuMeter:
    """CPU seconds used by each role of ``roles()`` between ``start()`` and ``stop()``. The roles
    are looked up again at the end, so processes started in between (database backends) count
    in full."""

    def __init__(self, roles: Callable[[], dict[str, list[int]]]) -> None:
        self.roles = roles
        self._before: dict[int, float] = {}
        self.used: dict[str, float] = {}

    @staticmethod
    def _read(roles: dict[str, list[int]]) -> dict[int, float]:
        out = {}
        for pids in roles.values():
            for pid in pids:
                with suppress(OSError):
                    out[pid] = cpu_seconds(pid)
        return out

    def start(self) -> None:
        self._before = self._read(self.roles())

    def stop(self) -> dict[str, float]:
        roles = self.roles()
        after = self._read(roles)
        self.used = {
            role: sum(after.get(p, 0.0) - self._before.get(p, 0.0) for p in pids if p in after)
            for role, pids in roles.items()
        }
        return self.used


def cpu_table(used: dict[str, float], seconds: float) -> list[str]:
    """Markdown rows: each role's CPU seconds and its share of one core over ``seconds``."""
    lines = ["| process | CPU s | share of one core |", "|---|---|---|"]
    for role, cpu in used.items():
        lines.append(f"| {role} | {cpu:.1f} | {cpu / seconds:.0%} |")
    return lines
