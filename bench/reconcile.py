"""Reconciliation benchmark: a dry run over a peer whose every account matches a home user, at
two sizes, to show that the run's time grows with the peer and its memory does not.

    python bench/reconcile.py [--sizes 1000,4000] [--page-size 100]

Home and the peer are tenants of one real scim2-server process; the run is the broker's own
``Reconciler`` in this process (Python's peak allocation is measured with tracemalloc around it).
Needs the embedded PostgreSQL (or BROKER_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_users, create_users, database
from deliveries import scim_server

from broker.domains import DomainStore
from broker.home import HomeClient
from broker.propagation.peer import PeerClient
from broker.reconcile.runner import Reconciler
from broker.reconcile.situations import Options


async def one_size(base: str, token: str, size: int, page_size: int, data_dir: Path) -> str:
    tag = secrets.token_hex(4)
    home, peer = f"{base}/home{tag}/v2", f"{base}/peer{tag}/v2"
    users = bench_users(size, prefix=f"r{tag}")
    await create_users(home, token, users)
    await create_users(peer, token, users)
    async with database(data_dir) as (pool, _url), aiohttp.ClientSession() as session:
        os.environ["BENCH_RECONCILE_TOKEN"] = token
        await DomainStore(pool).add(
            "P", scim_url=peer, credential_ref="env:BENCH_RECONCILE_TOKEN", push=True
        )
        reconciler = Reconciler(
            pool,
            HomeClient(session, home, token),
            PeerClient(session, peer, token, domain="P"),
            domain="P",
            scope=None,
            readable=None,
            page_size=page_size,
            rate=0,
        )
        tracemalloc.start()
        started = time.perf_counter()
        run = await reconciler.start(Options(dry_run=True), actor="bench")
        report = await reconciler.run(run)
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    unlinked = report.counts["situations"]["unlinked"]
    assert unlinked == size, report.counts
    return (
        f"| {size} | {page_size} | {took:.1f} s | {size / took:.0f} accounts/s | "
        f"{peak / 1e6:.1f} MB |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument("--page-size", type=int, default=100)
    args = parser.parse_args()
    token = secrets.token_hex(8)
    rows = []
    with scim_server(token, "--dynamic-tenants") as base, tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(await one_size(base, token, size, args.page_size, Path(tmp)))
            print(rows[-1], flush=True)
    print("| peer accounts | page | dry run | rate | peak Python memory |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
