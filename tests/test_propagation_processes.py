"""Propagation with real ``broker serve`` processes: a broker killed with SIGKILL while it drains
the outbox, a second broker draining the same queue, creates whose answers died with the broker
that sent them, and PostgreSQL restarted under a running broker. Home and the push peers are real
scim2-server processes; PostgreSQL is real.

The brokers are configured as an operator would: environment variables, and the ``broker``
command for domains and tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from broker.db import EmbeddedPostgres
from tests.conftest import with_database
from tests.propagation_support import assert_no_internal_id, held, home_ids, tenant
from tests.scim_support import CORE_GROUP, Home, _free_port, new_user, unique

pytestmark = pytest.mark.slow

BROKER = [sys.executable, "-m", "broker.cli"]
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LEASE = 3  # seconds: a SIGKILLed broker's claims come back after this
OUTAGE = 3  # seconds PostgreSQL stays down: more than the broker's 1 s and 2 s retry periods
USERS = 150


# --------------------------------------------------------------------------- HTTP, blocking


def http(
    method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 30
) -> tuple[int, Any]:
    """One request; the status and the JSON answer (None when empty)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/scim+json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def patch_op(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def bulk(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [BULK], "Operations": list(operations)}


def by_filter(peer: Home, endpoint: str, scim_filter: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"filter": scim_filter, "count": "1000"})
    status, body = http("GET", f"{peer.url}/{endpoint}?{query}", peer.token)
    assert status == 200, body
    resources: list[dict[str, Any]] = body.get("Resources", [])
    return resources


# --------------------------------------------------------------------------- waiting


async def until(
    check: Callable[[], Awaitable[Any]], within: float, message: Callable[[], str] | str
) -> Any:
    """``check()``'s first truthy answer, looked for until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(0.05)


async def drained(conn: asyncpg.Connection, within: float) -> None:
    """Until no delivery is waiting or in flight (the database asked directly)."""

    async def empty() -> bool:
        left = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
        )
        return bool(left == 0)

    async def describe() -> str:
        rows = await conn.fetch(
            "SELECT id, domain_id, state, attempts, claimed_by, lease_until, last_error "
            "FROM outbox WHERE state IN ('pending', 'in_flight') ORDER BY id LIMIT 5"
        )
        return f"deliveries still waiting after {within}s: {[dict(r) for r in rows]}"

    try:
        await until(empty, within, "")
    except AssertionError:
        raise AssertionError(await describe()) from None


# --------------------------------------------------------------------------- processes


def base_environment(db_url: str, home: Home, peer_token: str) -> dict[str, str]:
    """A broker's environment: the database, home, fast retries, a short lease, no home poller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_DATABASE_URL=db_url,
        BROKER_HOME__SCIM_URL=home.url,
        BROKER_HOME__TOKEN=home.token,
        BROKER_HOME__ID_PATTERN="[0-9a-f]{32}",
        BROKER_DATABASE__POOL_MAX_SIZE="6",
        BROKER_PROPAGATION__LEASE=str(LEASE),
        BROKER_PROPAGATION__BACKOFF_BASE="0.05",
        BROKER_PROPAGATION__BACKOFF_CEILING="0.3",
        BROKER_PROPAGATION__QUARANTINE_AFTER="60",
        BROKER_PROPAGATION__QUARANTINE_RETRY="0.3",
        BROKER_PROPAGATION__HOME_POLL_INTERVAL="0",
        # Home is shared by the session's tests: the peers get none of it unless written here.
        BROKER_PROPAGATION__INITIAL_SYNC="false",
        PEER_TOKEN=peer_token,
    )
    return env


@dataclass
class Served:
    """One ``broker serve`` process: its ports, its log, and start, kill and stop."""

    name: str
    env: dict[str, str]
    directory: Path
    port: int = field(default_factory=_free_port)
    admin_port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"broker-{self.name}.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else "(no log)"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        env = {
            **self.env,
            "BROKER_SERVER__PORT": str(self.port),
            "BROKER_SERVER__ADMIN_PORT": str(self.admin_port),
            "BROKER_SERVER__PUBLIC_URL": self.url,
        }
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"===== start {self.starts} of broker {self.name}\n")
            log.flush()
            self.process = subprocess.Popen(
                [*BROKER, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ready(self, within: float = 30) -> None:
        async def answered() -> bool:
            if not self.alive():
                raise AssertionError(f"broker {self.name} exited: {self.log}")
            try:
                return http("GET", self.url + "/readyz", timeout=5)[0] == 200
            except (urllib.error.URLError, OSError):
                return False

        await until(answered, within, f"broker {self.name} not ready after {within}s")

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it does not leave in time; never leaves a process behind."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@contextmanager
def brokers(directory: Path) -> Iterator[list[Served]]:
    """The test's broker processes: always stopped at the end, their logs printed on failure."""
    started: list[Served] = []
    try:
        yield started
    except BaseException:
        for served in started:
            print(f"----- log of broker {served.name}\n{served.log}")
        raise
    finally:
        for served in started:
            served.stop()


@contextmanager
def log_on_failure(broker: Served) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(f"----- log of broker {broker.name}\n{broker.log}")
        raise


async def cli(env: dict[str, str], *args: str) -> str:
    """The ``broker`` command as an operator runs it; its stdout (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        *BROKER,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"broker {' '.join(args)} did not finish in 60s") from None
    assert process.returncode == 0, f"broker {' '.join(args)}: {err.decode()}"
    return out.decode()


async def register(
    env: dict[str, str], peers: dict[str, str], *, pull: str | None = None
) -> list[str]:
    """Domains by the command line: home H, the push ``peers`` (name -> URL) and an optional pull
    domain; returns H's token (and the pull domain's after it)."""
    adds = [cli(env, "domain", "add", "H", "--home")]
    adds += [
        cli(env, "domain", "add", name, "--scim-url", url, "--push", "--token-env", "PEER_TOKEN")
        for name, url in peers.items()
    ]
    if pull:
        adds.append(cli(env, "domain", "add", pull))
    for shown in await asyncio.gather(*adds):
        assert "domain:" in shown
    tokens = [cli(env, "token", "issue", "H")]
    if pull:
        tokens.append(cli(env, "token", "issue", pull))
    issued = [t.strip() for t in await asyncio.gather(*tokens)]
    assert all(t.startswith("bkr_") for t in issued)
    return issued


# --------------------------------------------------------------------------- home's tools


def home_write(broker: Served, token: str, method: str, path: str, body: Any = None) -> Any:
    """A write by home's tools through ``broker``'s home-facing endpoint; it must succeed."""
    status, answer = http(method, f"{broker.admin_url}/home/scim/v2{path}", token, body)
    assert 200 <= status < 300, f"{method} {path} through broker {broker.name}: {status} {answer}"
    return answer


def bulk_ids(answer: dict[str, Any]) -> list[str]:
    """Home's IDs of the resources a Bulk answer created (in the order of the operations)."""
    operations = answer["Operations"]
    assert all(str(o["status"]).startswith("2") for o in operations), operations
    return [str(o["location"]).rsplit("/", 1)[1] for o in operations]


def create_users(broker: Served, token: str, names: list[str]) -> dict[str, str]:
    """Users created in one Bulk through home's endpoint: userName -> home's ID."""
    answer = home_write(
        broker,
        token,
        "POST",
        "/Bulk",
        bulk(
            *(
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": f"u{n}",
                    "data": new_user(name, displayName=f"{name} v0", title="t0"),
                }
                for n, name in enumerate(names)
            )
        ),
    )
    return dict(zip(names, bulk_ids(answer), strict=True))


def patch_users(broker: Served, token: str, ids: list[str], attribute: str, value: str) -> None:
    """One Bulk of PATCHes through home's endpoint."""
    home_write(
        broker,
        token,
        "POST",
        "/Bulk",
        bulk(
            *(
                {
                    "method": "PATCH",
                    "path": f"/Users/{i}",
                    "data": patch_op({"op": "replace", "path": attribute, "value": value}),
                }
                for i in ids
            )
        ),
    )


# --------------------------------------------------------------------------- what peers hold


async def assert_peer_matches_home(
    conn: asyncpg.Connection, name: str, peer: Home, home: Home, prefix: str, group: str
) -> None:
    """The peer holds each of home's users (those named ``prefix...``) exactly once, with home's
    current values, one resource per correlation handle, and the group with its members under
    the peer's own IDs."""
    _, answer = home.call("GET", f'/Users?filter=userName sw "{prefix}"&count=1000')
    expected = {u["userName"]: u for u in answer["Resources"]}
    users = [u for u in held(peer)["Users"] if u["userName"].startswith(prefix)]
    counted = Counter(u["userName"] for u in users)
    twice = {n: c for n, c in counted.items() if c > 1}
    assert not twice, f"{name} holds users more than once: {twice}"
    missing = sorted(set(expected) - set(counted))
    assert not missing, f"{name} lacks {len(missing)} users, for example {missing[:3]}"
    extra = sorted(set(counted) - set(expected))
    assert not extra, f"{name} holds users home no longer has: {extra[:3]}"
    stale = [
        (u["userName"], u.get("displayName"), u.get("title"))
        for u in users
        if (u.get("displayName"), u.get("title"))
        != (expected[u["userName"]].get("displayName"), expected[u["userName"]].get("title"))
    ]
    assert not stale, f"{name} holds old values: {stale[:5]}"

    mapped = {
        r["correlation_handle"]: r["external_id"]
        for r in await conn.fetch(
            "SELECT m.correlation_handle, m.external_id FROM id_mappings m "
            "JOIN entities e USING (internal_id) "
            "WHERE m.domain_id = $1 AND m.is_primary AND m.state = 'active' "
            "AND e.resource_type = 'User'",
            name,
        )
    }
    handles = Counter(u.get("externalId") for u in users)
    assert all(c == 1 for c in handles.values()), f"{name}: a handle twice: {handles}"
    assert {u.get("externalId"): u["id"] for u in users} == mapped, (
        f"{name}: the peer's resources are not the mapping table's (one per correlation handle)"
    )

    status, home_group = home.call("GET", f"/Groups/{group}")
    assert status == 200, home_group
    peer_group = await conn.fetchval(
        "SELECT external_id FROM id_mappings WHERE domain_id = $1 AND internal_id = $2 "
        "AND is_primary AND state = 'active'",
        name,
        group,
    )
    assert peer_group is not None, f"{name} has no ID for the group"
    wanted = {m["value"] for m in home_group.get("members", [])}
    translated = {
        r["internal_id"]: r["external_id"]
        for r in await conn.fetch(
            "SELECT internal_id, external_id FROM id_mappings WHERE domain_id = $1 "
            "AND internal_id = ANY($2) AND is_primary AND state = 'active'",
            name,
            list(wanted),
        )
    }
    assert set(translated) == wanted, f"{name} lacks group members: {wanted - set(translated)}"
    status, held_group = http("GET", f"{peer.url}/Groups/{peer_group}", peer.token)
    assert status == 200, held_group
    assert held_group["displayName"] == home_group["displayName"]
    assert sorted(m["value"] for m in held_group.get("members", [])) == sorted(
        translated.values()
    ), f"{name}'s group members are not the peer's IDs of home's members"


# --------------------------------------------------------------------------- the tests


async def creates_the_peers_made(
    conn: asyncpg.Connection, peers: dict[str, Home], claims: list[asyncpg.Record]
) -> int:
    """How many of the creates among ``claims`` (domain_id, internal_id), still waiting for their
    answer, the peers carried out."""
    rows = await conn.fetch(
        "SELECT m.domain_id, m.correlation_handle, e.resource_type FROM id_mappings m "
        "JOIN entities e USING (internal_id) "
        "JOIN unnest($1::text[], $2::text[]) AS c(domain_id, internal_id) "
        "USING (domain_id, internal_id) WHERE m.state = 'pending_create'",
        [r["domain_id"] for r in claims],
        [r["internal_id"] for r in claims],
    )
    return sum(
        bool(
            by_filter(
                peers[r["domain_id"]],
                r["resource_type"] + "s",
                f'externalId eq "{r["correlation_handle"]}"',
            )
        )
        for r in rows
    )


async def kill_mid_drain(
    conn: asyncpg.Connection, victim: Served, survivor_worker: str, within: float = 30
) -> tuple[str, list[asyncpg.Record], dict[str, int]]:
    """SIGKILL ``victim`` while the outbox drains and it holds claims. It is first frozen
    (SIGSTOP) so that its claims cannot finish while they are looked at; if it holds none at that
    moment, it is let go (SIGCONT) and caught again. Returns its worker's ID, the deliveries it
    held (id, domain_id, internal_id), and the outbox's states at that moment."""
    deadline = time.monotonic() + within
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = {
            r["state"]: r["n"]
            for r in await conn.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
        }
        waiting = seen.get("pending", 0) + seen.get("in_flight", 0)
        if seen.get("done", 0) >= 100 and waiting >= 60:
            victim.signal(signal.SIGSTOP)
            held_rows = await conn.fetch(
                "SELECT id, internal_id, claimed_by FROM outbox "
                "WHERE state = 'in_flight' AND claimed_by <> $1",
                survivor_worker,
            )
            if held_rows:
                victim.kill()
                workers = {r["claimed_by"] for r in held_rows}
                assert len(workers) == 1, f"one worker besides the survivor's: {workers}"
                worker = workers.pop()
                # Asked again now that it is dead: a claim it sent just before it was frozen
                # may have committed since. Nobody can take them over before the lease ends.
                orphans = await conn.fetch(
                    "SELECT id, domain_id, internal_id FROM outbox "
                    "WHERE state = 'in_flight' AND claimed_by = $1",
                    worker,
                )
                return worker, orphans, seen
            victim.signal(signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"the outbox was never caught mid-drain with claims of broker {victim.name}: {seen}"
    )


def writer(env: dict[str, str]) -> dict[str, str]:
    """The environment of a broker that serves home's tools but delivers nothing."""
    return {**env, "BROKER_PROPAGATION__ENABLED": "false"}


async def test_a_broker_killed_mid_drain_and_a_second_one_on_the_queue_lose_and_duplicate_nothing(
    db_url: str, home: Home, peer_server: Home, tmp_path: Path
) -> None:
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    env = base_environment(db_url, home, peer_server.token)
    prefix = unique("crash")
    (token,) = await register(env, {"P1": p1.url, "P2": p2.url})
    conn = await asyncpg.connect(db_url)
    try:
        with brokers(tmp_path) as started:
            # W takes home's tools' first writes and delivers nothing; A and B deliver.
            w = Served("W", writer(env), tmp_path)
            a, b = Served("A", env, tmp_path), Served("B", env, tmp_path)
            started += [w, a, b]
            w.start()
            a.start()
            await w.ready()
            await a.ready()

            # A alone drains a first change: its worker's ID is the one that claimed it.
            create_users(w, token, [f"{prefix}-w0", f"{prefix}-w1"])
            await drained(conn, within=20)
            (worker_a,) = {
                r["claimed_by"] for r in await conn.fetch("SELECT claimed_by FROM outbox")
            }
            b.start()
            await b.ready()

            # The changes are made while A and B are frozen, so that both start on a full queue
            # and every change before the kill is in home before anything is delivered.
            names = [f"{prefix}-{n:03d}" for n in range(USERS)]
            for served in (a, b):
                served.signal(signal.SIGSTOP)
            try:
                users = create_users(w, token, names)
                ids = [users[n] for n in names]
                group = home_write(
                    w,
                    token,
                    "POST",
                    "/Groups",
                    {
                        "schemas": [CORE_GROUP],
                        "displayName": f"{prefix}-group",
                        "members": [{"value": i} for i in ids[:40]],
                    },
                )["id"]
                patch_users(w, token, ids[:30], "displayName", "v1")
            finally:
                for served in (a, b):
                    served.signal(signal.SIGCONT)

            worker_b, orphans, at_kill = await kill_mid_drain(conn, b, worker_a)
            print(f"broker B ({worker_b}) killed holding {len(orphans)} claims; outbox: {at_kill}")
            # B's claims may be creates the peer carried out while B never heard the answer.
            orphaned = {r["internal_id"] for r in orphans}
            made = await creates_the_peers_made(conn, {"P1": p1, "P2": p2}, orphans)
            print(f"of them, creates carried out by the peer, answer never heard: {made}")

            # While B is down, A takes more changes: member changes, newer values (B's claimed
            # users among them, before their claims come back), deletions.
            home_write(
                a,
                token,
                "PATCH",
                f"/Groups/{group}",
                patch_op(
                    *({"op": "remove", "path": f'members[value eq "{i}"]'} for i in ids[:5]),
                    {"op": "add", "path": "members", "value": [{"value": i} for i in ids[40:50]]},
                ),
            )
            patch_users(a, token, ids[20:40], "displayName", "v2")
            claimed_users = [i for i in ids if i in orphaned]
            if claimed_users:
                patch_users(a, token, claimed_users, "title", "after the kill")
            outside_group = [i for i in claimed_users if i in ids[50:-3]]
            for gone in ids[-3:] + outside_group[:1]:
                home_write(a, token, "DELETE", f"/Users/{gone}")

            # B again (a new worker), and changes through its own endpoint.
            b.start()
            await b.ready()
            patch_users(b, token, ids[35:45], "title", "t-final")
            draining = time.monotonic()
            await drained(conn, within=45)
            print(f"the outbox drained {time.monotonic() - draining:.1f}s after B's restart")

            dead = await conn.fetch(
                "SELECT id, domain_id, last_error FROM outbox WHERE state = 'dead'"
            )
            assert not dead, f"dead letters: {[dict(r) for r in dead]}"
            for name, peer in (("P1", p1), ("P2", p2)):
                await assert_peer_matches_home(conn, name, peer, home, prefix, group)
                assert_no_internal_id(peer, home_ids(home))

            # B's claims, frozen by the kill, came back after the lease and another worker
            # finished them; both processes delivered.
            finished = await conn.fetch(
                "SELECT id, state, claimed_by FROM outbox WHERE id = ANY($1)",
                [r["id"] for r in orphans],
            )
            assert {r["state"] for r in finished} == {"done"}, [dict(r) for r in finished]
            assert worker_b not in {r["claimed_by"] for r in finished}
            by_worker = {
                r["claimed_by"]: r["n"]
                for r in await conn.fetch(
                    "SELECT claimed_by, count(*) AS n FROM outbox WHERE state = 'done' "
                    "GROUP BY claimed_by"
                )
            }
            print(f"deliveries done by worker: {by_worker}")
            # B delivered before the kill or after its restart (a new worker): the killed
            # worker's last deliveries may die with it before their batch is recorded.
            assert len(by_worker) >= 2 and by_worker.get(worker_a), (
                f"both processes delivered: {by_worker}"
            )
            assert a.alive(), "broker A kept running throughout"
    finally:
        await conn.close()


async def test_a_broker_killed_in_the_middle_of_merges_finishes_them_after_its_restart(
    db_url: str, home: Home, peer_server: Home, tmp_path: Path
) -> None:
    """Merges whose clean-up is under way when the delivering broker is SIGKILLed: after the
    restart every operation is done, each peer holds the survivors only, no alias is left."""
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    peers = {"P1": p1, "P2": p2}
    env = base_environment(db_url, home, peer_server.token)
    prefix = unique("merge")
    (token,) = await register(env, {"P1": p1.url, "P2": p2.url})
    admin_token = (await cli(env, "token", "issue", "H", "--scopes", "admin")).strip()
    conn = await asyncpg.connect(db_url)
    try:
        with brokers(tmp_path) as started:
            w, a = Served("W", writer(env), tmp_path), Served("A", env, tmp_path)
            started += [w, a]
            w.start()
            a.start()
            await w.ready()
            await a.ready()
            pairs = 40
            names = [f"{prefix}-{n:03d}" for n in range(2 * pairs)]
            users = create_users(w, token, names)
            await drained(conn, within=45)

            # The merges are recorded while A is frozen; A is killed once it is half-way.
            a.signal(signal.SIGSTOP)
            operations = []
            try:
                for n in range(pairs):
                    survivor, loser = users[names[2 * n]], users[names[2 * n + 1]]
                    status, op = http(
                        "POST",
                        f"{w.admin_url}/admin/merges",
                        admin_token,
                        {"survivor": survivor, "losers": [loser], "idempotency_key": f"k{n}"},
                    )
                    assert status == 202, op
                    operations.append(op["id"])
            finally:
                a.signal(signal.SIGCONT)

            async def half_way() -> bool:
                done = await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE state = 'done' AND operation_id IS NOT NULL"
                )
                return bool(done >= pairs)

            await until(half_way, 30, "the merges' clean-up never got under way")
            a.kill()
            left = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
            )
            assert left > 0, "killed after the clean-up finished: the test proves nothing"
            print(f"broker A killed with {left} merge deliveries unfinished")

            a.start()
            await a.ready()
            await drained(conn, within=60)
            states = await conn.fetch(
                "SELECT state, count(*) AS n FROM operations WHERE id = ANY($1::uuid[]) "
                "GROUP BY state",
                [uuid.UUID(o) for o in operations],
            )
            stuck = await conn.fetch(
                "SELECT o.id, o.state, o.progress, d.kind, d.state AS delivery, d.domain_id "
                "FROM operations o LEFT JOIN outbox d ON d.operation_id = o.id "
                "WHERE o.state <> 'done'"
            )
            assert {r["state"]: r["n"] for r in states} == {"done": pairs}, [dict(r) for r in stuck]
            dead = await conn.fetch("SELECT id, last_error FROM outbox WHERE state = 'dead'")
            assert not dead, [dict(r) for r in dead]
            aliases = await conn.fetchval(
                "SELECT count(*) FROM id_mappings WHERE state = 'deletion_required'"
            )
            assert aliases == 0
            survivors = sorted(names[0::2])
            for name, peer in peers.items():
                held_names = sorted(u["userName"] for u in held(peer)["Users"])
                assert held_names == survivors, f"{name} holds the survivors, once, and no loser"
                assert_no_internal_id(peer, home_ids(home))
    finally:
        await conn.close()


class Withholding:
    """A front for a real peer that forwards every request, but withholds the peer's answers to
    the POSTs carrying the next ``creates`` creates (a create alone, or a SCIM Bulk request of
    several when they travel together) until ``release`` is set: the peer creates the resources
    and their creator never learns the IDs, as when a broker dies waiting for the answer.
    ``withheld`` counts the creates, not the requests."""

    def __init__(self, upstream: Home, creates: int) -> None:
        self.upstream = upstream.url
        self.creates = creates
        self.withheld = 0
        self.release = asyncio.Event()
        self.port = _free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2"

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")
        }
        raw = await request.read()
        async with self._session.request(
            request.method,
            f"{self.upstream}/{request.match_info['tail']}",
            params=request.query,
            data=raw or None,
            headers=headers,
        ) as response:
            body = await response.read()
            status = response.status
            content_type = response.headers.get("Content-Type", "application/scim+json")
        creates = self._creates(request.method, request.match_info["tail"], raw)
        if creates and self.creates:
            self.creates -= min(creates, self.creates)
            self.withheld += creates
            await self.release.wait()
            return web.Response(status=502, text="answer withheld")
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    @staticmethod
    def _creates(method: str, path: str, raw: bytes) -> int:
        """How many creates a request carries: a POST of a resource is one; a Bulk request
        carries its POST operations."""
        if method != "POST":
            return 0
        if path.rstrip("/") != "Bulk":
            return 1
        operations = json.loads(raw).get("Operations", [])
        return sum(1 for op in operations if op.get("method") == "POST")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Withholding]:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            yield self
        finally:
            self.release.set()
            await self._runner.cleanup()
            await self._session.close()


@dataclass
class LostAnswers:
    """Two creates the peer carried out while the broker that sent them was killed before it
    heard the answers; then home changed one user and deleted the other, and a broker started
    again and drained the queue."""

    conn: asyncpg.Connection
    peer: Home
    changed: dict[str, Any]
    """Home's user, as home holds it now (its title changed after the kill)."""
    deleted: dict[str, Any]
    """Home's user as it was created; home deleted it after the kill."""
    broker: Served
    """The broker that was killed and started again."""


@asynccontextmanager
async def database(pg_server: str, template: str) -> AsyncIterator[str]:
    """A migrated database of its own (as the ``db_url`` fixture, for a module's fixture)."""
    name = f"broker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        yield with_database(pg_server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
async def lost_answers(
    pg_server: str,
    template_db: str,
    home: Home,
    peer_server: Home,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LostAnswers]:
    directory = tmp_path_factory.mktemp("lost-answers")
    peer = tenant(peer_server, "pl")
    async with (
        Withholding(peer, creates=2).running() as front,
        database(pg_server, template_db) as url,
    ):
        env = base_environment(url, home, peer_server.token)
        (token,) = await register(env, {"P1": front.url})
        conn = await asyncpg.connect(url)
        try:
            with brokers(directory) as started:
                # W serves home's tools and delivers nothing; D delivers.
                w, d = Served("W", writer(env), directory), Served("D", env, directory)
                started += [w, d]
                w.start()
                d.start()
                await w.ready()
                await d.ready()
                prefix = unique("lost")
                names = [f"{prefix}-changed", f"{prefix}-deleted"]
                users = await asyncio.to_thread(create_users, w, token, names)
                changed, deleted = users[names[0]], users[names[1]]

                async def both_withheld() -> bool:
                    return front.withheld == 2

                await until(
                    both_withheld, 20, lambda: f"only {front.withheld} creates reached the peer"
                )
                d.kill()
                assert len(held(peer)["Users"]) == 2, "the peer carried out both creates"

                # Before D's claims come back (after the lease), home changes one user and
                # deletes the other.
                await asyncio.to_thread(patch_users, w, token, [changed], "title", "after the kill")
                await asyncio.to_thread(home_write, w, token, "DELETE", f"/Users/{deleted}")
                d.start()
                await d.ready()
                await drained(conn, within=30)
                _, now = home.call("GET", f"/Users/{changed}")
                yield LostAnswers(conn, peer, now, {"id": deleted, "userName": names[1]}, d)
        finally:
            await conn.close()


def peer_users(peer: Home, user_name: str) -> list[dict[str, Any]]:
    return [u for u in held(peer)["Users"] if u["userName"] == user_name]


async def test_a_create_whose_answer_died_with_the_broker_is_not_duplicated(
    lost_answers: LostAnswers,
) -> None:
    outcome = lost_answers
    with log_on_failure(outcome.broker):
        (held_user,) = peer_users(outcome.peer, outcome.changed["userName"])
        mapped = await outcome.conn.fetchrow(
            "SELECT external_id, correlation_handle FROM id_mappings "
            "WHERE domain_id = 'P1' AND internal_id = $1 AND is_primary AND state = 'active'",
            outcome.changed["id"],
        )
        assert mapped is not None, "the peer's resource is mapped"
        assert (held_user["id"], held_user["externalId"]) == tuple(mapped), "linked, not made again"
        dead = await outcome.conn.fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'")
        assert dead == 0
        assert_no_internal_id(outcome.peer, {outcome.changed["id"], outcome.deleted["id"]})


async def test_a_change_made_before_a_lost_create_is_retried_reaches_the_peer(
    lost_answers: LostAnswers,
) -> None:
    outcome = lost_answers
    with log_on_failure(outcome.broker):
        (held_user,) = peer_users(outcome.peer, outcome.changed["userName"])
        copy = json.loads(
            await outcome.conn.fetchval(
                "SELECT document FROM peer_copies WHERE domain_id = 'P1' AND internal_id = $1",
                outcome.changed["id"],
            )
        )
        assert held_user.get("title") == copy.get("title") == "after the kill", (
            f"the peer holds title {held_user.get('title')!r}; the broker's copy of what it "
            f"sent says {copy.get('title')!r}; home says {outcome.changed.get('title')!r}"
        )


async def test_a_user_deleted_before_a_lost_create_is_retried_leaves_the_peer(
    lost_answers: LostAnswers,
) -> None:
    outcome = lost_answers
    with log_on_failure(outcome.broker):
        assert peer_users(outcome.peer, outcome.deleted["userName"]) == [], (
            "home deleted the user; the peer still holds it"
        )
        retired = await outcome.conn.fetchval(
            "SELECT count(*) FROM id_mappings WHERE domain_id = 'P1' AND internal_id = $1 "
            "AND state NOT IN ('retired')",
            outcome.deleted["id"],
        )
        assert retired == 0, "no live mapping row is left for the deleted user"


@dataclass
class Restarted:
    """A broker that saw its PostgreSQL stop and start again, and what it answered meanwhile."""

    broker: Served
    url: str
    home_token: str
    pull_token: str
    peer: Home
    listening_before: list[str]
    outage: dict[str, tuple[int, Any]]
    """What the broker answered while PostgreSQL was down: probe -> (status, body)."""
    refused_user: str
    """A user home's tools tried to create while PostgreSQL was down."""


CHANNELS = [
    'LISTEN "broker_domains"',
    'LISTEN "broker_events"',
    'LISTEN "broker_mappings"',
    'LISTEN "broker_outbox"',
]


async def listened_channels(url: str) -> list[str]:
    """The channels the broker's connections listen on (their last statement), sorted."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT query FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND query LIKE 'LISTEN %' ORDER BY query"
        )
    finally:
        await conn.close()
    return [r["query"] for r in rows]


async def reaches(peer: Home, user_name: str, within: float = 30) -> None:
    async def found() -> bool:
        return bool(by_filter(peer, "Users", f'userName eq "{user_name}"'))

    await until(found, within, f"{user_name} did not reach the peer within {within}s")


@pytest.fixture(scope="module")
async def restarted(
    home: Home, peer_server: Home, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Restarted]:
    """A broker on a PostgreSQL server of its own (the session's is shared and must stay up),
    which is stopped (a fast shutdown: sessions are terminated) and started again at the same
    address while the broker runs."""
    directory = tmp_path_factory.mktemp("pg-restart")
    peer = tenant(peer_server, "pr")
    with tempfile.TemporaryDirectory(prefix="broker-pg-restart-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "data")
        url = await asyncio.to_thread(server.start)
        try:
            env = base_environment(url, home, peer_server.token)
            home_token, pull_token = await register(env, {"P1": peer.url}, pull="D")
            with brokers(directory) as started:
                broker = Served("R", env, directory)
                started.append(broker)
                broker.start()
                await broker.ready()
                before = new_user(unique("before"))
                home_write(broker, home_token, "POST", "/Users", before)
                await reaches(peer, before["userName"])

                async def all_listen() -> list[str]:
                    found = await listened_channels(url)
                    return found if len(found) == len(CHANNELS) else []

                listening_before = await until(
                    all_listen, 10, f"the broker does not listen on {len(CHANNELS)} channels"
                )

                await asyncio.to_thread(server.stop)
                # Down long enough for the worker's idle check and the listeners' reconnection
                # to try (and fail) at least once.
                await asyncio.sleep(OUTAGE)
                refused = new_user(unique("while-down"))
                outage = {
                    "healthz": http("GET", broker.url + "/healthz", timeout=10),
                    "readyz": http("GET", broker.url + "/readyz", timeout=10),
                    "domain read": http(
                        "GET", f"{broker.url}/scim/v2/Users?count=5", pull_token, timeout=10
                    ),
                    "home write": http(
                        "POST",
                        f"{broker.admin_url}/home/scim/v2/Users",
                        home_token,
                        refused,
                        timeout=10,
                    ),
                }
                print(f"answers while PostgreSQL was down: {outage}")
                assert broker.alive(), "the broker survived the outage"

                again = await asyncio.to_thread(server.start)
                assert again == url, "the restarted server answers at the same address"
                await broker.ready(within=30)
                yield Restarted(
                    broker,
                    url,
                    home_token,
                    pull_token,
                    peer,
                    listening_before,
                    outage,
                    refused["userName"],
                )
        finally:
            await asyncio.to_thread(server.stop)


async def test_postgresql_restarted_under_a_running_broker_it_reconnects_and_carries_on(
    restarted: Restarted, home: Home
) -> None:
    broker, peer = restarted.broker, restarted.peer
    with log_on_failure(broker):
        # While the database was down: alive, not ready, and SCIM 503s, not hangs or 500s.
        assert restarted.outage["healthz"][0] == 200
        status, ready = restarted.outage["readyz"]
        assert status == 503 and ready["status"] == "unavailable", ready
        for probe in ("domain read", "home write"):
            status, body = restarted.outage[probe]
            assert status == 503, (probe, status, body)
            assert body["schemas"] == [ERROR] and body["status"] == "503", (probe, body)
        _, found = home.call("GET", f'/Users?filter=userName eq "{restarted.refused_user}"')
        assert found["totalResults"] == 0, "a write refused by the broker did not reach home"

        # Back: writes reach the peer again, and domains read through the proxy again.
        after = new_user(unique("after"))
        created = home_write(broker, restarted.home_token, "POST", "/Users", after)
        await reaches(peer, after["userName"])
        status, listed = http(
            "GET",
            f"{broker.url}/scim/v2/Users?"
            + urllib.parse.urlencode({"filter": f'userName eq "{after["userName"]}"'}),
            restarted.pull_token,
        )
        assert status == 200, listed
        (seen,) = listed["Resources"]
        assert seen["userName"] == after["userName"]
        assert created["id"] not in json.dumps(listed), listed
        assert_no_internal_id(peer, {created["id"]})


async def test_after_a_postgresql_restart_the_broker_listens_for_notifications_again(
    restarted: Restarted,
) -> None:
    """The mapping cache's, the delivery worker's, the long polls' and the domain caches' LISTEN
    connections come back."""
    assert restarted.listening_before == CHANNELS

    async def listens() -> bool:
        return await listened_channels(restarted.url) == CHANNELS

    with log_on_failure(restarted.broker):
        await until(listens, 10, lambda: "the broker does not listen on every channel again")
