"""A pushed SET (delivery kind ``set``): one Security Event Token POSTed to the domain's receiver
(RFC 8935). The events package renders it; it never imports propagation."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import asyncpg

from broker.db import query
from broker.events.render import EventRenderer
from broker.http import SET_TYPE, AnswerTooLarge, exchange
from broker.propagation.decisions import SetRefused, set_answer
from broker.propagation.delivery import Claim, Peer
from broker.propagation.peer import MAX_ANSWER, peer_credential
from broker.propagation.policy import Failure, Verdict, judge, too_large, unanswered

__all__ = ["SetPusher"]


class SetPusher:
    """POSTs the SETs of domains whose events are pushed."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        session: aiohttp.ClientSession,
        events: Callable[[], EventRenderer] | None,
        *,
        limit: int = MAX_ANSWER,
    ) -> None:
        self.pool = pool
        self.session = session
        self.events = events
        self.limit = limit
        """The longest answer read from a receiver (RFC 8935 section 2.2's answers are tiny)."""

    async def push(self, peer: Peer, claim: Claim) -> None:
        """One SET to the domain's receiver (RFC 8935): 202 is delivered; a 400 with an error
        code is the receiver's refusal, kept with the SET and dead-lettered."""
        if self.events is None or peer.events_endpoint is None:
            raise Failure(
                Verdict.PERMANENT,
                f"domain {peer.id} no longer has its SETs pushed: "
                f"`broker events subscribe {peer.id} --delivery push --endpoint URL` resumes it",
                peer_fault=False,
            )
        event_id = int(claim.payload["event"])
        rendered = await self.events().render(peer.id, ids=[event_id])
        if not rendered:
            return  # out of the domain's scope, or settled already
        (event,) = rendered
        token = peer_credential(peer.events_credential)
        what = f"POST {peer.events_endpoint} (SET {event.jti})"
        try:
            answer = await exchange(
                self.session,
                "POST",
                peer.events_endpoint,
                auth={"Authorization": f"Bearer {token}"} if token else {},
                data=event.token.encode(),
                headers={"Content-Type": SET_TYPE, "Accept": "application/json"},
                limit=self.limit,
            )
        except AnswerTooLarge as exc:
            raise too_large(exc.status, exc.limit, exc.headers, what) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unanswered(what, exc, by="the receiver") from exc
        body = answer.json_or_none()
        outcome = set_answer(answer.status, body)
        if outcome is True:
            await self.pool.execute(query("events_acknowledged"), peer.id, [event.jti])
            return
        if isinstance(outcome, SetRefused):
            error = outcome.error
            await self.pool.execute(query("event_failed"), peer.id, event_id, error)
            raise Failure(
                Verdict.PERMANENT,
                f"{what}: the receiver refused the SET: {error['err']}"
                + (f" ({error['description']})" if error.get("description") else "")
                + "; fix the receiver or the subscription, then retry the delivery",
                status=400,
                scim_error=error,
            )
        raise judge(answer.status, body, answer.headers, what)
