"""Console sessions: a token with the ``admin`` or ``console:read`` scope exchanged for a random
session ID kept in a cookie. Only the ID's SHA-256 is stored (``console_sessions``), never the
token; a session ends at its expiry, at sign-out, or when its token is revoked or expires."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from broker.db import query
from broker.errors import ForbiddenError
from broker.tokens import TokenStore

__all__ = ["CONSOLE_SCOPES", "Session", "SessionStore"]

CONSOLE_SCOPES = ("admin", "console:read")
"""Scopes that open the console: ``admin`` may act, ``console:read`` only look."""


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


@dataclass(frozen=True)
class Session:
    """Who is signed in: the actor name the audit log records, and what the token allows."""

    actor: str
    token_id: int
    domain_id: str
    scopes: frozenset[str]
    csrf: str
    expires_at: datetime

    @property
    def can_act(self) -> bool:
        """Whether the session may change anything (the ``admin`` scope), not only look."""
        return "admin" in self.scopes

    def require_admin(self) -> None:
        if not self.can_act:
            raise ForbiddenError(
                "this token has the read-only console:read scope: sign in with a token that "
                "has the admin scope to change anything"
            )


class SessionStore:
    def __init__(self, pool: asyncpg.Pool, tokens: TokenStore, ttl: timedelta) -> None:
        self.pool = pool
        self.tokens = tokens
        self.ttl = ttl

    async def start(self, token: str) -> tuple[str, Session]:
        """A new session for ``token`` (AuthenticationError or ForbiddenError when it does not
        open the console): the session ID for the cookie, and the session."""
        principal = await self.tokens.authenticate(f"Bearer {token.strip()}")
        if not principal.scopes & set(CONSOLE_SCOPES):
            raise ForbiddenError(
                "this token opens no console: it needs the admin or console:read scope, held "
                "only by the home domain's tokens: `broker token issue HOME_DOMAIN --scopes "
                "console:read`"
            )
        prefix = await self.pool.fetchval(query("console_token_prefix"), principal.token_id)
        actor = f"{principal.domain_id} token {principal.token_id} ({prefix}...)"
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + self.ttl
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(query("console_sessions_purge"))
            await conn.execute(
                query("console_session_start"),
                _digest(session_id),
                principal.token_id,
                actor,
                csrf,
                expires_at,
            )
            await conn.execute(query("audit"), actor, "console_sign_in", None, {})
        session = Session(
            actor, principal.token_id, principal.domain_id, principal.scopes, csrf, expires_at
        )
        return session_id, session

    async def find(self, session_id: str | None) -> Session | None:
        """The live session behind a cookie's value, or None."""
        if not session_id or len(session_id) > 100:
            return None
        record = await self.pool.fetchrow(query("console_session"), _digest(session_id))
        if record is None:
            return None
        scopes = frozenset(record["scopes"]) & set(CONSOLE_SCOPES)
        if record["domain_kind"] != "home" or not scopes:
            return None
        return Session(
            record["actor"],
            record["token_id"],
            record["domain_id"],
            scopes,
            record["csrf"],
            record["expires_at"],
        )

    async def end(self, session_id: str) -> None:
        """Sign-out: the session ends now, audited."""
        async with self.pool.acquire() as conn, conn.transaction():
            actor = await conn.fetchval(query("console_session_end"), _digest(session_id))
            if actor is not None:
                await conn.execute(query("audit"), actor, "console_sign_out", None, {})
