"""Backup and restore, as docs/operations.md tells it: ``pg_dump`` of the embedded server
(``broker db run pg_dump``) plus the key file, restored into a fresh data directory, bring back a broker whose sealed passwords and
SET signing keys still work; without the key they do not (so the key must be backed up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import BOX, KEYS, POOL, create_app
from broker.cli.database import libpq_environment
from broker.config import Config, DatabaseConfig, ServerConfig
from broker.db import migrated_pool
from broker.events.keyring import KeyRing
from broker.events.keys import sign_set, verify_set
from broker.secrets import SealError, load_box

PASSWORD = "correct horse battery staple"
EVENTS = {"urn:ietf:params:SCIM:event:prov:patch:full": {"data": {}}}


def _broker(data_dir: Path, *args: str | Path) -> str:
    """``broker --data-dir DIR ARGS`` as docs/operations.md runs it (from a service or a
    container's shell: no XDG_RUNTIME_DIR); its output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BROKER_") and k != "XDG_RUNTIME_DIR"
    }
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--data-dir", str(data_dir), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


async def _populate(data_dir: Path) -> tuple[int, str]:
    """A broker's database with a password sealed in the outbox and a signing key; the
    delivery's ID and the key's ID."""
    async with migrated_pool(None, data_dir) as (pool, _url):
        box = load_box(None, data_dir)
        await pool.execute(
            "INSERT INTO domains (id, kind, push, scim_url) VALUES ('P1', 'peer', true, 'http://p1')"
        )
        await pool.execute(
            "INSERT INTO entities (internal_id, resource_type) VALUES ('E1', 'User')"
        )
        delivery: int = await pool.fetchval(
            "INSERT INTO outbox (domain_id, internal_id, kind, sealed_values) "
            "VALUES ('P1', 'E1', 'sync', $1) RETURNING id",
            box.seal({"password": PASSWORD}),
        )
        key = await KeyRing(pool, lambda: box).current()
        return delivery, key.kid


async def test_pg_dump_and_the_key_restored_into_a_fresh_data_directory_bring_the_broker_back(
    tmp_path: Path,
) -> None:
    source, restored, dump = tmp_path / "data", tmp_path / "restored", tmp_path / "broker.sql"
    delivery, kid = await _populate(source)

    # The backup: the database, with the embedded server's own pg_dump, and the key.
    said = _broker(source, "db", "run", "pg_dump", "--no-owner", "--file", dump)
    assert said == f"using the embedded PostgreSQL in {source}\n", said  # no Python warning
    assert "CREATE TABLE public.id_mappings" in dump.read_text()
    backup_key = tmp_path / "outbox.key.backup"
    shutil.copy2(source / "outbox.key", backup_key)
    shutil.rmtree(source)  # the machine is lost

    # The restore: a fresh data directory (initialised, nothing migrated), the dump loaded with
    # the embedded server's psql, the key back.
    _broker(restored, "db", "run", "psql", "-v", "ON_ERROR_STOP=1", "-q", "-f", dump)
    assert not (restored / "outbox.key").exists()
    shutil.copy2(backup_key, restored / "outbox.key")

    config = Config(server=ServerConfig(admin_port=0), database=DatabaseConfig(data_dir=restored))
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        ready = await client.get("/readyz")
        assert ready.status == 200, await ready.text()
        sealed = await app[POOL].fetchval(
            "SELECT sealed_values FROM outbox WHERE id = $1", delivery
        )
        assert app[BOX]().open(sealed) == {"password": PASSWORD}
        published = await (await client.get("/.well-known/jwks.json")).json()
        assert kid in [key["kid"] for key in published["keys"]]
        key = await app[KEYS].current()
        assert key.kid == kid, "the restored key signs, no new one was made"
        token = sign_set(
            {
                "iss": "https://broker.example",
                "jti": "j1",
                "iat": int(time.time()),
                "events": EVENTS,
            },
            key,
        )
        assert verify_set(token, published)["jti"] == "j1"

    # Without the key file, nothing sealed opens: the key is half the backup.
    with pytest.raises(SealError):
        load_box(None, tmp_path / "no-key").open(sealed)


def test_the_libpq_environment_names_the_embedded_socket_and_a_server_url() -> None:
    assert libpq_environment("postgresql://postgres:@/postgres?host=/var/lib/b") == {
        "PGDATABASE": "postgres",
        "PGHOST": "/var/lib/b",
        "PGUSER": "postgres",
    }
    assert libpq_environment("postgresql://broker:p%40ss@db.example:6432/broker") == {
        "PGDATABASE": "broker",
        "PGHOST": "db.example",
        "PGPORT": "6432",
        "PGUSER": "broker",
        "PGPASSWORD": "p@ss",
    }
