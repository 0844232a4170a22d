"""Dead letters in bulk and the SET purge at scale: how long `settle_dead_letters` takes for N
dead letters toward one peer (one statement per batch), and `purge_events` for N acknowledged
SETs and their changes, on the embedded PostgreSQL in a temporary directory (or the server
BROKER_DATABASE_URL names).

    python bench/retention.py [--rows 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import asyncpg

from broker.db import migrated_pool
from broker.events.purge import EventRetention, purge_events
from broker.propagation.outbox import count_dead_letters, settle_dead_letters


async def _setup(pool: asyncpg.Pool, rows: int) -> None:
    await pool.execute(
        "INSERT INTO domains (id, kind, push, scim_url) VALUES ('P1', 'peer', true, 'http://p1')"
    )
    await pool.execute(
        "INSERT INTO entities (internal_id, resource_type) "
        "SELECT 'E' || n, 'User' FROM generate_series(1, $1) n",
        rows,
    )
    await pool.execute(
        "INSERT INTO outbox (domain_id, internal_id, kind, state, updated_at) "
        "SELECT 'P1', 'E' || n, 'move_memberships', 'dead', now() - interval '1 hour' "
        "FROM generate_series(1, $1) n",
        rows,
    )
    await pool.execute(
        "INSERT INTO home_changes (txn, internal_id, kinds, at) "
        "SELECT gen_random_uuid(), 'E' || n, ARRAY['patch'], now() - interval '40 days' "
        "FROM generate_series(1, $1) n",
        rows,
    )
    await pool.execute(
        "INSERT INTO security_events (domain_id, change_id, internal_id, jti, state, settled_at) "
        "SELECT 'P1', c.id, c.internal_id, gen_random_uuid()::text, 'acknowledged', "
        "now() - interval '10 days' FROM home_changes c"
    )
    await pool.execute("ANALYZE")


async def main(rows: int, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        url = os.environ.get("BROKER_DATABASE_URL")
        async with migrated_pool(url, Path(tmp), on_applied=lambda m: None) as (pool, _):
            await _setup(pool, rows)
            letters = await count_dead_letters(pool, "P1", None)
            started = time.perf_counter()
            settled = await settle_dead_letters(pool, letters, "retry", "bench", batch=batch)
            retry = time.perf_counter() - started
            audits = await pool.fetchval("SELECT count(*) FROM audit_log")
            print(
                f"bulk retry: {settled.count} dead letters in {retry:.2f}s "
                f"({settled.count / retry:,.0f}/s), {audits} batches audited (batch {batch})"
            )
            started = time.perf_counter()
            events, changes = await purge_events(pool, EventRetention(), batch=5000)
            purge = time.perf_counter() - started
            print(
                f"purge: {events} acknowledged SETs and {changes} home changes in {purge:.2f}s "
                f"({(events + changes) / purge:,.0f} rows/s)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    options = parser.parse_args()
    asyncio.run(main(options.rows, options.batch))
