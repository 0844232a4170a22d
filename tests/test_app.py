"""The application production runs, driven in-process: health, readiness and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import create_app
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from tests.scim_support import _free_port


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[TestClient[object, object]]:
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        propagation=PropagationConfig(secret_key_env="TEST_BROKER_KEY"),
    )
    app = create_app(config)
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


@pytest.fixture
async def served(db_url: str) -> AsyncIterator[tuple[TestClient[object, object], str]]:
    """The broker with its admin listener and a home (that never needs to answer here): the
    client of the domain-facing port, and the admin listener's URL."""
    admin_port = _free_port()
    config = Config(
        server=ServerConfig(admin_port=admin_port),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    async with TestClient(TestServer(create_app(config))) as test_client:
        yield test_client, f"http://127.0.0.1:{admin_port}"


async def _admin_metrics(admin_url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as got:
        assert got.status == 200
        assert got.headers["Content-Type"].startswith("text/plain")
        return await got.text()


async def test_metrics_are_prometheus_text_on_the_admin_listener_counting_requests(
    served: tuple[TestClient[object, object], str],
) -> None:
    client, admin_url = served
    await client.get("/healthz")
    body = await _admin_metrics(admin_url)
    assert 'broker_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in body
    assert 'broker_db_pool_connections{state="total"}' in body
    assert 'broker_build_info{version="' in body


async def test_the_domain_facing_port_has_no_metrics(
    served: tuple[TestClient[object, object], str], db_url: str
) -> None:
    """/metrics names every domain and its queues: a domain (or anyone reaching the port)
    gets a 404 for it, the operator reads it on the admin listener."""
    client, admin_url = served
    await add_domain_row(db_url, "secret-partner")
    response = await client.get("/metrics")
    assert response.status == 404
    assert "secret-partner" not in await response.text()
    assert "broker_outbox_depth" in await _admin_metrics(admin_url)


async def test_metrics_count_the_status_the_client_got_for_an_answered_error(
    served: tuple[TestClient[object, object], str],
) -> None:
    """A request refused with a SCIM error (401: no token) counts as 401, not 500; nor does a
    404 on an unknown path count as anything else."""
    client, admin_url = served
    refused = await client.get("/scim/v2/Users")
    assert refused.status == 401
    assert (await client.get("/no/such/path")).status == 404
    body = await _admin_metrics(admin_url)
    lines = [line for line in body.splitlines() if line.startswith("broker_http_requests_total")]
    assert any(
        'route="/scim/v2/{endpoint}"' in line and 'status="401"' in line for line in lines
    ), lines
    assert any('route="unmatched"' in line and 'status="404"' in line for line in lines), lines
    assert not any('status="500"' in line for line in lines), lines


async def add_domain_row(db_url: str, name: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("INSERT INTO domains (id, kind) VALUES ($1, 'peer')", name)
    finally:
        await conn.close()
