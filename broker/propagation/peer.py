"""A push peer's SCIM service, as the delivery worker calls it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson

from broker.credentials import CredentialProblem, read_credential
from broker.http import Answer, AnswerTooLarge, exchange, is_redirect
from broker.mapping.guard import LeakGuard
from broker.propagation.bulk import (
    NO_BULK,
    WRITES,
    BulkFeatures,
    Operation,
    bulk_features,
    bulkable,
)
from broker.propagation.combining import BulkCombiner
from broker.propagation.decisions import BULK_ROOM_PAYLOAD
from broker.propagation.policy import Failure, Verdict, judge, too_large, unanswered

__all__ = ["BULK_OPERATIONS", "MAX_ANSWER", "Answer", "PeerClient", "peer_credential"]

MAX_ANSWER = 1 << 20
"""The longest answer read from a peer by default ([propagation] peer_max_answer_bytes)."""
BULK_OPERATIONS = 32
"""The most writes sent in one Bulk request by default ([propagation] bulk_operations)."""
log = logging.getLogger(__name__)


def peer_credential(
    credential_ref: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The bearer token a peer's ``credential_ref`` (``env:VAR`` or ``file:PATH``) points at,
    read afresh when its file changed; a Failure saying what to do when it cannot be read."""
    try:
        return read_credential(credential_ref, environ)
    except CredentialProblem as exc:
        if exc.permanent:
            raise Failure(Verdict.PERMANENT, str(exc)) from None
        raise Failure(Verdict.TRANSIENT, str(exc), peer_fault=False) from None


class PeerClient:
    """Calls to one peer over the worker's shared session; the peer's ServiceProviderConfig is
    read once in a while to know whether it takes PATCH, and Bulk.

    With ``bulk`` above 1 and a peer whose ServiceProviderConfig says ``bulk.supported``, the
    writes (POST, PUT, PATCH, DELETE) that deliveries send while the peer's request slots are
    busy, or in the same turn of the event loop, travel together in one Bulk request (RFC 7644
    section 3.7), at most ``bulk`` operations and the peer's limits; each call gets its own
    operation's answer, as it would have got its own request's."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str | None,
        *,
        domain: str,
        slots: asyncio.Semaphore | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        limit: int = MAX_ANSWER,
        bulk: int = BULK_OPERATIONS,
        guard: LeakGuard | None = None,
    ) -> None:
        self.session = session
        self.guard = guard
        """Reads each operation of a Bulk request as it is sent (its bulkId and path included)."""
        self.limit = limit
        """The longest answer read; a longer one is a Failure (:func:`too_large`), left unread."""
        self.bulk = bulk
        """The most operations in one Bulk request (0 or 1: none is sent)."""
        self.monotonic = monotonic
        self.slots = slots
        """Bounds the requests in flight at the peer (shared by its clients), if given."""
        self.base_url = base_url.rstrip("/")
        self.domain = domain
        self.token = token
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._features: tuple[bool, BulkFeatures, float] | None = None
        self.combiner = BulkCombiner(self)

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        bulk = self.bulk > 1 and not self.combiner.resting()
        if bulk and method in WRITES and params is None:
            operation = Operation(method, path, None if body is None else orjson.dumps(body))
            if not bulkable(operation):
                return await self._alone(method, path, data=operation.data)
            answer = await self.combiner.combined(operation)
            if is_redirect(answer.status):
                raise judge(answer.status, answer.body, answer.headers, f"{method} {path}")
            return answer
        return await self._alone(method, path, body=body, params=params)

    async def _alone(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Answer:
        """One request, in one of the peer's request slots."""
        async with self.slots if self.slots is not None else contextlib.nullcontext():
            return await self._request(method, path, body=body, params=params, data=data)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Answer:
        """One request, in the slot its caller holds (or none)."""
        try:
            answer = await exchange(
                self.session,
                method,
                self.base_url + path,
                auth=self._auth,
                params=params,
                body=body,
                data=data,
                limit=self.limit,
            )
        except AnswerTooLarge as exc:
            raise too_large(exc.status, exc.limit, exc.headers, f"{method} {path}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unanswered(f"{method} {path}", exc) from exc
        if is_redirect(answer.status):
            # Never followed and never handed on: no caller may read a 3xx as a success.
            raise judge(answer.status, answer.json_or_none(), answer.headers, f"{method} {path}")
        return Answer(answer.status, answer.headers, answer.json_or_none())

    async def supports_patch(self, ttl: float = 300.0) -> bool:
        async with self.slots if self.slots is not None else contextlib.nullcontext():
            return (await self._read_features(ttl))[0]

    async def _read_features(self, ttl: float) -> tuple[bool, BulkFeatures]:
        """Whether the peer takes PATCH, and Bulk as it takes it: its ServiceProviderConfig,
        read again after ``ttl`` seconds."""
        now = self.monotonic()
        if self._features is not None and now - self._features[2] < ttl:
            return self._features[0], self._features[1]
        # In the caller's slot: a sender of writes reads it while it holds one.
        answer = await self._request("GET", "/ServiceProviderConfig")
        supported, bulk = True, NO_BULK
        if answer.status == 200 and isinstance(answer.body, dict):
            patch = answer.body.get("patch")
            supported = bool(patch.get("supported")) if isinstance(patch, dict) else False
            bulk = bulk_features(answer.body, ceiling=self.bulk)
        self._features = (supported, bulk, now)
        return supported, bulk

    def takes_bulk(self) -> bool:
        """Whether the writes to this peer go together in Bulk requests now, as far as is known
        here: its ServiceProviderConfig, read already, says it takes Bulk with room for many
        writes a request (``decisions.BULK_ROOM_PAYLOAD``), and it has not refused one since.
        Its lane then holds more deliveries under way (``decisions.claim_room``)."""
        if self._features is None or self.bulk <= 1 or self.combiner.resting():
            return False
        features = self._features[1]
        return features.usable and features.max_payload >= BULK_ROOM_PAYLOAD

    async def single(self, operation: Operation) -> Answer:
        """The write as its own request, in the slot its sender holds (``PeerCalls``)."""
        return await self._request(operation.method, operation.path, data=operation.data)

    async def bulk_features(self) -> BulkFeatures:
        """Bulk as the peer takes it, in the sender's slot (``PeerCalls``)."""
        return (await self._read_features(300.0))[1]

    async def post_bulk(self, data: bytes) -> Answer:
        """POST /Bulk, read up to ``limit`` (``PeerCalls``): the combiner reads the answer."""
        return await exchange(
            self.session,
            "POST",
            self.base_url + "/Bulk",
            auth=self._auth,
            data=data,
            limit=self.limit,
        )

    async def find_by(self, endpoint: str, attribute: str, value: str) -> list[str]:
        """IDs of the peer's resources whose ``attribute`` equals ``value``."""
        answer = await self.call(
            "GET",
            endpoint,
            params={"filter": f"{attribute} eq {json.dumps(value)}", "attributes": "id"},
        )
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise judge(
                answer.status, answer.body, answer.headers, f"GET {endpoint} by {attribute}"
            )
        return [
            r["id"]
            for r in answer.body.get("Resources", [])
            if isinstance(r, dict) and isinstance(r.get("id"), str)
        ]
