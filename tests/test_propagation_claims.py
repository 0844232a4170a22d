"""The claim's lanes take each other's changes along (``Claimer.ride``): when one peer's lane
claims an entity's delivery, the other lanes claim that entity's delivery toward their peers in
the same pass (one statement for all of them), so that one read of home serves the change toward
every peer. Every rule of the claim holds for what is taken along: the oldest unfinished row of
its (peer, entity) only, due, not for a quarantined or resting lane, and within the lane's room.
Against the real PostgreSQL (no peer is called: claiming is what happens before)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from broker.domains import DomainStore
from broker.mapping import accounts
from broker.propagation.claims import Claimer, Lane
from broker.propagation.decisions import BULK_DEPTH
from broker.propagation.delivery import Claim, Peer, WorkerSettings
from tests.conftest import QueryCounter

WORKER = "w-claims"


@pytest.fixture
async def peers(counted_pool: tuple[asyncpg.Pool, QueryCounter]) -> asyncpg.Pool:
    pool, _ = counted_pool
    for name in ("P1", "P2", "P3", "P4"):
        await DomainStore(pool).add(name, scim_url=f"http://127.0.0.1:9/{name}/v2", push=True)
    return pool


async def _entities(pool: asyncpg.Pool, count: int) -> list[str]:
    ids = [uuid.uuid4().hex for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        await accounts.record_entities(conn, ids, ["User"] * count)
    return ids


async def _row(
    pool: asyncpg.Pool, peer: str, entity: str, *, state: str = "pending", due: str = "now()"
) -> int:
    row_id: int = await pool.fetchval(
        "INSERT INTO outbox (domain_id, internal_id, kind, state, next_attempt_at, claimed_by, "
        f"lease_until) VALUES ($1, $2, 'sync', $3, {due}, "
        "CASE WHEN $3 = 'in_flight' THEN 'another' END, "
        "CASE WHEN $3 = 'in_flight' THEN now() + interval '1 minute' END) RETURNING id",
        peer,
        entity,
        state,
    )
    return row_id


def _claimer(pool: asyncpg.Pool, takes_bulk: Callable[[str], bool] | None = None) -> Claimer:
    return Claimer(
        pool,
        WorkerSettings(concurrency=4),
        WORKER,
        wake=lambda: None,
        monotonic=time.monotonic,
        **({"takes_bulk": takes_bulk} if takes_bulk else {}),
    )


async def test_a_lane_toward_a_peer_taking_bulk_claims_bulk_depth_rounds_the_others_two(
    peers: asyncpg.Pool,
) -> None:
    pool = peers
    entities = await _entities(pool, 20)
    for peer in ("P1", "P2"):
        for entity in entities:
            await _row(pool, peer, entity)
    await pool.execute("UPDATE domains SET status = 'disabled' WHERE id IN ('P3', 'P4')")
    claimer = _claimer(pool, takes_bulk=lambda peer_id: peer_id == "P1")
    claimed: list[tuple[Peer, Claim, Lane]] = []
    await claimer.claim(claimed)
    own = Counter(peer.id for peer, claim, _ in claimed if not claim.ride)
    assert own == {"P1": 4 * BULK_DEPTH, "P2": 2 * 4}, own
    assert claimer.lanes["P1"].active - claimer.lanes["P1"].riding == 4 * BULK_DEPTH


async def test_a_lane_toward_a_peer_taking_bulk_takes_twice_as_many_along(
    peers: asyncpg.Pool,
) -> None:
    pool = peers
    entities = await _entities(pool, 20)
    for peer in ("P1", "P2", "P3"):
        for entity in entities:
            await _row(pool, peer, entity)
    await pool.execute("UPDATE domains SET status = 'disabled' WHERE id = 'P4'")
    claimer = _claimer(pool, takes_bulk=lambda peer_id: peer_id == "P1")
    # P1 and P2 have no room of their own: only P3's claims (8) are taken along to them.
    claimer.lanes["P1"] = Lane(active=4 * BULK_DEPTH)
    claimer.lanes["P2"] = Lane(active=2 * 4)
    claimed: list[tuple[Peer, Claim, Lane]] = []
    await claimer.claim(claimed)
    riders = Counter(peer.id for peer, claim, _ in claimed if claim.ride)
    own = Counter(peer.id for peer, claim, _ in claimed if not claim.ride)
    assert own == {"P3": 8}, own
    assert riders == {"P1": 8, "P2": 4}, riders


async def test_other_lanes_take_the_claimed_entities_along_under_the_claim_s_rules(
    peers: asyncpg.Pool,
) -> None:
    pool = peers
    a, b, c, x = await _entities(pool, 4)
    p1 = [await _row(pool, "P1", e) for e in (a, b, c)]
    # P2: an older entity of its own (not claimed along), B behind an unfinished row of B,
    # C due, A not due yet.
    await _row(pool, "P2", x)
    await _row(pool, "P2", b, state="in_flight")
    p2_b = await _row(pool, "P2", b)
    p2_c = await _row(pool, "P2", c)
    await _row(pool, "P2", a, due="now() + interval '1 hour'")
    # P3: all three due, but room for one only.
    p3 = [await _row(pool, "P3", e) for e in (a, b, c)]
    # P4: quarantined, takes nothing along.
    p4 = [await _row(pool, "P4", e) for e in (a, b, c)]
    await pool.execute("UPDATE domains SET status = 'quarantined' WHERE id = 'P4'")

    claimer = _claimer(pool)
    # P2, P3 and P4 have no room of their own (their slots taken, as many waiting).
    for name in ("P2", "P3", "P4"):
        claimer.lanes[name] = Lane(active=5)
    claimer.lanes["P3"].active, claimer.lanes["P3"].riding = 8, 3
    claimed: list[tuple[Peer, Claim, Lane]] = []
    await claimer.claim(claimed)

    got = {(peer.id, claim.id): claim.ride for peer, claim, _ in claimed}
    assert got == {
        ("P1", p1[0]): False,
        ("P1", p1[1]): False,
        ("P1", p1[2]): False,
        ("P2", p2_c): True,
        ("P3", p3[0]): True,
    }, got
    assert (claimer.lanes["P2"].active, claimer.lanes["P2"].riding) == (6, 1)
    assert (claimer.lanes["P3"].active, claimer.lanes["P3"].riding) == (9, 4)
    # What is taken along reads what the delivery starts from, as a claim does.
    rider = next(claim for peer, claim, _ in claimed if peer.id == "P2")
    assert rider.entity is not None and rider.entity["resource_type"] == "User"
    states = dict(await pool.fetch("SELECT id, state FROM outbox WHERE domain_id <> 'P1'"))
    assert states[p2_c] == states[p3[0]] == "in_flight"
    assert states[p2_b] == states[p3[1]] == "pending"
    assert all(states[i] == "pending" for i in p4)
    # A lane counts what it took along apart from its own claims: it still claims its own
    # oldest rows once it has room, and a finished rider frees its ride room.
    lane = claimer.lanes["P2"]
    rider_claim = next(claim for peer, claim, _ in claimed if peer.id == "P2")
    lane.finished(rider_claim)
    assert (lane.active, lane.riding) == (5, 0)


async def test_a_single_peer_claims_in_one_statement(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    await DomainStore(pool).add("P1", scim_url="http://127.0.0.1:9/v2", push=True)
    (a,) = await _entities(pool, 1)
    await _row(pool, "P1", a)
    claimer = _claimer(pool)
    await claimer.push_peers(time.monotonic())
    await counter.clear()
    claimed: list[tuple[Peer, Claim, Lane]] = []
    await claimer.claim(claimed)
    assert len(claimed) == 1
    assert len(await counter.sent()) == 1, await counter.sent()
