"""A push peer's SCIM service, as the delivery worker calls it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
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
    bulk_request,
    bulkable,
    carried,
    is_bulk_response,
    operation_answers,
    take,
)
from broker.propagation.policy import Failure, Verdict, judge, too_large

__all__ = ["BULK_OPERATIONS", "MAX_ANSWER", "Answer", "PeerClient", "peer_credential"]

MAX_ANSWER = 1 << 20
"""The longest answer read from a peer by default ([propagation] peer_max_answer_bytes)."""
BULK_OPERATIONS = 32
"""The most writes sent in one Bulk request by default ([propagation] bulk_operations)."""
REFUSED_BULK = frozenset({400, 404, 405, 413, 501})
"""A Bulk request answered so is sent again as separate requests, and the peer gets no Bulk
for ``ttl`` seconds: it does not take Bulk (whatever its ServiceProviderConfig says), or not
this one (too large, or one operation it cannot read), and each operation's own answer says
which."""
BULK_REST = 300.0
"""Seconds a peer gets no Bulk after it refused one, or answered one with what is not a
BulkResponse."""

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
        self.bulk = bulk
        """The most operations in one Bulk request (0 or 1: none is sent)."""
        self._waiting: list[tuple[Operation, asyncio.Future[Answer]]] = []
        """Writes handed over for the next Bulk request, each with its caller's answer."""
        self._bulk_off_until = 0.0
        """The longest answer read; a longer one is a Failure (:func:`too_large`), left unread."""
        self.monotonic = monotonic
        self.slots = slots
        """Bounds the requests in flight at the peer (shared by its clients), if given."""
        self.base_url = base_url.rstrip("/")
        self.domain = domain
        self.token = token
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._features: tuple[bool, BulkFeatures, float] | None = None
        self.bulk_requests = 0
        """Bulk requests sent (with ``bulk_operations``: how well the writes combine)."""
        self.bulk_operations = 0

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        bulk = self.bulk > 1 and self.monotonic() >= self._bulk_off_until
        if bulk and method in WRITES and params is None:
            operation = Operation(method, path, None if body is None else orjson.dumps(body))
            if not bulkable(operation):
                return await self._alone(method, path, data=operation.data)
            answer = await self._combined(operation)
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

    async def _combined(self, operation: Operation) -> Answer:
        """The answer to this write, sent in a Bulk request with the others handed over now, if
        the peer takes Bulk. Whoever gets a request slot first sends what waits (its own write
        included, or first), so that writes pile up while the slots are busy, and none waits for
        a timer. A write that waits alone goes as its own request, without asking the peer's
        ServiceProviderConfig. A write is sent once at most: taken from the queue by the one
        sender that sends it, or withdrawn if its caller gives up before."""
        answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        entry = (operation, answered)
        self._waiting.append(entry)
        try:
            await asyncio.sleep(0)  # the deliveries started together hand theirs over now
            while self._queued(entry):
                # A sender holds one slot for its whole request (the configuration read
                # included): nothing it does waits for another.
                async with self.slots if self.slots is not None else contextlib.nullcontext():
                    if not self._queued(entry):
                        break
                    count = await self._batch_size()
                    if not self._waiting:
                        continue
                    count = min(count, len(self._waiting))
                    batch, self._waiting = self._waiting[:count], self._waiting[count:]
                    # Shielded: the batch's other callers get their answers even if this one
                    # is cancelled.
                    await asyncio.shield(asyncio.ensure_future(self._send(batch)))
        except BaseException:
            if self._queued(entry):
                self._waiting = [e for e in self._waiting if e is not entry]
            raise
        return await answered

    def _queued(self, entry: tuple[Operation, asyncio.Future[Answer]]) -> bool:
        return any(waiting is entry for waiting in self._waiting)

    async def _batch_size(self) -> int:
        """How many of the writes waiting the next request carries: one, unless several wait
        and the peer takes Bulk (a configuration that cannot be read now means one)."""
        if len(self._waiting) < 2 or self.monotonic() < self._bulk_off_until:
            return 1
        try:
            features = (await self._read_features(300.0))[1]
        except Failure:
            return 1
        if not features.usable:
            return 1
        return take([operation for operation, _ in self._waiting], features)

    async def _send(self, batch: list[tuple[Operation, asyncio.Future[Answer]]]) -> None:
        """One Bulk request for ``batch`` (a single write goes as its own request), and each
        caller's answer set: its operation's, or the whole request's failure."""
        try:
            if len(batch) > 1:
                batch = await self._unleaked(batch)
            operations = [operation for operation, _ in batch]
            if not batch:
                return
            if len(batch) == 1:
                answers: Sequence[Answer | BaseException | None] = [
                    await self._single(operations[0])
                ]
            else:
                answers = await self._bulk(operations)
        except Exception as exc:  # Failure, or what _alone lets through: every caller's own
            for _, answered in batch:
                if not answered.done():
                    answered.set_exception(exc)
                    answered.exception()  # retrieved: its caller raises it
            return
        for (operation, answered), answer in zip(batch, answers, strict=True):
            if answered.done():
                continue
            if isinstance(answer, BaseException):
                answered.set_exception(answer)
                answered.exception()
            elif answer is None:
                answered.set_exception(
                    Failure(
                        Verdict.TRANSIENT,
                        f"{operation.method} {operation.path}: the peer's Bulk answer said "
                        "nothing of this operation; retrying until it does",
                    )
                )
                answered.exception()
            else:
                answered.set_result(answer)

    async def _unleaked(
        self, batch: list[tuple[Operation, asyncio.Future[Answer]]]
    ) -> list[tuple[Operation, asyncio.Future[Answer]]]:
        """The writes of ``batch`` that may go, each read by the leak guard as the Bulk request
        carries it (its bulkId and path with it): one whose operation holds an internal ID the
        broker knows is withheld, its caller's permanent failure. A lookup that fails raises
        (every caller's failure): fail closed."""
        if self.guard is None:
            return batch
        parts = [(f"Operations[{n}]", carried(n, op)) for n, (op, _) in enumerate(batch)]
        leaks = {leak.where: leak for leak in await self.guard.leaks(parts, in_play=())}
        kept = []
        for (where, _), (operation, answered) in zip(parts, batch, strict=True):
            leak = leaks.get(where)
            if leak is None:
                kept.append((operation, answered))
                continue
            log.error("peer %s: a Bulk operation withheld (%s)", self.domain, leak.reason)
            answered.set_exception(
                Failure(
                    Verdict.PERMANENT,
                    f"withheld: the {operation.method} in a Bulk request would expose an "
                    f"internal identifier ({leak.reason}, in {where}); check home's data for "
                    "IDs in free text",
                    peer_fault=False,
                )
            )
            answered.exception()
        return kept

    async def _single(self, operation: Operation) -> Answer:
        """The write as its own request, in the slot its sender holds."""
        return await self._request(operation.method, operation.path, data=operation.data)

    async def _bulk(self, operations: list[Operation]) -> Sequence[Answer | BaseException | None]:
        """Each operation's answer to one Bulk request carrying them all. A Bulk request the
        peer refuses as such is sent again as separate requests (``REFUSED_BULK``); an answer
        that is not a BulkResponse (another 2xx, or a 200 that is not one, or one longer than
        any peer read may be) turns Bulk off and each write is retried by its own rules; any
        other answer to the whole request is each operation's failure."""
        try:
            answer = await exchange(
                self.session,
                "POST",
                self.base_url + "/Bulk",
                auth=self._auth,
                data=bulk_request(operations),
                limit=self.limit,
            )
        except AnswerTooLarge as exc:
            failure = too_large(exc.status, exc.limit, exc.headers, "POST /Bulk")
            if failure.verdict is Verdict.TRANSIENT:
                raise failure from None
            raise self._not_bulk(
                f"HTTP {exc.status} with an answer over {exc.limit} bytes, left unread"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Failure(
                Verdict.TRANSIENT,
                f"POST /Bulk: the peer did not answer ({type(exc).__name__}); "
                "retrying until it does",
            ) from exc
        self.bulk_requests += 1
        self.bulk_operations += len(operations)
        body = answer.json_or_none()
        if answer.status == 200 and is_bulk_response(body):
            return operation_answers(body, operations)
        if answer.status in REFUSED_BULK:
            return await self._refused(operations, answer.status)
        if 200 <= answer.status < 300:
            raise self._not_bulk(f"HTTP {answer.status} without a BulkResponse")
        raise judge(answer.status, body, answer.headers, "POST /Bulk")

    async def _refused(
        self, operations: list[Operation], status: int
    ) -> list[Answer | BaseException | None]:
        """Each write of a Bulk request the peer refused as a whole, sent again alone."""
        log.info(
            "peer %s refused a Bulk request (HTTP %d): its writes go one by one for a while",
            self.domain,
            status,
        )
        self._bulk_off_until = self.monotonic() + BULK_REST
        # One after the other, in the one slot this request held.
        alone: list[Answer | BaseException | None] = []
        for operation in operations:
            try:
                alone.append(await self._single(operation))
            except Failure as exc:
                alone.append(exc)
        return alone

    def _not_bulk(self, what: str) -> Failure:
        """The failure of every write of a Bulk request answered with what is not a
        BulkResponse: the peer may have made them, so none is sent again now; each delivery
        retries by its own rules (a create looks for its correlation handle first), one by one,
        as the peer gets no Bulk for a while."""
        log.warning(
            "peer %s answered a Bulk request with %s: its writes go one by one for a while",
            self.domain,
            what,
        )
        self._bulk_off_until = self.monotonic() + BULK_REST
        return Failure(
            Verdict.TRANSIENT,
            f"POST /Bulk: {what}; the peer gets no Bulk for {BULK_REST:.0f} s, and this write "
            "is retried on its own",
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
