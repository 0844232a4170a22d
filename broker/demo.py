"""``broker demo``: seed 002's two stories, live, on a federation started from nothing.

In a fresh temporary directory it starts an embedded PostgreSQL, a home and two push peers (real
scim2-server processes: home on its own, the peers as tenants ``/p1/v2`` and ``/p2/v2`` of a
second one) and the broker in this process. It provisions three people through home's tools,
then walks through the seed's false positive (a split) and false negative (a merge), printing
at each step the mapping table as the seed draws it and what each peer holds, under the peers'
own IDs. At the end it checks that no internal ID reached a peer. ``--keep-running`` leaves the
federation up and prints the URLs and tokens to try it with curl.

The peers are reached through a pass-through of the demo's own (the "link"), which the demo
holds shut for a moment during the merge, so that the table can be seen between the merge and
the peers' acknowledgement: in a real federation that moment may last minutes or days.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from pydantic import SecretStr

from broker import DEMO_INSTALL_HINT
from broker.app import ADMIN_URL, POOL, STORE, create_app
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from broker.domains import DomainStore
from broker.mapping.render import mapping_table
from broker.output import indent, say, table
from broker.tokens import TokenStore

__all__ = ["run_demo"]

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
# scim2-server's IDs: 32 hexadecimal digits (home's shape, for the leak guard).
HOME_ID_PATTERN = "[0-9a-f]{32}"
# The variable the peers' credential_ref names (not BROKER_...: that prefix is configuration).
PEER_TOKEN_ENV = "SCIM_DEMO_PEER_TOKEN"
READY_WITHIN = 30.0
SETTLE_WITHIN = 30.0


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def _note(text: str) -> None:
    say(f"    .. {text}", stdout=True)


def _heading(title: str) -> None:
    rule = "=" * 78
    say(f"\n{rule}\n{title}\n{rule}", stdout=True)


def _step(label: str, text: str) -> None:
    paragraph = textwrap.fill(
        f"[{label}] {text}", width=100, subsequent_indent=" " * (len(label) + 3)
    )
    say("\n" + paragraph, stdout=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Service:
    """A SCIM service reached directly (home, or a peer), bypassing the broker."""

    name: str
    url: str
    token: str


@dataclass(frozen=True)
class Person:
    label: str
    user_name: str
    internal_id: str


@dataclass
class Link:
    """The peers' network link: a pass-through to their scim2-server, which the demo can hold
    shut (requests wait, nothing is lost). It keeps what the broker sent, for the final check."""

    upstream: str
    session: aiohttp.ClientSession
    port: int = field(default_factory=_free_port)
    open: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[tuple[str, str, str]] = field(default_factory=list)
    """(peer tenant, method, path + body) of every request the broker made to the peers."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def changes(self, tenant: str, since: int) -> list[str]:
        return [
            text.split("\n", 1)[0]
            for name, method, text in self.sent[since:]
            if name == tenant and method != "GET"
        ]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        await self.open.wait()
        tail = request.match_info["tail"]
        body = await request.read()
        tenant = tail.split("/", 1)[0]
        path = "/" + tail.split("/", 1)[-1] if "/" in tail else "/"
        query = f"?{request.query_string}" if request.query_string else ""
        self.sent.append(
            (
                tenant,
                request.method,
                f"{request.method} {path.removeprefix('/v2')}{query}\n{body.decode(errors='replace')}",
            )
        )
        headers = {
            k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")
        }
        async with self.session.request(
            request.method,
            f"{self.upstream}/{tail}",
            params=request.query,
            data=body or None,
            headers=headers,
        ) as answer:
            raw = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k in ("ETag", "Location")}
            response = web.Response(status=answer.status, body=raw, headers=kept)
            if "Content-Type" in answer.headers:
                response.headers["Content-Type"] = answer.headers["Content-Type"]
            return response

    async def start(self) -> web.AppRunner:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.open.set()
        return runner


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str,
    body: Any = None,
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
    data = json.dumps(body) if body is not None else None
    async with session.request(method, url, data=data, headers=headers) as response:
        raw = await response.read()
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = raw.decode(errors="replace")
        return response.status, document, dict(response.headers)


async def _start_scim_server(
    stack: AsyncExitStack, directory: Path, name: str, token: str, *args: str
) -> tuple[asyncio.subprocess.Process, int, Path]:
    """A scim2-server process, stopped when ``stack`` closes."""
    port = _free_port()
    log_path = directory / f"{name}.log"
    log_file = stack.enter_context(log_path.open("wb"))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scim2_server.testserver.cli",
        "--port",
        str(port),
        "--bearer-token",
        token,
        *args,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
    )

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
    return process, port, log_path


async def _ready(
    session: aiohttp.ClientSession,
    name: str,
    process: asyncio.subprocess.Process,
    probe: str,
    token: str,
    log_path: Path,
) -> None:
    """Until the server answers ``probe``; a clear error if it exits or takes too long."""
    deadline = time.monotonic() + READY_WITHIN
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            status, _, _ = await _call(session, "GET", probe, token)
            if status == 200:
                return
        if process.returncode is not None or time.monotonic() > deadline:
            log = _tail(log_path)
            reason = (
                f"exited with status {process.returncode}"
                if process.returncode is not None
                else f"did not answer within {READY_WITHIN:.0f} s"
            )
            hint = f"; is scim2-server installed? {DEMO_INSTALL_HINT}" if "No module" in log else ""
            raise DemoError(f"the {name} (scim2-server) {reason}{hint}. Its log:\n{log}")
        await asyncio.sleep(0.1)


def _patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


class Demo:
    """The running federation, and the steps of the walk-through."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        app: web.Application,
        home: Service,
        peers: dict[str, Service],
        link: Link,
        tokens: dict[str, str],
        broker_url: str,
    ) -> None:
        self.session = session
        self.app = app
        self.home = home
        self.peers = peers
        self.link = link
        self.tokens = tokens
        self.broker_url = broker_url
        self.admin_url = app[ADMIN_URL]
        self.internal_ids: set[str] = set()
        self.group_id = ""
        self.operations: list[str] = []

    # ------------------------------------------------------------------ calls

    async def home_tool(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Home's own tools, writing through the broker's home-facing endpoint."""
        status, document, _ = await _call(
            self.session, method, f"{self.admin_url}/home/scim/v2{path}", self.tokens["home"], body
        )
        if status >= 300:
            raise DemoError(f"home's tools: {method} {path} answered {status}: {document}")
        return status, document

    async def home_direct(self, method: str, path: str, body: Any = None) -> Any:
        """Straight to home, not through the broker (the broker does not see it)."""
        status, document, _ = await _call(
            self.session, method, self.home.url + path, self.home.token, body
        )
        if status >= 300:
            raise DemoError(f"home: {method} {path} answered {status}: {document}")
        return document

    async def admin(self, method: str, url: str, body: Any = None) -> tuple[Any, dict[str, str]]:
        status, document, headers = await _call(
            self.session, method, url, self.tokens["admin"], body
        )
        if status >= 300:
            raise DemoError(f"admin API: {method} {url} answered {status}: {document}")
        return document, headers

    async def peer_holds(self, peer: Service) -> dict[str, list[dict[str, Any]]]:
        held = {}
        for endpoint in ("Users", "Groups"):
            status, document, _ = await _call(
                self.session, "GET", f"{peer.url}/{endpoint}?count=1000", peer.token
            )
            if status != 200 or not isinstance(document, dict):
                raise DemoError(f"{peer.name}: GET /{endpoint} answered {status}: {document}")
            held[endpoint] = list(document.get("Resources") or [])
        return held

    # ------------------------------------------------------------------ steps

    async def provision(self, label: str, user_name: str) -> Person:
        _, user = await self.home_tool(
            "POST",
            "/Users",
            {"schemas": [CORE_USER], "userName": user_name, "displayName": label},
        )
        person = Person(label, user_name, user["id"])
        self.internal_ids.add(person.internal_id)
        _note(
            f"home's tools: POST /Users {user_name!r} ({label}) -> internal ID {person.internal_id}"
        )
        return person

    async def settle(self) -> None:
        """Until the outbox has nothing waiting or in flight (bounded), and no dead letter."""
        pool = self.app[POOL]
        started = time.monotonic()
        count = "SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')"
        initially = waiting = await pool.fetchval(count)
        if initially:
            _note(f"the broker delivers to the peers ({initially} deliveries waiting) ...")
        else:
            _note("nothing for the broker to deliver: the outbox is empty")
        while waiting:
            if time.monotonic() - started > SETTLE_WITHIN:
                rows = await pool.fetch(
                    "SELECT id, domain_id, kind, state, attempts, last_error FROM outbox "
                    "WHERE state IN ('pending', 'in_flight') ORDER BY id LIMIT 5"
                )
                raise DemoError(
                    f"{waiting} deliveries still waiting after {SETTLE_WITHIN:.0f} s: "
                    f"{[dict(r) for r in rows]}"
                )
            await asyncio.sleep(0.05)
            waiting = await pool.fetchval(count)
        dead = await pool.fetch(
            "SELECT id, domain_id, kind, last_error FROM outbox WHERE state = 'dead' ORDER BY id"
        )
        if dead:
            raise DemoError(f"deliveries were dead-lettered: {[dict(r) for r in dead]}")
        if initially:
            _note(f"outbox drained in {time.monotonic() - started:.2f} s")

    async def show_table(self, people: Iterable[Person], title: str) -> None:
        people = list(people)
        order = {p.internal_id: i for i, p in enumerate(people)}
        rows = await self.app[STORE].rows_of(list(order))
        rows.sort(key=lambda r: (order[r.internal_id], r.domain, not r.primary, r.state.value))
        say(f"    The mapping table: {title}", stdout=True)
        say(
            "    (" + "; ".join(f"{p.label} is {p.internal_id} in home" for p in people) + ")",
            stdout=True,
        )
        say(indent(mapping_table(rows)), stdout=True)
        if not rows:
            say("    (no rows)", stdout=True)

    async def show_peers(self, *names: str) -> None:
        for name in names or tuple(self.peers):
            peer = self.peers[name]
            held = await self.peer_holds(peer)
            users = sorted(held["Users"], key=lambda u: str(u.get("userName", "")))
            by_id = {u["id"]: u.get("userName", "?") for u in users}
            say(
                f"    What {name} holds, asked directly ({peer.url}), under its own IDs:",
                stdout=True,
            )
            say(
                indent(
                    table(
                        (f"{name}'s own ID", "userName", "displayName"),
                        [(u["id"], u.get("userName", ""), u.get("displayName", "")) for u in users],
                    )
                ),
                stdout=True,
            )
            for group in held["Groups"]:
                members = ", ".join(
                    f"{m.get('value')} ({by_id.get(m.get('value', ''), '?')})"
                    for m in group.get("members") or []
                )
                say(
                    f"    group {group.get('displayName')!r}, {name}'s own ID {group['id']}: "
                    f"members {members or '(none)'}",
                    stdout=True,
                )

    async def operation(self, location: str) -> dict[str, Any]:
        document, _ = await self.admin("GET", location)
        assert isinstance(document, dict)
        return document

    # ------------------------------------------------------------------ the stories

    async def false_positive(self, john: Person) -> None:
        _heading("Story a: a false positive (one entity is really two)")
        _step(
            "a.1",
            "Home provisioned John Smith into P1 and P2; each answered with an ID of its own.",
        )
        await self.show_table([john], "John Smith in both peers")
        other = await self._split_off(john)
        await self._needed(john, other)

    async def _split_off(self, john: Person) -> Person:
        """a.2: the second John Smith gets an internal ID of its own and is split off."""
        _step(
            "a.2",
            "The false positive is found: two customers share the name John Smith. Home gives "
            "the second one a new internal ID (created in home directly, not through the broker), "
            "and its tools ask the broker for a split, provisioned on demand.",
        )
        other_user = await self.home_direct(
            "POST",
            "/Users",
            {"schemas": [CORE_USER], "userName": "john.smith.2", "displayName": "John Smith"},
        )
        other = Person("the second John Smith", "john.smith.2", other_user["id"])
        self.internal_ids.add(other.internal_id)
        _note(f"home: POST /Users 'john.smith.2' -> internal ID {other.internal_id}")
        body = {
            "source": john.internal_id,
            "new": [other.internal_id],
            "provision": "on_demand",
            "idempotency_key": f"demo-split-{secrets.token_hex(4)}",
        }
        _note(f"admin API: POST /admin/splits {json.dumps(body)}")
        document, headers = await self.admin("POST", f"{self.admin_url}/admin/splits", body)
        location = headers.get("Location", document.get("location"))
        _note(f"202 Accepted, Location {location}")
        await self.settle()
        op = await self.operation(location)
        _note(f"the split's state: {op['state']}")
        await self.show_table(
            [john, other],
            "unchanged; the new entity has no row, it is invisible to the peers by design",
        )
        say("    P2 is not aware of the split:", stdout=True)
        await self.show_peers("P2")
        return other

    async def _needed(self, john: Person, other: Person) -> None:
        """a.3: the new entity is provisioned into the peers when a group first names it."""
        _step(
            "a.3",
            "At some convenient time, the new entity is needed in the peers: home's tools "
            "create a group 'Newsletter' naming it. The broker provisions it into P1 and P2 "
            "first, and records the IDs they answer as its primary rows.",
        )
        _, group = await self.home_tool(
            "POST",
            "/Groups",
            {
                "schemas": [CORE_GROUP],
                "displayName": "Newsletter",
                "members": [{"value": other.internal_id}],
            },
        )
        self.internal_ids.add(group["id"])
        self.group_id = group["id"]
        _note(f"home's tools: POST /Groups 'Newsletter' -> internal ID {group['id']}")
        await self.settle()
        await self.show_table([john, other], "the new entity has its own rows now")
        await self.show_peers()

    async def false_negative(self, jsmith: Person, johns: Person) -> None:
        _heading("Story b: a false negative (two entities are really one)")
        _step(
            "b.1",
            "JSmith and JohnS signed up separately; home provisioned both into P1 and P2. "
            "JohnS also subscribes to the newsletter.",
        )
        await self.home_tool(
            "PATCH",
            f"/Groups/{self.group_id}",
            _patch({"op": "add", "path": "members", "value": [{"value": johns.internal_id}]}),
        )
        _note(f"home's tools: PATCH /Groups/{self.group_id} add member JohnS")
        await self.settle()
        await self.show_table([jsmith, johns], "two entities, four rows")
        await self.show_peers()
        seen = len(self.link.sent)
        location = await self._merge(jsmith, johns)
        await self._peers_follow(jsmith, johns, location, seen)

    async def _merge(self, jsmith: Person, johns: Person) -> str:
        """b.2: the broker merges, then home's tools merge in home, while the peers' link is held
        shut; the merge's status URL."""
        _step(
            "b.2",
            "The false negative is found: they are one customer. Home's tools tell the broker "
            "to merge JohnS into JSmith, then, through the broker, merge them in home: JohnS's "
            "membership goes to JSmith, JohnS is deleted, the customer is renamed John Smith. "
            "(The peers' link is held shut for this step, so that the table can be seen before "
            "the peers hear of it.)",
        )
        self.link.open.clear()
        body = {
            "survivor": jsmith.internal_id,
            "losers": [johns.internal_id],
            "idempotency_key": f"demo-merge-{secrets.token_hex(4)}",
        }
        _note(f"admin API: POST /admin/merges {json.dumps(body)}")
        document, headers = await self.admin("POST", f"{self.admin_url}/admin/merges", body)
        location = headers.get("Location", document.get("location"))
        _note(f"202 Accepted, Location {location}")
        await self._merge_in_home(jsmith, johns)
        await self.show_table(
            [jsmith, johns],
            "at once, before any peer is told: JohnS's rows are aliases of JSmith "
            "(inbound they still resolve, outbound only the primary is used)",
        )
        op = await self.operation(location)
        _note(f"the merge's state: {op['state']}; progress {json.dumps(op['progress'])}")
        say("    The peers still hold both accounts:", stdout=True)
        await self.show_peers()
        return str(location)

    async def _merge_in_home(self, jsmith: Person, johns: Person) -> None:
        """Home's tools move JohnS's membership to JSmith, delete JohnS, rename JSmith."""
        await self.home_tool(
            "PATCH",
            f"/Groups/{self.group_id}",
            _patch(
                {"op": "remove", "path": f'members[value eq "{johns.internal_id}"]'},
                {"op": "add", "path": "members", "value": [{"value": jsmith.internal_id}]},
            ),
        )
        _note(f"home's tools: PATCH /Groups/{self.group_id} member JohnS -> JSmith")
        await self.home_tool("DELETE", f"/Users/{johns.internal_id}")
        _note(f"home's tools: DELETE /Users/{johns.internal_id} (JohnS)")
        await self.home_tool(
            "PATCH",
            f"/Users/{jsmith.internal_id}",
            _patch({"op": "replace", "path": "displayName", "value": "John Smith"}),
        )
        _note(f"home's tools: PATCH /Users/{jsmith.internal_id} displayName 'John Smith'")

    async def _peers_follow(self, jsmith: Person, johns: Person, location: str, seen: int) -> None:
        """b.3: the link opens and the peers follow; ``seen``: how many requests came before."""
        _step(
            "b.3",
            "The link opens: not in lockstep with the merge, each peer is asked to move "
            "JohnS's group memberships and to delete JohnS's account. Once it acknowledges, "
            "the alias row is removed.",
        )
        self.link.open.set()
        await self.settle()
        for name in self.peers:
            changes = self.link.changes(name.lower(), seen)
            _note(f"{name} received: {'; '.join(changes) or 'nothing'}")
        await self.show_table([jsmith, johns], "after the peers acknowledged")
        await self.show_peers()
        op = await self.operation(location)
        say("    The merge's status resource (GET " + location + "):", stdout=True)
        say(indent(json.dumps(op, indent=2)), stdout=True)

    async def check_no_internal_id(self) -> bool:
        """No internal ID in anything the peers hold, nor in anything the broker sent them."""
        _heading("Check: no internal ID reached a peer")
        for endpoint in ("Users", "Groups"):
            document = await self.home_direct("GET", f"/{endpoint}?attributes=id&count=10000")
            self.internal_ids.update(r["id"] for r in document.get("Resources") or [])
        held = {name: await self.peer_holds(peer) for name, peer in self.peers.items()}
        held_text = json.dumps(held)
        sent_text = "\n".join(text for _, _, text in self.link.sent)
        leaked = sorted(i for i in self.internal_ids if i in held_text or i in sent_text)
        resources = sum(len(v) for h in held.values() for v in h.values())
        if leaked:
            say(
                f"    FAILED: internal IDs found in the peers' data: {', '.join(leaked)}",
                stdout=True,
            )
            return False
        say(
            f"    OK: none of the {len(self.internal_ids)} internal IDs appears in the "
            f"{resources} resources P1 and P2 hold, nor in the {len(self.link.sent)} requests "
            "the broker sent them.",
            stdout=True,
        )
        return True

    def print_try_it(self) -> None:
        _heading("The federation keeps running: try it (Ctrl-C stops everything)")
        p1, p2 = self.peers["P1"], self.peers["P2"]
        lines = [
            f"  broker, domain-facing SCIM:  {self.broker_url}/scim/v2",
            f"  broker, admin listener:      {self.admin_url}  (/admin/..., /home/scim/v2/...)",
            f"  home (scim2-server):         {self.home.url}",
            f"  peer P1 (scim2-server):      {p1.url}",
            f"  peer P2 (scim2-server):      {p2.url}",
            "",
            f"  P1_TOKEN={self.tokens['P1']}      # P1 calling the broker",
            f"  ADMIN_TOKEN={self.tokens['admin']}   # the admin API",
            f"  HOME_TOOLS={self.tokens['home']}    # home's tools, through the broker",
            f"  HOME_TOKEN={self.home.token}  # home's own service",
            f"  PEER_TOKEN={p1.token}  # the peers' own services",
            "",
            "  # P1's view through the broker: P1's own IDs, never home's",
            f'  curl -H "Authorization: Bearer $P1_TOKEN" {self.broker_url}/scim/v2/Users',
            "  # the merge and the split, as operations",
            f'  curl -H "Authorization: Bearer $ADMIN_TOKEN" {self.admin_url}/admin/operations',
            "  # home's tools add someone; P2 has them a moment later, under its own ID",
            f'  curl -H "Authorization: Bearer $HOME_TOOLS" -H "Content-Type: application/scim+json" '
            f'-d \'{{"schemas":["{CORE_USER}"],"userName":"bjensen"}}\' '
            f"{self.admin_url}/home/scim/v2/Users",
            f'  curl -H "Authorization: Bearer $PEER_TOKEN" {p2.url}/Users',
        ]
        say("\n".join(lines), stdout=True)


async def _walk_through(demo: Demo) -> bool:
    _heading("Home's tools provision three people; the broker pushes them to P1 and P2")
    john = await demo.provision("John Smith", "john.smith")
    jsmith = await demo.provision("JSmith", "jsmith")
    johns = await demo.provision("JohnS", "johns")
    await demo.settle()
    await demo.show_table([john, jsmith, johns], "every row, one per person and peer")
    await demo.show_peers()
    await demo.false_positive(john)
    await demo.false_negative(jsmith, johns)
    return await demo.check_no_internal_id()


def _working_directory(data_dir: Path | None) -> tuple[Path, bool]:
    """The demo's directory, and whether to keep it afterwards."""
    if data_dir is None:
        return Path(tempfile.mkdtemp(prefix="broker-demo-")), False
    directory = data_dir.expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        raise DemoError(f"{directory} is not empty: give the demo a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory, True


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():
        say(f"broker demo: could not remove {directory}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


async def run_demo(keep_running: bool, data_dir: Path | None) -> int:
    """The demo. ``data_dir``: where its files go (PostgreSQL, logs), kept afterwards; it must
    be new or empty. None: a fresh temporary directory, removed at the end."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stop = asyncio.Event()
    state = {"waiting": False, "interrupted": False}

    def on_signal() -> None:
        state["interrupted"] = True
        if state["waiting"]:
            stop.set()
        elif task is not None:
            task.cancel()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            handled.append(sig)
    try:
        if importlib.util.find_spec("scim2_server") is None:
            raise DemoError(
                f"the demo runs real SCIM services (scim2-server), which is not installed: "
                f"{DEMO_INSTALL_HINT}"
            )
        directory, keep = _working_directory(data_dir)
        try:
            ok = await _run(directory, keep_running, started, state, stop)
        finally:
            if keep:
                say(f"\nThe demo's files are kept in {directory}.", stdout=True)
            else:
                _remove(directory)
        return 0 if ok else 1
    except asyncio.CancelledError:
        if not state["interrupted"]:
            raise
        say("\nInterrupted: everything the demo started is stopped.", stdout=True)
        return 130
    except DemoError as exc:
        say(f"broker demo: {exc}")
        return 1
    except (OSError, asyncpg.PostgresError, aiohttp.ClientError) as exc:
        say(f"broker demo: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@dataclass(frozen=True)
class Services:
    """The SCIM services the demo started: home, and the peers as tenants of a second server."""

    home: Service
    peers: dict[str, Service]
    peers_root: str
    """The peers' server, which the link forwards to."""
    processes: tuple[tuple[str, asyncio.subprocess.Process, str, str, Path], ...]
    """(name, process, readiness probe, token, log) of each scim2-server process."""

    def ready(self, session: aiohttp.ClientSession) -> list[Awaitable[None]]:
        """Until each server answers its probe."""
        return [_ready(session, *process) for process in self.processes]


async def _start_services(stack: AsyncExitStack, directory: Path) -> Services:
    """Home and the peers (two scim2-server processes), and the peers' token in the environment
    their ``credential_ref`` names; all undone when ``stack`` closes."""
    home_token, peers_token = secrets.token_hex(12), secrets.token_hex(12)
    home_process, home_port, home_log = await _start_scim_server(
        stack, directory, "home", home_token
    )
    peers_process, peers_port, peers_log = await _start_scim_server(
        stack, directory, "peers", peers_token, "--tenant", "p1", "--tenant", "p2"
    )
    _note(f"home: scim2-server on port {home_port} (pid {home_process.pid})")
    _note(f"peers P1, P2: scim2-server on port {peers_port}, tenants /p1 and /p2")
    home = Service("home", f"http://127.0.0.1:{home_port}/v2", home_token)
    peers = {
        name: Service(name, f"http://127.0.0.1:{peers_port}/{name.lower()}/v2", peers_token)
        for name in ("P1", "P2")
    }
    os.environ[PEER_TOKEN_ENV] = peers_token
    stack.callback(os.environ.pop, PEER_TOKEN_ENV, None)
    probe = "/ServiceProviderConfig"
    return Services(
        home,
        peers,
        f"http://127.0.0.1:{peers_port}",
        (
            ("home", home_process, home.url + probe, home_token, home_log),
            ("peers' server", peers_process, peers["P1"].url + probe, peers_token, peers_log),
        ),
    )


def _broker_config(directory: Path, home: Service) -> Config:
    """The broker's configuration: on free local ports, PostgreSQL in ``directory``, quick retries."""
    port, admin_port = _free_port(), _free_port()
    return Config(
        server=ServerConfig(
            host="127.0.0.1", port=port, admin_host="127.0.0.1", admin_port=admin_port
        ),
        database=DatabaseConfig(data_dir=directory / "postgres", pool_max_size=6),
        home=HomeConfig(scim_url=home.url, token=SecretStr(home.token), id_pattern=HOME_ID_PATTERN),
        propagation=PropagationConfig(
            home_poll_interval=0,
            backoff_base=0.05,
            backoff_ceiling=0.5,
            quarantine_retry=0.5,
            lease=10,
            retention=0,
            # The peers are added before home holds anything: nothing to bring over.
            initial_sync=False,
        ),
    )


async def _set_up(runner: web.AppRunner) -> None:
    """The broker's start: embedded PostgreSQL, migrations, workers."""
    setup = asyncio.ensure_future(runner.setup())
    try:
        await asyncio.shield(setup)
    except asyncio.CancelledError:
        # PostgreSQL starts in a thread that cannot be stopped half-way: let it finish,
        # so that the clean-up stops it rather than leave it on a removed directory.
        await asyncio.wait([setup])
        if not setup.cancelled():
            setup.exception()  # retrieved: the interruption is what gets reported
        raise
    _note("embedded PostgreSQL started and migrated; the broker's workers run")


async def _listen(runner: web.AppRunner, session: aiohttp.ClientSession, port: int) -> str:
    """The broker listening on ``port``, and ready; its URL."""
    await web.TCPSite(runner, "127.0.0.1", port).start()
    broker_url = f"http://127.0.0.1:{port}"
    status, _, _ = await _call(session, "GET", f"{broker_url}/readyz", "-")
    if status != 200:
        raise DemoError(f"the broker is not ready: /readyz answered {status}")
    _note(f"broker: {broker_url}/scim/v2, admin listener {runner.app[ADMIN_URL]}")
    return broker_url


async def _register_domains(app: web.Application, link: Link) -> dict[str, str]:
    """H (home), and P1 and P2 as push peers reached through the link; the tokens issued."""
    domains, tokens = DomainStore(app[POOL]), TokenStore(app[POOL])
    await domains.add("H", kind="home")
    for name in ("P1", "P2"):
        await domains.add(
            name,
            scim_url=f"{link.url}/{name.lower()}/v2",
            credential_ref=f"env:{PEER_TOKEN_ENV}",
            push=True,
        )
    issued = {
        "home": (await tokens.issue("H"))[0],
        "admin": (await tokens.issue("H", scopes=["admin"]))[0],
        "P1": (await tokens.issue("P1"))[0],
    }
    _note("domains: H (home), P1 and P2 (push peers); tokens issued")
    return issued


async def _run(
    directory: Path,
    keep_running: bool,
    started: float,
    state: dict[str, bool],
    stop: asyncio.Event,
) -> bool:
    _heading("Starting the federation (from nothing, in " + str(directory) + ")")
    async with AsyncExitStack() as stack:
        services = await _start_services(stack, directory)
        config = _broker_config(directory, services.home)
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        stack.push_async_callback(runner.cleanup)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        link = Link(services.peers_root, session)
        stack.push_async_callback((await link.start()).cleanup)
        await _all(_set_up(runner), *services.ready(session))
        _note("home and peers answer")
        broker_url = await _listen(runner, session, config.server.port)
        issued = await _register_domains(app, link)
        _note(f"ready in {time.monotonic() - started:.1f} s")

        demo = Demo(session, app, services.home, services.peers, link, issued, broker_url)
        ok = await _walk_through(demo)
        say(f"\nWalk-through done in {time.monotonic() - started:.1f} s.", stdout=True)
        if keep_running and ok:
            demo.print_try_it()
            state["waiting"] = True
            if not state["interrupted"]:
                await stop.wait()
            say("\nStopping: the broker, PostgreSQL, home and the peers.", stdout=True)
    if not keep_running:
        say("Everything the demo started is stopped.", stdout=True)
    return ok


async def _all(*steps: Awaitable[None]) -> None:
    """Run ``steps`` together; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(s) for s in steps]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
