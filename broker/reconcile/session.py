"""A reconciler for one peer, from the configuration: the CLI opens its own client sessions,
the serving broker lends its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import asyncpg

from broker.config import Config, PropagationConfig
from broker.domains import Domain, DomainStore
from broker.errors import BrokerError
from broker.home import HomeClient
from broker.propagation.peer import PeerClient, peer_credential
from broker.propagation.policy import Failure
from broker.reconcile.runner import Progress, Reconciler

__all__ = ["make_reconciler", "open_reconciler"]


def make_reconciler(
    pool: asyncpg.Pool,
    home: HomeClient,
    session: aiohttp.ClientSession,
    domain: Domain,
    settings: PropagationConfig,
    *,
    progress: Progress,
    page_size: int | None = None,
    rate: float | None = None,
) -> Reconciler:
    """A reconciler of push peer ``domain``; BrokerError when it is not one, or its token is
    not in the environment."""
    if domain.kind != "peer" or not domain.push or domain.scim_url is None:
        raise BrokerError(
            f"{domain.id} is not a push peer: reconciliation reads a peer the broker provisions "
            "into (`broker domain list` shows which are)",
            status=400,
        )
    try:
        token = peer_credential(domain.credential_ref)
    except Failure as exc:
        raise BrokerError(f"{domain.id}: {exc.reason}", status=400) from None
    client = PeerClient(session, domain.scim_url, token, domain=domain.id)
    return Reconciler(
        pool,
        home,
        client,
        domain=domain.id,
        scope=domain.scope_filter,
        readable=domain.attribute_policy.get("read"),
        page_size=page_size or settings.reconcile_page_size,
        rate=settings.reconcile_rate if rate is None else rate,
        deletion_threshold=settings.deletion_threshold,
        progress=progress,
    )


@asynccontextmanager
async def open_reconciler(
    config: Config,
    pool: asyncpg.Pool,
    domain_id: str,
    *,
    progress: Progress,
    page_size: int | None = None,
    rate: float | None = None,
) -> AsyncIterator[Reconciler]:
    """A reconciler with client sessions of its own (for one command)."""
    if config.home.scim_url is None:
        raise BrokerError(
            "reconciliation reads home: set [home] scim_url (BROKER_HOME__SCIM_URL)", status=400
        )
    domain = await DomainStore(pool).get(domain_id)
    timeout = aiohttp.ClientTimeout(total=config.propagation.peer_timeout)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        HomeClient(
            config.home.scim_url, config.home.bearer_token(), timeout=config.home.timeout
        ) as home,
    ):
        yield make_reconciler(
            pool,
            home,
            session,
            domain,
            config.propagation,
            progress=progress,
            page_size=page_size,
            rate=rate,
        )
