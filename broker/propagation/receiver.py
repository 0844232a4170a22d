"""The receiver of the SETs home pushes (RFC 8935) on the admin listener: home as a source of
changes, like the poller. Each SET's changes are recorded through the write journal."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from broker.domains import DomainStore
from broker.events.keys import SetError, verify_set
from broker.events.web import set_error, set_errors
from broker.home import HomeClient
from broker.http import SET_TYPE, exchange
from broker.propagation.journal import record
from broker.propagation.writes import HomeWrite
from broker.tokens import TokenStore

__all__ = ["HomeReceiver"]

log = logging.getLogger(__name__)

# RFC 9967 event URIs end in the kind, possibly followed by :notice or :full.
_KINDS = ("create", "put", "patch", "delete", "activate", "deactivate")
MAX_JWKS = 1 << 20
"""The longest JWKS read from home (a few keys take a few kilobytes)."""


class HomeReceiver:
    """``POST {admin}/home/events``: SETs the home pushes about its own changes (RFC 8935),
    checked against the home's JWKS, each turned into propagation work and SETs for the
    domains (home's state is read afresh: the SET says what to look at, not what to believe)."""

    JWKS_TTL = 300.0

    def __init__(
        self,
        pool: asyncpg.Pool,
        tokens: TokenStore,
        home: HomeClient,
        session: aiohttp.ClientSession,
        *,
        jwks_url: str,
        issuer: str | None,
    ) -> None:
        self.pool = pool
        self.tokens = tokens
        self.domains = DomainStore(pool)
        self.home = home
        self.session = session
        self.jwks_url = jwks_url
        self.issuer = issuer
        self._jwks: tuple[float, dict[str, Any]] | None = None

    @set_errors
    async def handle(self, request: web.Request) -> web.Response:
        principal = await self.tokens.authenticate(request.headers.get("Authorization"))
        if (await self.domains.get(principal.domain_id)).kind != "home":
            return set_error(
                403, "access_denied", "only the home domain's token may push SETs here"
            )
        principal.require("scim:write")
        if request.content_type != SET_TYPE:
            return set_error(
                400, "invalid_request", f"send the SET as {SET_TYPE} (RFC 8935 section 2.2)"
            )
        token = (await request.text()).strip()
        try:
            claims = await self._verify(token)
            changed, deleted, verbs = await self._changes(claims)
        except SetError as exc:
            log.warning("home SET refused: %s: %s", exc.err, exc)
            return set_error(400, exc.err, str(exc))
        documents = await self._documents(changed, deleted)
        write = HomeWrite(written=changed, deleted=tuple(deleted), verbs=verbs, documents=documents)
        async with self.pool.acquire() as conn, conn.transaction():
            await record(conn, write)
        return web.Response(status=202)

    async def _verify(self, token: str) -> dict[str, Any]:
        key_set = await self._key_set(refresh=False)
        try:
            return verify_set(token, key_set, issuer=self.issuer)
        except SetError as exc:
            if exc.err != "invalid_key":
                raise
        # A key the broker has not seen: the home may have rotated; look once more.
        return verify_set(token, await self._key_set(refresh=True), issuer=self.issuer)

    async def _key_set(self, *, refresh: bool) -> dict[str, Any]:
        now = time.monotonic()
        if not refresh and self._jwks is not None and now - self._jwks[0] < self.JWKS_TTL:
            return self._jwks[1]
        try:
            answer = await exchange(
                self.session,
                "GET",
                self.jwks_url,
                auth={},
                headers={"Accept": "application/json"},
                limit=MAX_JWKS,
            )
            if answer.status != 200:
                raise SetError("invalid_key", f"the home's JWKS answered HTTP {answer.status}")
            key_set: dict[str, Any] = answer.json()
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise SetError("invalid_key", f"the home's JWKS could not be read: {exc}") from exc
        self._jwks = (now, key_set)
        return key_set

    async def _changes(
        self, claims: Mapping[str, Any]
    ) -> tuple[dict[str, str], list[str], dict[str, str]]:
        sub_id = claims.get("sub_id")
        uri = sub_id.get("uri") if isinstance(sub_id, dict) else None
        schema = await self.home.schema()
        parsed = schema.endpoints.parse_uri(uri, "") if isinstance(uri, str) else None
        if parsed is None:
            raise SetError(
                "invalid_request", 'the SET needs a sub_id of format "scim" naming a resource URI'
            )
        resource_type, internal_id = parsed
        kinds = {_kind(uri) for uri in claims.get("events", {})} - {None}
        if not kinds:
            raise SetError("invalid_request", "the SET carries no SCIM provisioning event")
        if "delete" in kinds:
            return {}, [internal_id], {}
        verb = next((k for k in ("create", "put", "patch") if k in kinds), "patch")
        return {internal_id: resource_type}, [], {internal_id: verb}

    async def _documents(
        self, changed: dict[str, str], deleted: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Home's current resources (a resource home no longer has is deleted)."""
        schema = await self.home.schema()
        found: dict[str, dict[str, Any]] = {}
        for internal_id, resource_type in list(changed.items()):
            endpoint = schema.endpoints.by_type[resource_type]
            response = await self.home.request("GET", f"{endpoint}/{internal_id}")
            if response.status == 404:
                del changed[internal_id]
                deleted.append(internal_id)
            elif response.status == 200 and isinstance(response.body, dict):
                found[internal_id] = response.body
        return found


def _kind(uri: str) -> str | None:
    parts = uri.split(":")
    for kind in _KINDS:
        if kind in parts and "prov" in parts:
            return kind
    return None
