"""The keys the broker signs SETs with, in PostgreSQL: the private key sealed under the outbox key,
the newest one signing, older ones published while SETs they signed may still be pending."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from broker.db import query
from broker.events.keys import SigningKey, generate_key, jwks
from broker.secrets import SecretBox

__all__ = ["KeyRing", "PublishedKey"]


@dataclass(frozen=True)
class PublishedKey:
    kid: str
    public_jwk: dict[str, Any]
    created_at: datetime
    signing: bool
    """The newest key: the one new SETs are signed with."""
    unsettled: int
    """SETs signed with it that a domain may still be given (pending, or sent and unacknowledged)."""

    @property
    def published(self) -> bool:
        return self.signing or self.unsettled > 0


class KeyRing:
    def __init__(
        self, pool: asyncpg.Pool, box: Callable[[], SecretBox], *, refresh: float = 10.0
    ) -> None:
        self.pool = pool
        self.box = box
        self.refresh = refresh
        self._current: SigningKey | None = None
        self._loaded_at = 0.0

    async def current(self) -> SigningKey:
        """The signing key: the newest in the database (looked for again every ``refresh``
        seconds, so a rotation by another process is followed); the first one is made on first
        use."""
        if self._current is not None and time.monotonic() - self._loaded_at < self.refresh:
            return self._current
        record = await self.pool.fetchrow(query("newest_signing_key"))
        if record is None:
            return await self.rotate()
        if self._current is None or self._current.kid != record["kid"]:
            self._current = self._open(record)
        self._loaded_at = time.monotonic()
        return self._current

    async def rotate(self, *, actor: str = "broker") -> SigningKey:
        """A new key, which signs from now on; the others stay published while they must.
        Audited (``signing_key_add``, the key's ``kid``)."""
        key = generate_key()
        sealed = self.box().seal({"pem": key.private_pem.decode()})
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(query("lock_signing_keys"))
            await conn.execute(query("add_signing_key"), key.kid, sealed, key.public_jwk())
            await conn.execute(query("audit"), actor, "signing_key_add", None, {"kid": key.kid})
        self._current, self._loaded_at = key, time.monotonic()
        return key

    async def keys(self) -> list[PublishedKey]:
        """Every key, newest first, with whether it is published and why."""
        return [
            PublishedKey(r["kid"], r["public_jwk"], r["created_at"], r["signing"], r["unsettled"])
            for r in await self.pool.fetch(query("published_keys"))
        ]

    async def jwks(self) -> dict[str, Any]:
        """The JWKS a receiver checks SETs against (RFC 7517)."""
        published = [k.public_jwk for k in await self.keys() if k.published]
        if not published:
            published = [(await self.current()).public_jwk()]
        return jwks(published)

    def _open(self, record: asyncpg.Record) -> SigningKey:
        pem = self.box().open(record["private_key"])["pem"]
        return SigningKey(kid=record["kid"], private_pem=pem.encode())
