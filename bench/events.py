"""Change-notification benchmark: how fast the broker makes, signs and hands out Security Event
Tokens to a polling domain (RFC 8936), against handing out the same SETs again from their stored
tokens, and against the raw signing rate, in one run.

Home is a real scim2-server process and the broker is `broker serve`, a process of its own, with
the home poller off. Domain D subscribes with `broker events subscribe D --delivery poll` (the
CLI, notice detail, all attributes). Then N users are created through the broker's home-facing
endpoint (`{admin}/home/scim/v2`, a token of the home domain), as home's tools would: each
create records one change and, in the same transaction, one SET for D, not yet made.

D then drains its stream with `POST /events/poll`, `maxEvents` M, `returnImmediately`, batch
after batch. Each batch goes through three requests, each timed on its own:

1. **first delivery**: a poll with no `ack`. The broker finds the next M SETs, none made yet,
   and makes them: D's pairwise IDs for the users (minted, since D has none), the claims, the
   leak guard, the ES256 signature; it stores the tokens and marks the SETs sent.
2. **re-delivery**: the very same poll again, still with no `ack`. The M SETs are sent and not
   acknowledged, so RFC 8936 has them come again, and the broker answers with the stored tokens
   (the same bytes, which the benchmark checks). Nothing is rendered or signed.
3. **acknowledgement**: a poll with `ack` of the batch's jti values and `maxEvents` 0, so that
   the next batch comes.

This ordering makes the two compared requests identical (same body, same M SETs, same state of
the stream before each) except for whether the tokens exist: their difference is the cost of
making and signing. Interleaving them batch by batch, instead of draining the stream once and
then a second time, also exposes both to the same load from other work on this shared machine,
so their ratio holds better than either figure. A real client would send the `ack` with its
next poll; here it has a request of its own so that neither compared poll carries it. The sum of
the first deliveries and the acknowledgements is what a client draining the stream waits for.

The ceiling is `broker.events.keys.sign_set` called in this process (one core) on the claims of
the N SETs received, with a fresh key. At the end every SET is checked as D would check it:
the signature against `GET /.well-known/jwks.json` (joserfc), typ, aud, jti, one SET per jti
and per user, no home ID in the claims, N in all, and the stream empty.

    python bench/events.py [--users 5000] [--batch 1000]

Uses the embedded PostgreSQL in a temporary directory unless BROKER_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from broker.domains import DomainStore
from broker.events.keys import generate_key, sign_set
from broker.tokens import TokenStore

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    HOME_ID_PATTERN,
    CpuMeter,
    bench_users,
    broker_command,
    broker_serve,
    create_users,
    database,
    processes,
)
from deliveries import scim_server

DOMAIN = "D"
CREATE_NOTICE = "urn:ietf:params:scim:event:prov:create:notice"


@dataclass
class Phase:
    """One kind of poll request, summed over the batches."""

    name: str
    seconds: float = 0.0
    sets: int = 0
    polls: int = 0
    cpu: Counter[str] = field(default_factory=Counter)


@dataclass
class Outcome:
    first: Phase
    again: Phase
    ack: Phase
    sets: dict[str, str]
    """jti -> token, as first delivered."""
    duplicates: int
    """jti values delivered first more than once."""
    changed_on_redelivery: int
    """SETs whose re-delivered token differs from the first one, that did not come again, or
    that came with the batch without being in it."""
    jwks: dict[str, Any]
    issuer: str
    left: dict[str, Any]
    """The answer to a last poll, once the stream is drained."""
    states: dict[str, int]
    """D's SETs by state in the database at the end."""
    create_seconds: float


class Poller:
    """D's side of RFC 8936: each poll timed, with the CPU each process used meanwhile."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, token: str, meter: CpuMeter
    ) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.meter = meter

    async def poll(self, phase: Phase, body: Mapping[str, Any]) -> dict[str, Any]:
        data = orjson.dumps(body)
        self.meter.start()
        started = time.perf_counter()
        async with self.session.post(self.url, data=data, headers=self.headers) as response:
            raw = await response.read()
        phase.seconds += time.perf_counter() - started
        phase.cpu.update(self.meter.stop())
        assert response.status == 200, f"poll answered {response.status}: {raw[:500]!r}"
        answer: dict[str, Any] = orjson.loads(raw)
        phase.polls += 1
        phase.sets += len(answer["sets"])
        return answer


async def run(args: argparse.Namespace, tmp: Path, home: str, token: str) -> Outcome:
    users = bench_users(args.users, f"ev{uuid.uuid4().hex[:8]}")
    async with database(tmp / "pg") as (pool, db_url):
        await DomainStore(pool).add("H", kind="home")
        await DomainStore(pool).add(DOMAIN)
        tools_token, _ = await TokenStore(pool).issue("H")
        poll_token, _ = await TokenStore(pool).issue(DOMAIN)
        await broker_command(db_url, "events", "subscribe", DOMAIN, "--delivery", "poll")
        async with broker_serve(db_url, home, token, token, tmp, home_poll_interval=0) as broker:
            print(f"bench: broker pid {broker.pid}", file=sys.stderr)
            started = time.perf_counter()
            await create_users(f"{broker.admin_url}/home/scim/v2", tools_token, users)
            create_seconds = time.perf_counter() - started
            waiting = await pool.fetchval(
                "SELECT count(*) FROM security_events WHERE domain_id = $1 AND state = 'pending'",
                DOMAIN,
            )
            print(
                f"bench: {args.users} users created in {create_seconds:.1f}s; "
                f"{waiting} SETs wait for {DOMAIN}",
                file=sys.stderr,
            )
            assert waiting == args.users, f"{waiting} SETs recorded for {args.users} creates"
            await pool.execute("ANALYZE security_events, home_changes, entities, id_mappings")
            async with aiohttp.ClientSession() as session:
                # The JWKS makes the signing key when there is none yet: not a cost of a poll.
                async with session.get(f"{broker.url}/.well-known/jwks.json") as response:
                    key_set = orjson.loads(await response.read())
                roles = processes(broker.pid, tmp / "pg")  # looked up once, before the polls
                meter = CpuMeter(lambda: roles)
                poller = Poller(session, f"{broker.url}/events/poll", poll_token, meter)
                first, again, ack = (
                    Phase("first delivery: made, signed, sent"),
                    Phase("re-delivery: the stored tokens sent again"),
                    Phase("acknowledgement (ack, maxEvents 0)"),
                )
                sets: dict[str, str] = {}
                duplicates = changed = 0
                ask = {"maxEvents": args.batch, "returnImmediately": True}
                print(f"bench: polling, {args.batch} SETs a batch", file=sys.stderr)
                while True:
                    answer = await poller.poll(first, ask)
                    batch: dict[str, str] = answer["sets"]
                    if not batch:
                        break
                    duplicates += sum(jti in sets for jti in batch)
                    sets.update(batch)
                    repeated = (await poller.poll(again, ask))["sets"]
                    changed += sum(repeated.get(jti) != signed for jti, signed in batch.items())
                    changed += len(repeated.keys() - batch.keys())
                    await poller.poll(ack, {"ack": list(batch), "maxEvents": 0})
                    if len(sets) % (10 * args.batch) < args.batch:
                        print(f"bench: {len(sets)} SETs delivered", file=sys.stderr)
                    if not answer["moreAvailable"]:
                        break
                left = await poller.poll(Phase("after"), ask)
                async with session.get(f"{broker.url}/.well-known/jwks.json") as response:
                    key_set_after = orjson.loads(await response.read())
                assert key_set_after == key_set, "the JWKS changed during the run"
        states = {
            r["state"]: r["n"]
            for r in await pool.fetch(
                "SELECT state, count(*) AS n FROM security_events WHERE domain_id = $1 "
                "GROUP BY state",
                DOMAIN,
            )
        }
    return Outcome(
        first,
        again,
        ack,
        sets,
        duplicates,
        changed,
        key_set,
        broker.url,
        left,
        states,
        create_seconds,
    )


@dataclass
class Checks:
    verified: int
    verify_seconds: float
    claims: list[dict[str, Any]]
    failures: list[str]


def check(args: argparse.Namespace, out: Outcome) -> Checks:
    """Every SET as D checks it, and the stream's bookkeeping."""
    failures: list[str] = []
    keys = KeySet.import_key_set(cast(KeySetSerialization, out.jwks))
    home_id = re.compile(HOME_ID_PATTERN)
    claims: list[dict[str, Any]] = []
    started = time.perf_counter()
    for jti, token in out.sets.items():
        try:
            decoded = jwt.decode(token, keys, algorithms=["ES256"])
        except Exception as exc:  # any failure to verify is a finding, not a crash
            failures.append(f"SET {jti} does not verify: {exc!r}")
            continue
        if decoded.header.get("typ") != "secevent+jwt":
            failures.append(f"SET {jti}: typ {decoded.header.get('typ')!r}")
        c = decoded.claims
        if c.get("jti") != jti or c.get("aud") not in (DOMAIN, [DOMAIN]):
            failures.append(f"SET {jti}: jti {c.get('jti')!r}, aud {c.get('aud')!r}")
        if c.get("iss") != out.issuer or list(c.get("events", {})) != [CREATE_NOTICE]:
            failures.append(f"SET {jti}: iss {c.get('iss')!r}, events {list(c.get('events', {}))}")
        if home_id.search(orjson.dumps(c).decode()):
            failures.append(f"SET {jti} names a home ID: {c}")
        claims.append(c)
    verify_seconds = time.perf_counter() - started
    subjects = Counter(c.get("sub_id", {}).get("uri") for c in claims)
    n = args.users
    if len(out.sets) != n:
        failures.append(f"{len(out.sets)} distinct SETs delivered, for {n} users created")
    if out.duplicates:
        failures.append(f"{out.duplicates} SETs were delivered first more than once")
    if len(subjects) != n or max(subjects.values(), default=0) != 1:
        failures.append(f"{len(subjects)} distinct subjects in {len(claims)} SETs, for {n} users")
    if out.changed_on_redelivery:
        failures.append(f"{out.changed_on_redelivery} SETs came again with other bytes, or not")
    if out.first.sets != n or out.again.sets != n:
        failures.append(f"first deliveries {out.first.sets}, re-deliveries {out.again.sets}")
    if out.left != {"sets": {}, "moreAvailable": False}:
        failures.append(f"the stream is not empty at the end: {str(out.left)[:200]}")
    if out.states != {"acknowledged": n}:
        failures.append(f"{DOMAIN}'s SETs by state at the end: {out.states}")
    return Checks(len(claims), verify_seconds, claims, failures)


def signing_ceiling(claims: list[dict[str, Any]], at_least: float = 2.0) -> tuple[float, float]:
    """``sign_set`` on ``claims`` in this process with a fresh key, round after round until
    ``at_least`` seconds have passed: signatures per second of wall clock, and the share of
    that time this process was on a CPU."""
    key = generate_key()
    sign_set(claims[0], key)  # imports the key once (cached), as the broker's first SET does
    signed = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < at_least:
        for c in claims:
            sign_set(c, key)
        signed += len(claims)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return signed / wall, cpu / wall


def report(
    args: argparse.Namespace, out: Outcome, checks: Checks, sign_rate: float, sign_cpu: float
) -> str:
    n = args.users
    first, again, ack = out.first, out.again, out.ack

    def rate(count: int, seconds: float) -> str:
        return f"{count / seconds:,.0f}" if seconds > 0 else "-"

    def row(phase: Phase) -> str:
        per_poll = phase.seconds / phase.polls * 1000 if phase.polls else 0.0
        return (
            f"| {phase.name} | {phase.polls} | {phase.seconds:.2f} | {per_poll:.0f} "
            f"| {rate(phase.sets or n, phase.seconds)} |"
        )

    drain = first.seconds + ack.seconds
    sign_s = n / sign_rate  # the time signing N SETs takes at the ceiling
    ratio = (n / first.seconds) / (n / again.seconds)
    lines = [
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"load average {args.load:.1f} before the run and {os.getloadavg()[0]:.1f} after, "
        f"{n} SETs for one polling domain, maxEvents {args.batch}, notice detail.",
        "",
        "| measure | polls | seconds | ms per poll | SETs/s |",
        "|---|---|---|---|---|",
        row(first),
        row(again),
        row(ack),
        f"| drain as a client sees it: first deliveries + acknowledgements | "
        f"{first.polls + ack.polls} | {drain:.2f} | | {rate(n, drain)} |",
        f"| ceiling: `sign_set` in process, one core ({sign_cpu:.0%} on a CPU) | | "
        f"{sign_s:.2f} for {n} | | {sign_rate:,.0f} |",
        f"| for reference: joserfc verification in process | | {checks.verify_seconds:.2f} | "
        f"| {rate(checks.verified, checks.verify_seconds)} |",
        "",
        "| ratio | value |",
        "|---|---|",
        f"| first delivery / re-delivery (SETs/s) | {ratio:.0%} "
        f"(re-delivery {1 / ratio:.1f}x as fast) |",
        f"| first delivery / signing ceiling (SETs/s), i.e. signing's share of the first "
        f"deliveries' time | {sign_s / first.seconds:.0%} |",
        f"| making (first delivery minus re-delivery) per SET | "
        f"{(first.seconds - again.seconds) / n * 1e6:.0f} us |",
        "",
        "CPU seconds during the polls of each kind (by /proc, 10 ms ticks):",
        "",
        "| process | first delivery | re-delivery | acknowledgement |",
        "|---|---|---|---|",
    ]
    for role in dict.fromkeys([*first.cpu, *again.cpu, *ack.cpu]):
        lines.append(
            f"| {role} | {first.cpu[role]:.2f} | {again.cpu[role]:.2f} | {ack.cpu[role]:.2f} |"
        )
    lines += [
        "",
        f"Broker CPU per SET on first delivery: {first.cpu['broker'] / n * 1e6:.0f} us; "
        f"on re-delivery: {again.cpu['broker'] / n * 1e6:.0f} us.",
        "",
        f"- set-up: {n} users created through the home-facing endpoint in "
        f"{out.create_seconds:.1f}s ({n / out.create_seconds:.0f}/s), one SET recorded with each",
        f"- checks: {checks.verified} SETs verified against the JWKS "
        f"({len(out.jwks.get('keys', []))} key(s)); "
        + ("all checks passed" if not checks.failures else f"{len(checks.failures)} FAILED:"),
        *(f"  - {failure}" for failure in checks.failures[:20]),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000, help="users created, so SETs made")
    parser.add_argument("--batch", type=int, default=1000, help="maxEvents of each poll")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]  # other work on the machine, for the reader
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="broker-events-") as tmp, scim_server(token) as home:
        out = asyncio.run(run(args, Path(tmp), home + "/v2", token))
    checks = check(args, out)
    if not checks.claims:
        print("bench: no SET verified; nothing to sign", file=sys.stderr)
        return 1
    sign_rate, sign_cpu = signing_ceiling(checks.claims)
    print(report(args, out, checks, sign_rate, sign_cpu))
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
