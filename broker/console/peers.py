"""The accounts the peers hold for one entity, as each peer holds them: a GET of the peer's
account by its own external ID (nothing else in the request: no internal ID), with the peer's
own credential, through ``broker.http.exchange`` (never following a redirect, the answer read
up to a bound, so a hostile peer can neither redirect the broker nor fill its memory)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from broker.domains import Domain
from broker.http import AnswerTooLarge, exchange, is_redirect
from broker.mapping.rules import MappingRow
from broker.propagation.peer import peer_credential
from broker.propagation.policy import Failure

__all__ = ["MAX_ANSWER", "PeerAccount", "peer_accounts"]

MAX_ANSWER = 256 * 1024
"""The longest account document read from a peer (256 KiB); a longer one is left unread."""

DEFAULT_ENDPOINTS = {"User": "/Users", "Group": "/Groups"}


@dataclass(frozen=True)
class PeerAccount:
    domain: str
    external_id: str
    status: str
    """The peer's HTTP status, or what kept the broker from asking."""
    document: str
    """The account as the peer answered it (JSON, indented), or the reason there is none."""
    ok: bool


async def _fetch(
    session: aiohttp.ClientSession, domain: Domain, endpoint: str, external_id: str
) -> PeerAccount:
    assert domain.scim_url is not None

    def failed(status: str, why: str) -> PeerAccount:
        return PeerAccount(domain.id, external_id, status, why, False)

    try:
        token = peer_credential(domain.credential_ref)
    except Failure as exc:
        return failed("not asked", exc.reason)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{domain.scim_url.rstrip('/')}{endpoint}/{quote(external_id, safe='')}"
    try:
        answer = await exchange(session, "GET", url, auth=auth, limit=MAX_ANSWER)
    except AnswerTooLarge:
        return failed("too large", f"the answer is over {MAX_ANSWER} bytes: left unread")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return failed("no answer", f"the peer did not answer ({type(exc).__name__})")
    if is_redirect(answer.status):
        return failed(f"HTTP {answer.status}", "a redirect, never followed")
    body = answer.json_or_none()
    text = json.dumps(body, indent=2, ensure_ascii=False) if body is not None else "(no JSON)"
    return PeerAccount(domain.id, external_id, f"HTTP {answer.status}", text, answer.status == 200)


async def peer_accounts(
    domains: list[Domain],
    rows: list[MappingRow],
    endpoint: str | None,
    resource_type: str,
    seconds: float = 10.0,
) -> list[PeerAccount]:
    """Each active primary account a peer with a SCIM URL holds (``rows``), asked of the peer
    at once; ``endpoint``: home's endpoint of the resource type (the worker's path too)."""
    path = endpoint or DEFAULT_ENDPOINTS.get(resource_type, "/Users")
    by_id = {d.id: d for d in domains}
    asked = [
        (by_id[r.domain], r.external_id)
        for r in rows
        if r.primary
        and r.external_id
        and r.state.value == "active"
        and r.domain in by_id
        and by_id[r.domain].kind == "peer"
        and by_id[r.domain].scim_url
        and by_id[r.domain].status not in ("disabled", "removed")
    ]
    if not asked:
        return []
    timeout = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_fetch(session, d, path, ext) for d, ext in asked)))
