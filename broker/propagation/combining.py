"""Writes to one push peer combined into SCIM Bulk requests (RFC 7644 section 3.7): who sends
what waits, what each request carries, when the peer gets no Bulk for a while, and each
caller's answer. The peer's own calls (one request, its ServiceProviderConfig, the Bulk
request's exchange) are ``PeerCalls`` (``peer.PeerClient``); the pure parts are in ``bulk.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp

from broker.http import Answer, AnswerTooLarge
from broker.mapping.guard import LeakGuard
from broker.propagation.bulk import (
    BulkFeatures,
    Operation,
    bulk_request,
    carried,
    is_bulk_response,
    operation_answers,
    take,
)
from broker.propagation.policy import Failure, Verdict, judge, too_large, unanswered

__all__ = ["BULK_REST", "REFUSED_BULK", "BulkCombiner", "PeerCalls"]

REFUSED_BULK = frozenset({400, 404, 405, 413, 501})
"""A Bulk request answered so is sent again as separate requests, and the peer gets no Bulk
for ``BULK_REST`` seconds: it does not take Bulk (whatever its ServiceProviderConfig says), or
not this one (too large, or one operation it cannot read), and each operation's own answer
says which."""
BULK_REST = 300.0
"""Seconds a peer gets no Bulk after it refused one, or answered one with what is not a
BulkResponse."""

log = logging.getLogger(__name__)

Waiting = tuple[Operation, "asyncio.Future[Answer]"]


class PeerCalls(Protocol):
    """What the combining needs of a peer's client."""

    domain: str
    slots: asyncio.Semaphore | None
    """Bounds the requests in flight at the peer, if given: a sender holds one."""
    monotonic: Callable[[], float]
    guard: LeakGuard | None

    async def single(self, operation: Operation) -> Answer:
        """The write as its own request, in the slot its sender holds."""

    async def bulk_features(self) -> BulkFeatures:
        """Bulk as the peer takes it (its ServiceProviderConfig, in the sender's slot); a
        Failure when it cannot be read."""

    async def post_bulk(self, data: bytes) -> Answer:
        """POST /Bulk with ``data``, read up to the peer's limit (``AnswerTooLarge`` beyond)."""


class BulkCombiner:
    """The writes that deliveries hand to one peer while its request slots are busy, or in the
    same turn of the event loop, sent together in one Bulk request, each caller answered with
    its own operation's answer, as it would have been with its own request's."""

    def __init__(self, peer: PeerCalls) -> None:
        self.peer = peer
        self._waiting: list[Waiting] = []
        """Writes handed over for the next Bulk request, each with its caller's answer."""
        self._bulk_off_until = 0.0
        self.bulk_requests = 0
        """Bulk requests sent (with ``bulk_operations``: how well the writes combine)."""
        self.bulk_operations = 0

    def resting(self) -> bool:
        """Whether the peer gets no Bulk for now (it refused one, or answered with what is
        not a BulkResponse)."""
        return self.peer.monotonic() < self._bulk_off_until

    async def combined(self, operation: Operation) -> Answer:
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
                async with (
                    self.peer.slots if self.peer.slots is not None else contextlib.nullcontext()
                ):
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

    def _queued(self, entry: Waiting) -> bool:
        return any(waiting is entry for waiting in self._waiting)

    async def _batch_size(self) -> int:
        """How many of the writes waiting the next request carries: one, unless several wait
        and the peer takes Bulk (a configuration that cannot be read now means one)."""
        if len(self._waiting) < 2 or self.peer.monotonic() < self._bulk_off_until:
            return 1
        try:
            features = await self.peer.bulk_features()
        except Failure:
            return 1
        if not features.usable:
            return 1
        return take([operation for operation, _ in self._waiting], features)

    async def _send(self, batch: list[Waiting]) -> None:
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

    async def _unleaked(self, batch: list[Waiting]) -> list[Waiting]:
        """The writes of ``batch`` that may go, each read by the leak guard as the Bulk request
        carries it (its bulkId and path with it): one whose operation holds an internal ID the
        broker knows is withheld, its caller's permanent failure. A lookup that fails raises
        (every caller's failure): fail closed."""
        if self.peer.guard is None:
            return batch
        parts = [(f"Operations[{n}]", carried(n, op)) for n, (op, _) in enumerate(batch)]
        leaks = {leak.where: leak for leak in await self.peer.guard.leaks(parts, in_play=())}
        kept = []
        for (where, _), (operation, answered) in zip(parts, batch, strict=True):
            leak = leaks.get(where)
            if leak is None:
                kept.append((operation, answered))
                continue
            log.error("peer %s: a Bulk operation withheld (%s)", self.peer.domain, leak.reason)
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
        return await self.peer.single(operation)

    async def _bulk(self, operations: list[Operation]) -> Sequence[Answer | BaseException | None]:
        """Each operation's answer to one Bulk request carrying them all. A Bulk request the
        peer refuses as such is sent again as separate requests (``REFUSED_BULK``); an answer
        that is not a BulkResponse (another 2xx, or a 200 that is not one, or one longer than
        any peer read may be) turns Bulk off and each write is retried by its own rules; any
        other answer to the whole request is each operation's failure."""
        try:
            answer = await self.peer.post_bulk(bulk_request(operations))
        except AnswerTooLarge as exc:
            failure = too_large(exc.status, exc.limit, exc.headers, "POST /Bulk")
            if failure.verdict is Verdict.TRANSIENT:
                raise failure from None
            raise self._not_bulk(
                f"HTTP {exc.status} with an answer over {exc.limit} bytes, left unread"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unanswered("POST /Bulk", exc) from exc
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
            self.peer.domain,
            status,
        )
        self._bulk_off_until = self.peer.monotonic() + BULK_REST
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
            self.peer.domain,
            what,
        )
        self._bulk_off_until = self.peer.monotonic() + BULK_REST
        return Failure(
            Verdict.TRANSIENT,
            f"POST /Bulk: {what}; the peer gets no Bulk for {BULK_REST:.0f} s, and this write "
            "is retried on its own",
        )
