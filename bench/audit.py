"""What the audit chain and the entity history cost: audit inserts through the chain's trigger
against the same inserts into a copy of the table without it (one writer, then several at once,
which queue on the chain head), ``broker audit verify``'s rate, and a delivery's settle with its
history row against the settle statement as it was before (0013).

    python bench/audit.py [--rows 5000] [--writers 8]

Uses the embedded PostgreSQL in a temporary directory unless BROKER_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import database
from broker.auditlog import verify_database
from broker.db import query

SETTLE_BEFORE = """
UPDATE outbox
SET state = 'done', attempts = attempts + 1, lease_until = NULL, last_error = NULL,
    sealed_values = NULL, updated_at = now()
WHERE id = $1 AND claimed_by = $2 AND state = 'in_flight'
"""
"""``delivery_done`` before 0013 (no history row)."""

PLAIN = "INSERT INTO audit_plain (actor, action, subject, details) VALUES ($1, $2, $3, $4)"


async def inserts(pool: asyncpg.Pool, statement: str, rows: int, writers: int) -> float:
    """Rows a second, ``writers`` connections inserting ``rows`` in all, one per statement."""
    each = rows // writers

    async def writer(w: int) -> None:
        async with pool.acquire() as conn:
            for i in range(each):
                await conn.execute(statement, "bench", "merge", f"e{w}-{i}", {"i": i, "w": w})

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return each * writers / (time.perf_counter() - started)


async def settles(pool: asyncpg.Pool, statement: str, rows: int) -> float:
    """Microseconds a settle of one in-flight delivery takes, sequentially."""
    ids = [
        r["id"]
        for r in await pool.fetch(
            "INSERT INTO outbox (domain_id, internal_id, kind, state, claimed_by) "
            "SELECT 'P1', 'e' || g, 'sync', 'in_flight', 'w' FROM generate_series(1, $1) g "
            "RETURNING id",
            rows,
        )
    ]
    async with pool.acquire() as conn:
        started = time.perf_counter()
        for delivery in ids:
            await conn.execute(statement, delivery, "w")
        return (time.perf_counter() - started) / rows * 1e6


async def run(rows: int, writers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="broker-bench-audit-") as tmp:
        async with database(Path(tmp) / "data") as (pool, _url):
            await pool.execute("TRUNCATE entity_history")
            await pool.execute(
                "CREATE TABLE IF NOT EXISTS audit_plain "
                "(LIKE audit_log INCLUDING ALL); "
                "ALTER TABLE audit_plain ALTER seq DROP NOT NULL, "
                "ALTER prev_hash DROP NOT NULL, ALTER hash DROP NOT NULL"
            )
            await pool.execute("INSERT INTO domains (id, kind) VALUES ('P1', 'peer')")
            await pool.execute(
                "INSERT INTO entities (internal_id, resource_type) "
                "SELECT 'e' || g, 'User' FROM generate_series(1, $1) g",
                rows,
            )
            for label, count in (("1 writer", 1), (f"{writers} writers", writers)):
                plain = await inserts(pool, PLAIN, rows, count)
                chained = await inserts(pool, query("audit"), rows, count)
                print(
                    f"audit inserts, {label}: {chained:,.0f}/s chained, {plain:,.0f}/s without "
                    f"the trigger ({chained / plain:.0%})"
                )
            total = await pool.fetchval("SELECT count(*) FROM audit_log")
            started = time.perf_counter()
            intact, broken = await verify_database(pool)
            seconds = time.perf_counter() - started
            assert broken is None and intact == total, broken
            print(f"audit verify: {total:,} rows in {seconds:.2f} s ({total / seconds:,.0f}/s)")
            # Alternated in rounds, the median of each: the machine's other load shifts both.
            befores, afters = [], []
            for _ in range(5):
                befores.append(await settles(pool, SETTLE_BEFORE, rows // 5))
                afters.append(await settles(pool, query("delivery_done"), rows // 5))
            print(
                f"delivery settle: {statistics.median(afters):.0f} us with its history row, "
                f"{statistics.median(befores):.0f} us without (medians of 5 alternated rounds; "
                "one statement either way)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.writers))


if __name__ == "__main__":
    main()
