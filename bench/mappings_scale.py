"""The mapping table at scale: generate a mapping file of ENTITIES entities in DOMAINS domains
(ENTITIES x DOMAINS rows), import it with ``broker mappings import``'s code (the bulk path: COPY
straight into the emptied table, set-based checks, indexes built again), then time the batched resolution of a 100-user page the
proxy does, cold (no cache: every page is a query), and show the in-process cache bounded by
``cache_entries`` while pages stream through it.

    python bench/mappings_scale.py [--entities 100000] [--domains 10] [--pages 2000]

It starts an embedded PostgreSQL in a temporary directory (or uses $BROKER_DATABASE_URL, whose
database it fills: use an empty one).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from broker.cli.serve import settle_collector
from broker.config import Config
from broker.db import migrated_pool
from broker.mapping.cache import MappingCache
from broker.mapping.store import MappingStore
from broker.mapping.transfer import import_mappings


def server_cpu(data_dir: Path) -> float:
    """CPU seconds the embedded server's processes (the postmaster's children: backends,
    parallel workers, WAL writer, checkpointer...) have used so far; 0 with an outside server."""
    try:
        postmaster = (data_dir / "postmaster.pid").read_text().split()[0]
    except OSError:
        return 0.0
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[1] == postmaster:  # a live child: utime + stime
            ticks += int(fields[11]) + int(fields[12])
        elif stat.parent.name == postmaster:  # itself, and the children it reaped (workers)
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU seconds of this process and of the embedded server together: what a run costs,
    whatever else the machine is doing (wall-clock times on a shared machine vary with load)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.start = self.now()

    def now(self) -> float:
        return time.process_time() + server_cpu(self.data_dir)

    def lap(self) -> float:
        now = self.now()
        spent, self.start = now - self.start, now
        return spent


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def internal_ids(count: int) -> list[str]:
    """IDs in home's shape (32 hex digits), from one read of the random source."""
    raw = os.urandom(16 * count).hex()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def generate(path: Path, entities: list[str], domains: list[str]) -> int:
    """One primary row per entity and domain; each domain's external IDs its own."""
    rows = 0
    with path.open("w", encoding="utf-8") as out:
        out.write("internal_id,domain,external_id,primary\n")
        for n, domain in enumerate(domains):
            externals = internal_ids(len(entities))
            out.writelines(
                f"{i},{domain},{n}-{e[:20]},true\n"
                for i, e in zip(entities, externals, strict=True)
            )
            rows += len(entities)
    return rows


async def timed_pages(
    store: MappingStore, domain: str, pages: list[list[str]], *, inbound: bool
) -> list[float]:
    """Milliseconds per batched resolution of each 100-entity page."""
    times = []
    externals: dict[str, str] = {}
    if inbound:
        wanted = dict.fromkeys((i for page in pages for i in page), "User")
        externals = await store.resolve_outbound(domain, wanted, mint=False)
    for page in pages:
        started = time.perf_counter()
        if inbound:
            await store.resolve_inbound(domain, [externals[i] for i in page if i in externals])
        else:
            found = await store.resolve_outbound(domain, dict.fromkeys(page, "User"), mint=False)
            assert len(found) == 100
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(times: list[float]) -> str:
    return (
        f"p50 {percentile(times, 50):.2f} ms, p99 {percentile(times, 99):.2f} ms, "
        f"max {max(times):.2f} ms"
    )


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-mappings-"))
    url = os.environ.get("BROKER_DATABASE_URL")
    async with migrated_pool(url, work / "data", max_size=4) as (pool, _):
        domains = [f"P{n}" for n in range(args.domains)]
        await pool.executemany(
            "INSERT INTO domains (id, kind, push, scim_url) VALUES ($1, 'peer', $2, $3)",
            [(d, n % 2 == 0, f"http://{d.lower()}.invalid/scim/v2") for n, d in enumerate(domains)],
        )
        if url is None:
            # A bulk load writes more WAL than the default 1 GB between checkpoints: let the
            # benchmark's own server checkpoint less often (PostgreSQL's "Populating a Database").
            await pool.execute(f"ALTER SYSTEM SET max_wal_size = '{args.max_wal_size}'")
            await pool.execute("SELECT pg_reload_conf()")
        entities = internal_ids(args.entities)
        file = work / "mapping.csv"
        started = time.monotonic()
        rows = generate(file, entities, domains)
        print(
            f"generated {rows:,} rows ({file.stat().st_size / 1e6:,.0f} MB) "
            f"in {time.monotonic() - started:.1f} s"
        )
        cpu = CpuClock(work / "data")
        mine = time.process_time()
        report = await import_mappings(
            pool,
            file,
            actor="bench",
            progress=lambda n: (
                print(f"  read {n:,} lines", file=sys.stderr, flush=True)
                if n % 1_000_000 < 50_000
                else None
            ),
        )
        assert not report.refused, report.problems[:5]
        print(
            f"imported {report.rows:,} rows ({report.entities:,} entities) in "
            f"{report.seconds:.1f} s: {report.rows / report.seconds:,.0f} rows/s "
            f"({'bulk path' if report.bulk else 'inserted'}; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items())
            + "; the write: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.write_steps.items())
            + ")"
        )
        mine = time.process_time() - mine
        spent = cpu.lap()
        print(
            f"  CPU: {spent:.1f} s (this process {mine:.1f} s, the server {spent - mine:.1f} s): "
            f"{report.rows / spent:,.0f} rows per CPU-second"
        )
        # The pages are timed on the table at rest: vacuumed and analysed, as autovacuum leaves
        # it a few minutes after a large import (timed while autovacuum ran, a page competed
        # with it for the two cores), and checkpointed, as the server's next checkpoint leaves
        # it (the vacuum dirties every page it marks visible: a checkpoint writing them out
        # while pages were timed competed for the disk).
        settled = time.monotonic()
        await pool.execute("VACUUM (ANALYZE) id_mappings")
        await pool.execute("VACUUM (ANALYZE) entities")
        if url is None:  # the embedded server's superuser; a configured server checkpoints itself
            await pool.execute("CHECKPOINT")
        print(
            f"vacuumed, analysed and checkpointed the tables in {time.monotonic() - settled:.1f} s"
        )
        cold = MappingStore(pool)  # its cache is off: every page is a query
        pages = [random.sample(entities, 100) for _ in range(args.pages)]
        # The collector as `broker serve` sets it once started: what lives for the whole run
        # frozen, young objects collected after 20,000 allocations instead of 700.
        settle_collector()
        # An imported entity's type is unknown until a domain first reads it: that first read
        # records it (one more statement). The second pass reads the same pages, all known.
        cpu.lap()
        first = await timed_pages(cold, "P0", pages, inbound=False)
        print(f"outbound 100-ID page, cold, first read after the import: {summary(first)}")
        known = await timed_pages(cold, "P0", pages, inbound=False)
        print(f"outbound 100-ID page, cold, entities known:            {summary(known)}")
        inbound = await timed_pages(cold, "P0", pages, inbound=True)
        print(f"inbound  100-ID page, cold:                            {summary(inbound)}")
        print(f"  CPU: {cpu.lap() / (3 * args.pages) * 1000:.2f} ms per page (mean of the three)")
        await cache_bound(pool, entities)
        size = await pool.fetchval("SELECT pg_total_relation_size('id_mappings')")
        print(f"id_mappings with its indexes: {size / 1e9:.2f} GB")
    if not args.keep:
        shutil.rmtree(work)  # the file and the server's data: gigabytes at 10M rows


async def cache_bound(pool: asyncpg.Pool, entities: list[str]) -> None:
    """Pages through a cache of ``cache_entries`` (the default configuration's): never more."""
    bound = Config().database.cache_entries
    cache = MappingCache(bound)
    cache.enabled = True  # as when the LISTEN connection is up
    store = MappingStore(pool, cache=cache)
    largest = 0
    pages = max(1, 3 * bound // 100)
    for n in range(pages):
        page = entities[(n * 100) % len(entities) :][:100] or entities[:100]
        await store.resolve_outbound("P0", dict.fromkeys(page, "User"), mint=False)
        largest = max(largest, cache.entries())
    print(
        f"cache: {pages:,} distinct pages through a cache of cache_entries={bound:,}: "
        f"at most {largest:,} entries held"
    )
    assert largest <= bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the file and the data directory")
    parser.add_argument("--max-wal-size", default="8GB", help="for the benchmark's own server")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
