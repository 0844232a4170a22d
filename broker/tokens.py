"""Bearer tokens that domains call the broker with: issued once, stored as SHA-256, revocable, scoped."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from broker.db import query
from broker.errors import BrokerError, ForbiddenError, InvalidValueError, NotFoundError

__all__ = [
    "SCOPES",
    "AuthenticationError",
    "Principal",
    "TokenInfo",
    "TokenStore",
    "effective_scopes",
    "hash_token",
    "parse_duration",
    "scope_problem",
]

SCOPES = ("scim:read", "scim:write", "admin", "console:read")
DEFAULT_SCOPES = ("scim:read", "scim:write")
TOKEN_PREFIX = "bkr_"
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LONGEST = 36500 * 86400
"""A duration longer than 100 years is refused (a longer one would overflow a date)."""


OPERATOR_SCOPES = frozenset({"admin", "console:read"})
"""Scopes of the federation's operator, held only by tokens of the home domain: the admin API
shows internal IDs (deliveries, operations) and changes the mapping (merge, split); the
console's read-only viewer (``console:read``) sees internal IDs too."""


def scope_problem(domain_id: str, domain_kind: str, scopes: Sequence[str]) -> str | None:
    """Why ``domain_id`` (of ``domain_kind``) may not hold ``scopes``, or None when it may."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        return f"unknown scope {', '.join(unknown) or '(none given)'}: use {', '.join(SCOPES)}"
    operator = sorted(OPERATOR_SCOPES & set(scopes))
    if operator and domain_kind != "home":
        return (
            f"the {', '.join(operator)} scope is the operator's and only the home domain's "
            f"tokens hold it; {domain_id} is a {domain_kind} domain: issue it with "
            "`broker token issue HOME_DOMAIN --scopes admin`"
        )
    return None


def effective_scopes(scopes: Sequence[str], domain_kind: str) -> frozenset[str]:
    """What a stored token may do: its scopes, less the operator's unless it is the home's (a
    token issued before the rule, or written by hand, gets no admin)."""
    held = frozenset(scopes)
    return held if domain_kind == "home" else held - OPERATOR_SCOPES


class AuthenticationError(BrokerError):
    """No valid bearer token (RFC 7644 section 2: 401 with WWW-Authenticate)."""

    status = 401


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``3600s``."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise InvalidValueError(
            f"{text!r} is not a duration: write a number and a unit, for example 90d, 12h or 30m"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > _LONGEST:
        raise InvalidValueError(
            f"{text!r} is longer than 100 years: write a shorter duration, for example 3650d"
        )
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    domain_id: str
    prefix: str
    scopes: list[str]
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> TokenInfo:
        return cls(**dict(record.items()))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the domain a valid token belongs to, and what it may do."""

    domain_id: str
    scopes: frozenset[str]
    token_id: int

    def require(self, scope: str) -> None:
        if scope in OPERATOR_SCOPES and scope not in self.scopes:
            raise ForbiddenError(
                f"this needs an operator token with the {scope} scope, which only the home "
                f"domain's tokens hold: `broker token issue HOME_DOMAIN --scopes {scope}`"
            )
        if scope not in self.scopes:
            raise ForbiddenError(
                f"this token lacks the {scope} scope: issue one with "
                f"`broker token issue {self.domain_id} --scopes {','.join(sorted({*self.scopes, scope}))}`"
            )


class TokenStore:
    """Issues and checks tokens. Checks are cached for ``cache_seconds``: a revocation takes
    effect within that time in every broker process; a domain disabled or removed takes effect
    at once, since every process drops its tokens' verdicts when told (:meth:`forget`)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        cache_seconds: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._cache: dict[bytes, tuple[float, asyncpg.Record | None]] = {}
        # The principal each cached row was judged to be, with the row and its expiry: a hit
        # checks only the expiry again (issue 15); a row read again is judged again.
        self._verdicts: dict[bytes, tuple[asyncpg.Record, datetime | None, Principal]] = {}

    async def issue(
        self,
        domain_id: str,
        *,
        scopes: list[str] | None = None,
        expires_in: timedelta | None = None,
        actor: str = "broker",
    ) -> tuple[str, TokenInfo]:
        """A new token for ``domain_id``: the token itself (shown once) and what is stored;
        audited (``token_issue``, never the token) in the same transaction."""
        scopes = list(DEFAULT_SCOPES) if scopes is None else scopes
        kind = await self.pool.fetchval(query("domain_kind"), domain_id)
        if kind is None:
            raise NotFoundError(
                f"there is no domain {domain_id}: add it first with `broker domain add {domain_id}`"
            )
        problem = scope_problem(domain_id, kind, scopes)
        if problem is not None:
            raise InvalidValueError(problem)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = self.clock() + expires_in if expires_in is not None else None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                record = await conn.fetchrow(
                    query("insert_token"),
                    domain_id,
                    hash_token(token),
                    token[: len(TOKEN_PREFIX) + 6],
                    scopes,
                    expires_at,
                )
                assert record is not None
                await conn.execute(
                    query("audit"),
                    actor,
                    "token_issue",
                    domain_id,
                    {
                        "token": record["id"],
                        "scopes": scopes,
                        "expires_at": expires_at.isoformat() if expires_at else None,
                    },
                )
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFoundError(
                f"there is no domain {domain_id}: add it first with `broker domain add {domain_id}`"
            ) from exc
        except asyncpg.CheckViolationError as exc:  # the domain changed in between
            raise InvalidValueError(
                f"only the home domain's tokens hold the admin scope; {domain_id} is not the home"
            ) from exc
        assert record is not None
        return token, TokenInfo.from_record(record)

    async def list(self, domain_id: str | None = None) -> list[TokenInfo]:
        return [
            TokenInfo.from_record(r) for r in await self.pool.fetch(query("list_tokens"), domain_id)
        ]

    async def revoke(self, token_id: int, *, actor: str = "broker") -> TokenInfo:
        """The token no longer authenticates; audited (``token_revoke``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(query("revoke_token"), token_id)
            if record is None:
                raise NotFoundError(
                    f"there is no unrevoked token {token_id}: `broker token list` shows the tokens"
                )
            await conn.execute(
                query("audit"), actor, "token_revoke", record["domain_id"], {"token": token_id}
            )
        self._cache.clear()
        self._verdicts.clear()
        return TokenInfo.from_record(record)

    def forget(self, domain_id: str = "") -> None:
        """Check the tokens of ``domain_id`` (every token with "") afresh at their next use: the
        domain changed (disabled, removed), perhaps in another process (``broker_domains``)."""
        if not domain_id:
            self._cache.clear()
            self._verdicts.clear()
            return
        for digest in [
            d for d, (_, r) in self._cache.items() if r is not None and r["domain_id"] == domain_id
        ]:
            self._cache.pop(digest, None)
            self._verdicts.pop(digest, None)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization: Bearer ...`` header, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("send the domain's token as Authorization: Bearer TOKEN")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be: Bearer TOKEN")
        digest = hash_token(token.strip())
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_seconds:
            record = cached[1]
            verdict = self._verdicts.get(digest)
            if verdict is not None and verdict[0] is record:
                # The same stored row already judged: only its expiry moves with the clock.
                expires_at = verdict[1]
                if expires_at is not None and expires_at <= self.clock():
                    raise AuthenticationError(
                        "the bearer token has expired: ask the broker's operator for a new one"
                    )
                return verdict[2]
        else:
            record = await self.pool.fetchrow(query("token_by_hash"), digest)
            if record is not None:
                await self.pool.execute(query("touch_token"), record["id"])
            if len(self._cache) > 10_000:
                self._cache.clear()
                self._verdicts.clear()
            self._cache[digest] = (now, record)
        principal = self._judge(record)
        if record is not None:
            if len(self._verdicts) > 10_000:
                self._verdicts.clear()
            self._verdicts[digest] = (record, record["expires_at"], principal)
        return principal

    def _judge(self, record: asyncpg.Record | None) -> Principal:
        """The principal a stored token row stands for, or why it authenticates no one."""
        if record is None:
            raise AuthenticationError("the bearer token is not known to this broker")
        if record["revoked_at"] is not None:
            raise AuthenticationError(
                "the bearer token was revoked: ask the broker's operator for a new one"
            )
        if record["expires_at"] is not None and record["expires_at"] <= self.clock():
            raise AuthenticationError(
                "the bearer token has expired: ask the broker's operator for a new one"
            )
        if record["domain_status"] in ("disabled", "removed"):
            # Known, and refused: 403 (RFC 7644 section 3.12), not 401 (the token is right).
            raise ForbiddenError(
                f"domain {record['domain_id']} is {record['domain_status']}: its operator "
                "disabled it at the broker; ask them to enable it again"
            )
        return Principal(
            record["domain_id"],
            effective_scopes(record["scopes"], record["domain_kind"]),
            record["id"],
        )
