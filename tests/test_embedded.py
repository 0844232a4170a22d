"""The embedded PostgreSQL's own settings: a new data directory gets them, one that exists keeps
what it has (an operator's ALTER SYSTEM is never undone)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from broker.db import EmbeddedPostgres, embedded_settings

pytestmark = pytest.mark.slow


def test_shared_buffers_take_a_quarter_of_the_memory_within_bounds() -> None:
    assert embedded_settings(8 << 30)["shared_buffers"] == "2048MB"
    assert embedded_settings(64 << 30)["shared_buffers"] == "4096MB"  # at most 4 GB
    assert embedded_settings(256 << 20)["shared_buffers"] == "128MB"  # PostgreSQL's default
    assert embedded_settings(0)["shared_buffers"] == "128MB"  # memory unknown
    assert embedded_settings(8 << 30)["wal_level"] == "minimal"
    assert embedded_settings(8 << 30)["max_wal_senders"] == "0"  # minimal requires it


async def _show(url: str, *names: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [await conn.fetchval(f"SHOW {name}") for name in names]
    finally:
        await conn.close()


async def test_a_new_data_directory_gets_the_settings_and_an_existing_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = EmbeddedPostgres(
        data, settings={"shared_buffers": "48MB", "wal_level": "minimal", "max_wal_senders": "0"}
    )
    url = await asyncio.to_thread(first.start)
    try:
        assert await _show(url, "shared_buffers", "wal_level") == ["48MB", "minimal"]
        conn = await asyncpg.connect(url)
        try:  # the operator changes one, for the next start
            await conn.execute("ALTER SYSTEM SET shared_buffers = '40MB'")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(first.stop)
    again = EmbeddedPostgres(data, settings={"shared_buffers": "64MB", "wal_level": "replica"})
    url = await asyncio.to_thread(again.start)
    try:
        assert await _show(url, "shared_buffers", "wal_level") == ["40MB", "minimal"]
    finally:
        await asyncio.to_thread(again.stop)
