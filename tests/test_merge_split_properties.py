"""A property of the whole federation: after any sequence of creates, updates, deletes, group
changes, merges, splits and peer outages, once the outbox is quiet, every push peer holds each
live entity exactly once (split-offs not yet needed there excepted), with home's attributes and
memberships translated through the mapping, and no internal ID.

The sequences are random but reproducible: each test case is one seed. More seeds, or other ones:
``BROKER_PROPERTY_SEEDS=20 [BROKER_PROPERTY_FIRST_SEED=100] pytest tests/test_merge_split_properties.py``.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.propagation_support import (
    FAST,
    Gate,
    admin,
    assert_no_internal_id,
    federation,
    gate,
    held,
    home_tool,
    patch,
    quiesce,
    tenant,
)
from tests.scim_support import CORE_GROUP, Broker, Home, new_user, unique

# What a merge or split writes and the worker, running meanwhile, does not: operations, their
# outbox rows, merged entities.
SNAPSHOT = """
SELECT (SELECT count(*) FROM operations),
       (SELECT count(*) FROM outbox WHERE operation_id IS NOT NULL),
       (SELECT array_agg(row(internal_id, merged_into)::text ORDER BY internal_id)
        FROM entities WHERE state = 'merged')
"""

# Over the seeds of a run: operations, refused ones, alias clean-ups completed.
TOTALS: Counter[str] = Counter()

_FIRST_SEED = int(os.environ.get("BROKER_PROPERTY_FIRST_SEED", "0"))
SEEDS = range(_FIRST_SEED, _FIRST_SEED + int(os.environ.get("BROKER_PROPERTY_SEEDS", "4")))
STEPS = 24


@pytest.fixture
async def federated(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, dict[str, Home], Gate]]:
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    async with gate(p2) as front:
        async for broker in federation(
            db_url,
            home,
            {"P1": p1.url, "P2": front.url},
            monkeypatch,
            peer_server.token,
            FAST.model_copy(update={"conflict_patience": 20.0}),
        ):
            yield broker, {"P1": p1, "P2": p2}, front


class World:
    """What the sequence did, to pick the next step among things that exist."""

    def __init__(self, broker: Broker, home: Home, front: Gate, rng: random.Random) -> None:
        self.broker, self.home, self.front, self.rng = broker, home, front, rng
        self.users: list[str] = []
        self.groups: list[str] = []
        self.gone: set[str] = set()  # deleted in home, or merged away
        self.merged: list[str] = []
        self.keys: list[tuple[str, str]] = []  # (kind, idempotency key) of operations done
        self.touched: set[str] = set()
        self.counts: Counter[str] = Counter()

    def live_users(self) -> list[str]:
        return [u for u in self.users if u not in self.gone]

    async def step(self) -> str:
        rng, live = self.rng, self.live_users()
        choices = ["create"] * 3 + ["update"] * 2 + ["group"] * 2 + ["outage"]
        if len(live) >= 2:
            choices += ["merge"] * 2 + ["delete"]
        if live:
            choices += ["split"] * 2 + ["refused"] * 2
        action = rng.choice(choices)
        await getattr(self, action)()
        return action

    async def create(self) -> None:
        status, user = await home_tool(
            self.broker, "POST", "/Users", new_user(unique("u"), displayName=unique("n"))
        )
        assert status == 201, user
        self.users.append(user["id"])
        self.touched.add(user["id"])

    async def update(self) -> None:
        target = self.rng.choice(self.users) if self.users else None
        if target is None:
            return await self.create()
        status, _ = await home_tool(
            self.broker,
            "PATCH",
            f"/Users/{target}",
            patch({"op": "replace", "path": "displayName", "value": unique("n")}),
        )
        assert status in (200, 204, 404)

    async def delete(self) -> None:
        target = self.rng.choice(self.live_users())
        status, _ = await home_tool(self.broker, "DELETE", f"/Users/{target}")
        assert status == 204
        self.gone.add(target)

    async def group(self) -> None:
        members = self.rng.sample(self.users, min(len(self.users), self.rng.randint(0, 3)))
        body = {
            "schemas": [CORE_GROUP],
            "displayName": unique("g"),
            "members": [{"value": m} for m in members if m not in self.gone],
        }
        if self.groups and self.rng.random() < 0.5:
            target = self.rng.choice(self.groups)
            status, _ = await home_tool(self.broker, "PUT", f"/Groups/{target}", body)
            assert status == 200
            return
        status, group = await home_tool(self.broker, "POST", "/Groups", body)
        assert status == 201, group
        self.groups.append(group["id"])

    async def merge(self) -> None:
        live = self.live_users()
        picked = self.rng.sample(live, self.rng.randint(2, min(3, len(live))))
        if self.front._runner is not None and self.rng.random() < 0.5:
            # The peers are up: let them catch up first, so that both sides have accounts and
            # the loser's becomes an alias whose clean-up (memberships, delete) runs to the end.
            await quiesce(self.broker, within=60)
        key = unique("m")
        status, op = await admin(
            self.broker,
            "POST",
            "/admin/merges",
            {"survivor": picked[0], "losers": picked[1:], "idempotency_key": key},
        )
        assert status == 202, op
        self.gone.update(picked[1:])
        self.merged.extend(picked[1:])
        self.keys.append(("merge", key))
        self.counts["operations"] += 1

    async def refused(self) -> None:
        """A request the broker must refuse, with no state change: a self-merge, a merged entity,
        a user and a group, a row of another entity moved, an idempotency key reused."""
        live, rng = self.live_users(), self.rng
        someone = rng.choice(live)
        flavours = ["self-merge"]
        if self.merged:
            flavours.append("merged")
        if self.groups:
            flavours.append("type")
        others = await self.broker.pool.fetch(
            "SELECT domain_id, external_id FROM id_mappings WHERE internal_id <> $1 "
            "AND external_id IS NOT NULL",
            someone,
        )
        if others:
            flavours.append("foreign-row")
        if self.keys:
            flavours.append("key-reused")
        flavour = rng.choice(flavours)
        path = "/admin/merges"
        body: dict[str, Any] = {"survivor": someone, "losers": [someone]}
        expected = 400
        if flavour == "merged":
            path, body = "/admin/merges", {"survivor": someone, "losers": [rng.choice(self.merged)]}
            expected = 409
        elif flavour == "type":
            path, body = "/admin/merges", {"survivor": someone, "losers": [rng.choice(self.groups)]}
        elif flavour == "foreign-row":
            row = rng.choice(others)
            # Home makes the new entity (a refused split records nothing of it).
            status, new = self.home.call("POST", "/Users", new_user(unique("s")))
            assert status == 201
            path = "/admin/splits"
            body = {
                "source": someone,
                "new": [new["id"]],
                "move": {row["domain_id"]: [row["external_id"]]},
            }
        elif flavour == "key-reused":  # a merge's key for a split, or a split's for a merge
            kind, body["idempotency_key"] = rng.choice(self.keys)
            if kind == "merge":
                path, body["source"], body["new"] = "/admin/splits", someone, [str(uuid.uuid4())]
                del body["survivor"], body["losers"]
            expected = 409
        body.setdefault("idempotency_key", unique("r"))
        before = await self.broker.pool.fetchrow(SNAPSHOT)
        status, error = await admin(self.broker, "POST", path, body)
        assert status == expected, (flavour, body, error)
        assert await self.broker.pool.fetchrow(SNAPSHOT) == before, f"{flavour} changed state"
        if flavour == "foreign-row":
            recorded = await self.broker.pool.fetchval(
                "SELECT count(*) FROM entities WHERE internal_id = $1", body["new"][0]
            )
            assert recorded == 0, "a refused split records nothing of its new entity"
        self.counts["refused"] += 1
        self.counts["operations"] += 1

    async def split(self) -> None:
        source = self.rng.choice(self.live_users())
        status, new = self.home.call("POST", "/Users", new_user(unique("s"), displayName="split"))
        assert status == 201
        move: dict[str, list[str]] = {}
        rows = await self.broker.pool.fetch(
            "SELECT domain_id, external_id FROM id_mappings WHERE internal_id = $1 "
            "AND external_id IS NOT NULL AND state IN ('active', 'deletion_required')",
            source,
        )
        for row in rows:
            if self.rng.random() < 0.3:
                move.setdefault(row["domain_id"], []).append(row["external_id"])
        key = unique("s")
        status, op = await admin(
            self.broker,
            "POST",
            "/admin/splits",
            {
                "source": source,
                "new": [new["id"]],
                "move": move,
                "provision": self.rng.choice(["eager", "on_demand"]),
                "idempotency_key": key,
            },
        )
        assert status == 202, op
        self.users.append(new["id"])
        self.keys.append(("split", key))
        self.counts["operations"] += 1

    async def outage(self) -> None:
        if self.front._runner is None:
            await self.front.open()
        else:
            await self.front.close()


async def expected_in(broker: Broker, home: Home, peer: str) -> dict[str, dict[str, Any]]:
    """peer ID -> what the peer must hold under it: each live entity home has, by its primary
    there (a held-back split-off without one is not expected), with home's attributes and its
    members translated."""
    records = await broker.pool.fetch(
        """
        SELECT e.internal_id, e.resource_type, e.provision_on_demand, m.external_id
        FROM entities e
        LEFT JOIN id_mappings m ON m.internal_id = e.internal_id AND m.domain_id = $1
             AND m.is_primary AND m.state = 'active'
        WHERE e.state = 'active'
        """,
        peer,
    )
    survivor = {
        r["internal_id"]: r["merged_into"]
        for r in await broker.pool.fetch(
            "SELECT internal_id, merged_into FROM entities WHERE state = 'merged'"
        )
    }
    primary = {r["internal_id"]: r["external_id"] for r in records if r["external_id"]}
    expected: dict[str, dict[str, Any]] = {}
    for r in records:
        endpoint = "/Users" if r["resource_type"] == "User" else "/Groups"
        status, doc = home.call("GET", f"{endpoint}/{r['internal_id']}")
        if status == 404:
            continue
        assert status == 200, doc
        if r["external_id"] is None:
            if not r["provision_on_demand"]:
                history = await broker.pool.fetch(
                    "SELECT domain_id, kind, state, attempts, last_error, payload FROM outbox "
                    "WHERE internal_id = $1 ORDER BY id",
                    r["internal_id"],
                )
                rows = await broker.pool.fetch(
                    "SELECT * FROM id_mappings WHERE internal_id = $1", r["internal_id"]
                )
                raise AssertionError(
                    f"{r['internal_id']} is live in home but has no account in {peer}: "
                    f"deliveries {[dict(h) for h in history]}, rows {[dict(m) for m in rows]}"
                )
            continue
        want: dict[str, Any] = {"resource_type": r["resource_type"]}
        if r["resource_type"] == "User":
            want |= {"userName": doc["userName"], "displayName": doc.get("displayName")}
        else:
            members = {survivor.get(m["value"], m["value"]) for m in doc.get("members", [])}
            want |= {
                "displayName": doc["displayName"],
                "members": sorted(primary[m] for m in members if m in primary),
            }
        expected[r["external_id"]] = want
    return expected


def actual_in(peer: Home) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    everything = held(peer)
    for user in everything["Users"]:
        found[user["id"]] = {
            "resource_type": "User",
            "userName": user["userName"],
            "displayName": user.get("displayName"),
        }
    for group in everything["Groups"]:
        found[group["id"]] = {
            "resource_type": "Group",
            "displayName": group["displayName"],
            "members": sorted(m["value"] for m in group.get("members", [])),
        }
    return found


@pytest.fixture(scope="module", autouse=True)
def report_totals(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the seeds: how many operations, how many refused, how many alias clean-ups ran to
    the end (printed in pytest's summary)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and TOTALS:
        reporter.write_line(
            f"merge/split properties over seeds {SEEDS.start}-{SEEDS.stop - 1}: "
            f"{TOTALS['operations']} merges and splits, {TOTALS['refused']} refused, "
            f"{TOTALS['alias clean-ups completed']} alias clean-ups completed"
        )


@pytest.mark.parametrize("seed", SEEDS)
async def test_at_quiescence_every_peer_holds_each_live_entity_once(
    seed: int, federated: tuple[Broker, dict[str, Home], Gate], home: Home
) -> None:
    broker, peers, front = federated
    world = World(broker, home, front, random.Random(seed))
    actions = [await world.step() for _ in range(STEPS)]
    if front._runner is None:
        await front.open()
    await quiesce(broker, within=60)
    dead = await broker.pool.fetch(
        "SELECT domain_id, internal_id, kind, last_error FROM outbox WHERE state = 'dead'"
    )
    assert not dead, f"seed {seed} ({actions}): dead letters " + await explain_dead(
        broker, home, peers, dead
    )
    TOTALS.update(world.counts)
    TOTALS["alias clean-ups completed"] += await broker.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE kind = 'delete_alias' AND state = 'done'"
    )
    internal = set(world.users) | set(world.groups)
    for name, peer in peers.items():
        actual, expected = actual_in(peer), await expected_in(broker, home, name)
        assert actual == expected, f"seed {seed}: {name} differs after {actions}: " + await explain(
            broker, name, actual, expected
        )
        assert_no_internal_id(peer, internal)


async def explain(
    broker: Broker, peer: str, actual: dict[str, Any], expected: dict[str, Any]
) -> str:
    """What differs, with the mapping rows and deliveries of the accounts involved."""
    lines = []
    for peer_id in sorted(set(actual) | set(expected)):
        if actual.get(peer_id) == expected.get(peer_id):
            continue
        rows = await broker.pool.fetch(
            "SELECT internal_id, is_primary, state FROM id_mappings "
            "WHERE domain_id = $1 AND external_id = $2",
            peer,
            peer_id,
        )
        owners = [r["internal_id"] for r in rows]
        history = await broker.pool.fetch(
            "SELECT internal_id, kind, state, attempts, created_at FROM outbox "
            "WHERE domain_id = $1 AND internal_id = ANY($2::text[]) ORDER BY id",
            peer,
            owners,
        )
        entities = await broker.pool.fetch(
            "SELECT internal_id, state, merged_into, provision_on_demand FROM entities "
            "WHERE internal_id = ANY($1::text[])",
            owners,
        )
        held_members = (actual.get(peer_id) or {}).get("members", [])
        member_rows = await broker.pool.fetch(
            "SELECT m.external_id, m.internal_id, m.is_primary, m.state, e.state AS entity, "
            "e.provision_on_demand FROM id_mappings m JOIN entities e USING (internal_id) "
            "WHERE m.domain_id = $1 AND m.external_id = ANY($2::text[])",
            peer,
            held_members,
        )
        lines.append(
            f"{peer_id}: members' rows {[dict(r) for r in member_rows]}; "
            f"peer holds {actual.get(peer_id)}, expected {expected.get(peer_id)}; "
            f"rows {[dict(r) for r in rows]}; entities {[dict(e) for e in entities]}; "
            f"deliveries {[dict(h) for h in history]}"
        )
    return "\n".join(lines)


async def explain_dead(broker: Broker, home: Home, peers: dict[str, Home], dead: list[Any]) -> str:
    """Each dead letter, and for a refused create, who holds the conflicting userName there."""
    lines = []
    for letter in dead:
        line = f"{dict(letter)}"
        status, doc = home.call("GET", f"/Users/{letter['internal_id']}")
        if status == 200:
            taken = [
                u
                for u in held(peers[letter["domain_id"]])["Users"]
                if u["userName"] == doc["userName"]
            ]
            for account in taken:
                rows = await broker.pool.fetch(
                    "SELECT m.internal_id, m.is_primary, m.state, e.state AS entity "
                    "FROM id_mappings m JOIN entities e USING (internal_id) "
                    "WHERE m.domain_id = $1 AND m.external_id = $2",
                    letter["domain_id"],
                    account["id"],
                )
                history = await broker.pool.fetch(
                    "SELECT internal_id, kind, state, payload FROM outbox WHERE domain_id = $1 "
                    "AND internal_id = ANY($2::text[]) ORDER BY id",
                    letter["domain_id"],
                    [letter["internal_id"], *[r["internal_id"] for r in rows]],
                )
                line += (
                    f"; {doc['userName']} is held by {account['id']} (externalId "
                    f"{account.get('externalId')}), rows {[dict(r) for r in rows]}, "
                    f"deliveries {[dict(h) for h in history]}"
                )
        else:
            line += "; " + await explain_gone(broker, peers, letter)
        lines.append(line)
    return "\n".join(lines)


async def explain_gone(broker: Broker, peers: dict[str, Home], letter: Any) -> str:
    """For a dead letter of an entity home no longer has: the entity as the broker knows it,
    its rows and copy in the peer, the peer's account under each row and who else there holds
    its userName, and the entity's deliveries."""
    domain, internal_id = letter["domain_id"], letter["internal_id"]
    entity = await broker.pool.fetchrow(
        "SELECT state, merged_into FROM entities WHERE internal_id = $1", internal_id
    )
    rows = await broker.pool.fetch(
        "SELECT external_id, is_primary, state FROM id_mappings "
        "WHERE domain_id = $1 AND internal_id = $2",
        domain,
        internal_id,
    )
    copy = await broker.pool.fetchval(
        "SELECT document FROM peer_copies WHERE domain_id = $1 AND internal_id = $2",
        domain,
        internal_id,
    )
    users = held(peers[domain])["Users"]
    accounts = []
    for row in rows:
        mine = [u for u in users if u["id"] == row["external_id"]]
        name = mine[0]["userName"] if mine else None
        others = [
            (u["id"], u.get("externalId"))
            for u in users
            if name is not None and u["userName"] == name and u["id"] != row["external_id"]
        ]
        accounts.append(f"{row['external_id']}: userName {name!r}, also held by {others}")
    history = await broker.pool.fetch(
        "SELECT kind, state, attempts, payload FROM outbox WHERE domain_id = $1 "
        "AND internal_id = $2 ORDER BY id",
        domain,
        internal_id,
    )
    return (
        f"home no longer has it; entity {dict(entity) if entity else None}, rows "
        f"{[dict(r) for r in rows]}, copy {copy}, accounts {accounts}, deliveries "
        f"{[dict(h) for h in history]}"
    )
