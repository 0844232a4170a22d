"""Reconciliation benchmark: a run over a peer whose every account matches a home user, at
several sizes, to show that the run's time grows with the peer and its memory does not.

    python bench/reconcile.py [--sizes 1000,4000] [--page-sizes 100] [--servers memory] [--real]

Home and the peer are tenants of one SCIM server process: scim2-server (the default; too slow
for more than a few thousand users), or with ``--servers memory`` the in-memory
``bench/store.py``, into which the users are bulk-loaded (``POST .../Users/.load``), the same
userNames in home and in the peer, so every account is ``unlinked``. The run is the broker's own
``Reconciler`` in a process of its own per size (started fresh, so its memory figures are its
own): Python's peak allocation during the run (tracemalloc, which also slows the run) and the
growth of its resident memory (the peak, VmHWM, reset before the run, less VmRSS before it).

By default each run is a dry run. With ``--real`` it links every account (through the mapping
store, as ``broker reconcile`` does), then a second dry run must find every account ``linked``;
both are reported.

Needs the embedded PostgreSQL (or BROKER_DATABASE_URL).
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
import tracemalloc
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_users, create_users, database
from deliveries import CORE_USER, scim_server

from broker import db
from broker.domains import DomainStore
from broker.home import HomeClient
from broker.propagation.peer import PeerClient
from broker.reconcile.runner import Reconciler
from broker.reconcile.situations import Options

TEMPLATE = {"schemas": [CORE_USER], "displayName": "Bench User", "title": "benchmark"}
"""The users of the bulk load (as ``bench_users`` makes them, with the userName given)."""


async def load_users(home: str, peer: str, token: str, size: int, memory: bool) -> None:
    """``size`` users with the same userNames in home and in the peer."""
    if not memory:
        users = bench_users(size, prefix=f"r{secrets.token_hex(4)}")
        await create_users(home, token, users)
        await create_users(peer, token, users)
        return
    prefix = f"r{secrets.token_hex(4)}"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for base in (home, peer):
            body = {"template": TEMPLATE, "prefix": prefix, "count": size}
            async with session.post(f"{base}/Users/.load", json=body) as response:
                assert response.status == 200, await response.text()
                held = (await response.json(content_type=None))["totalResults"]
                assert held == size, f"{base} holds {held} users, not {size}"


# --------------------------------------------------------------------------- one size (child)


class Statements:
    """With ``--statements``: the time each named query takes in all (the connections' methods
    wrapped, in the measured process only: the pool's call them), printed on stderr."""

    def __init__(self) -> None:
        self.names = {text: name for name, text in db._QUERIES.items()}
        self.totals: dict[str, list[float]] = {}
        for method in ("execute", "fetch", "fetchrow", "fetchval"):
            setattr(asyncpg.Connection, method, self._timed(getattr(asyncpg.Connection, method)))

    def _timed(self, method: Any) -> Any:
        async def timed(owner: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(owner, sql, *args, **kwargs)
            finally:
                total = self.totals.setdefault(self.names.get(sql, sql[:60]), [0, 0.0])
                total[0] += 1
                total[1] += time.perf_counter() - started

        return timed

    def show(self) -> None:
        ranked = sorted(self.totals.items(), key=lambda kv: -kv[1][1])
        for name, (count, seconds) in ranked[:12]:
            print(f"  {seconds:8.2f} s {count:6.0f}x  {name}", file=sys.stderr)
        self.totals.clear()


def memory_kib(field: str) -> int:
    """VmRSS or VmHWM (the peak resident memory since the last reset) of this process, KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """VmHWM back to the current RSS (Linux: ``echo 5 > /proc/PID/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


class Phases:
    """The reconciler's progress lines, timed: when home was last read (the index pass), when
    the peer was (the peer pass); one line on stderr every ``every`` seconds at most."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.started = self.home = self.peer = self._shown = time.perf_counter()

    def __call__(self, line: str) -> None:
        now = time.perf_counter()
        if ": home " in line:
            self.home = self.peer = now
        elif " read " in line:
            self.peer = now
        if now - self._shown >= self.every:
            self._shown = now
            print(f"  [{now - self.started:6.1f} s] {line}", file=sys.stderr, flush=True)


async def one_run(reconciler: Reconciler, dry_run: bool, phases: Phases) -> dict[str, Any]:
    """One run measured: seconds (in all, and per pass), peak Python memory, RSS growth."""
    rss_before = memory_kib("VmRSS")
    reset_peak_rss()
    tracemalloc.start()
    started = phases.started = phases.home = phases.peer = time.perf_counter()
    run = await reconciler.start(Options(dry_run=dry_run), actor="bench")
    report = await reconciler.run(run)
    took = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "dry_run": dry_run,
        "seconds": took,
        "home_pass": phases.home - started,
        "peer_pass": phases.peer - phases.home,
        "rest": started + took - phases.peer,
        "peak_python": peak,
        "rss_before": rss_before * 1024,
        "rss_growth": (memory_kib("VmHWM") - rss_before) * 1024,
        "situations": {k: v for k, v in report.counts["situations"].items() if v},
        "actions": report.counts["actions"],
    }


async def one_size(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of one size (spec: home, peer, token, size, page_size, real, data_dir)."""
    size = spec["size"]
    statements = Statements() if spec["statements"] else None
    async with (
        database(Path(spec["data_dir"])) as (pool, _url),
        aiohttp.ClientSession() as session,
        HomeClient(spec["home"], spec["token"]) as home,
    ):
        os.environ["BENCH_RECONCILE_TOKEN"] = spec["token"]
        await DomainStore(pool).add(
            "P", scim_url=spec["peer"], credential_ref="env:BENCH_RECONCILE_TOKEN", push=True
        )
        phases = Phases()
        reconciler = Reconciler(
            pool,
            home,
            PeerClient(session, spec["peer"], spec["token"], domain="P"),
            domain="P",
            scope=None,
            readable=None,
            page_size=spec["page_size"],
            rate=0,
            progress=phases,
        )
        runs = [await one_run(reconciler, not spec["real"], phases)]
        if statements:
            statements.show()
        assert runs[0]["situations"] == {"unlinked": size}, runs[0]["situations"]
        if spec["real"]:
            assert runs[0]["actions"] == {"link": size}, runs[0]["actions"]
            mapped = await pool.fetchval("SELECT count(*) FROM id_mappings WHERE domain_id = 'P'")
            assert mapped == size, f"{mapped} accounts of P mapped, not {size}"
            runs.append(await one_run(reconciler, True, phases))
            if statements:
                statements.show()
            assert runs[1]["situations"] == {"linked": size}, runs[1]["situations"]
    return runs


# --------------------------------------------------------------------------- the sizes (parent)


def row(size: int, page_size: int, run: dict[str, Any]) -> str:
    kind = "dry run" if run["dry_run"] else "real run (links)"
    found = ", ".join(f"{n} {s}" for s, n in run["situations"].items())
    return (
        f"| {size:,} | {page_size} | {kind}: {found} | {run['seconds']:.1f} s "
        f"({run['home_pass']:.1f} + {run['peer_pass']:.1f} + {run['rest']:.1f}) | "
        f"{size / run['seconds']:,.0f} accounts/s | {run['peak_python'] / 1e6:.1f} MB | "
        f"{run['rss_growth'] / 2**20:.1f} MiB (of {run['rss_before'] / 2**20:.0f}) |"
    )


def measured(spec: dict[str, Any], db_url: str) -> list[dict[str, Any]]:
    """One size in a process of its own, on the database at ``db_url``."""
    env = {**os.environ, "BROKER_DATABASE_URL": db_url}
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    runs: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return runs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,4000", help="peer accounts, comma-separated")
    parser.add_argument("--page-sizes", default="100", help="peer page sizes, comma-separated")
    parser.add_argument(
        "--servers",
        choices=["scim2-server", "memory"],
        default="scim2-server",
        help="home and peer: tenants of scim2-server, or of the in-memory bench/store.py",
    )
    parser.add_argument("--real", action="store_true", help="link, then a dry run: all linked")
    parser.add_argument(
        "--statements", action="store_true", help="print the time of each named query"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(await one_size(json.loads(args.one))))
        return
    memory = args.servers == "memory"
    token = secrets.token_hex(8)
    rows = []
    with ExitStack() as stack:
        base = stack.enter_context(scim_server(token, "--dynamic-tenants", memory=memory))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        async with database(Path(tmp)) as (_pool, db_url):
            for size in (int(s) for s in args.sizes.split(",")):
                for page_size in (int(p) for p in args.page_sizes.split(",")):
                    tag = secrets.token_hex(4)
                    home, peer = f"{base}/home{tag}/v2", f"{base}/peer{tag}/v2"
                    started = time.perf_counter()
                    await load_users(home, peer, token, size, memory)
                    print(
                        f"{size:,} users loaded into home and the peer in "
                        f"{time.perf_counter() - started:.1f} s; reconciling",
                        file=sys.stderr,
                        flush=True,
                    )
                    spec = {
                        "home": home,
                        "peer": peer,
                        "token": token,
                        "size": size,
                        "page_size": page_size,
                        "real": args.real,
                        "statements": args.statements,
                        "data_dir": tmp,
                    }
                    for run in await asyncio.to_thread(measured, spec, db_url):
                        rows.append(row(size, page_size, run))
                        print(rows[-1], flush=True)
    print(
        "| peer accounts | page | run: situations | time (home read + peer read + the rest) "
        "| rate | peak Python memory | RSS growth (of RSS before) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
