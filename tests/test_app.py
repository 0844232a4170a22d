"""The application production runs, driven in-process: health, readiness and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, DatabaseConfig, ServerConfig


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[TestClient[object, object]]:
    app = create_app(Config(server=ServerConfig(admin_port=0), database=DatabaseConfig(url=db_url)))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_healthz_and_readyz_answer_when_the_database_is_migrated(
    client: TestClient[object, object],
) -> None:
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_readyz_says_which_migration_is_missing(
    client: TestClient[object, object], db_url: str
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DELETE FROM schema_migrations WHERE version = 1")
    finally:
        await conn.close()
    response = await client.get("/readyz")
    assert response.status == 503
    assert "0001_initial.sql" in (await response.json())["reason"]


async def test_metrics_are_prometheus_text_counting_requests(
    client: TestClient[object, object],
) -> None:
    await client.get("/healthz")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    body = await response.text()
    assert 'broker_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in body
    assert 'broker_db_pool_connections{state="total"}' in body
    assert 'broker_build_info{version="' in body
