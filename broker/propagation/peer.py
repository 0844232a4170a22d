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

from broker.credentials import CredentialProblem, read_credential
from broker.http import Answer, AnswerTooLarge, exchange, is_redirect
from broker.propagation.policy import Failure, Verdict, judge, too_large

__all__ = ["MAX_ANSWER", "Answer", "PeerClient", "peer_credential"]

MAX_ANSWER = 1 << 20
"""The longest answer read from a peer by default ([propagation] peer_max_answer_bytes)."""

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
    read once in a while to know whether it takes PATCH."""

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
    ) -> None:
        self.session = session
        self.limit = limit
        """The longest answer read; a longer one is a Failure (:func:`too_large`), left unread."""
        self.monotonic = monotonic
        self.slots = slots
        """Bounds the requests in flight at the peer (shared by its clients), if given."""
        self.base_url = base_url.rstrip("/")
        self.domain = domain
        self.token = token
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._patch: tuple[bool, float] | None = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        try:
            async with self.slots if self.slots is not None else contextlib.nullcontext():
                answer = await exchange(
                    self.session,
                    method,
                    self.base_url + path,
                    auth=self._auth,
                    params=params,
                    body=body,
                    limit=self.limit,
                )
        except AnswerTooLarge as exc:
            raise too_large(exc.status, exc.limit, exc.headers, f"{method} {path}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Failure(
                Verdict.TRANSIENT,
                f"{method} {path}: the peer did not answer ({type(exc).__name__}); "
                "retrying until it does",
            ) from exc
        if is_redirect(answer.status):
            # Never followed and never handed on: no caller may read a 3xx as a success.
            raise judge(answer.status, answer.json_or_none(), answer.headers, f"{method} {path}")
        return Answer(answer.status, answer.headers, answer.json_or_none())

    async def supports_patch(self, ttl: float = 300.0) -> bool:
        now = self.monotonic()
        if self._patch is not None and now - self._patch[1] < ttl:
            return self._patch[0]
        answer = await self.call("GET", "/ServiceProviderConfig")
        supported = True
        if answer.status == 200 and isinstance(answer.body, dict):
            patch = answer.body.get("patch")
            supported = bool(patch.get("supported")) if isinstance(patch, dict) else False
        self._patch = (supported, now)
        return supported

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
