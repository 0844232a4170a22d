"""A real home (scim2-server, as a process) and the broker in front of it, for the proxy tests.

Every byte the broker sends toward a domain is recorded for the whole session (both listeners'
answers, and every request its own client sessions send to peers and SET receivers), and so is
every ID home assigned (learned on every client session that talks to home, and from home's own
lists at the end). A test during which a home ID, in any spelling, reached a domain fails
(``no_home_id_reaches_a_domain``, autouse); the session's end repeats the check over everything.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import broker.app as broker_app
from broker.app import POOL, create_app
from broker.config import (
    Config,
    DatabaseConfig,
    EventsConfig,
    HomeConfig,
    PropagationConfig,
    ServerConfig,
)
from broker.domains import DomainStore
from broker.tokens import TokenStore

ACME = "urn:example:params:scim:schemas:extension:acme:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
HOME_ID = re.compile(r"[0-9a-f]{32}")
_JWT = re.compile(r"eyJ[\w-]+\.(eyJ[\w-]+)\.[\w-]+")
DATA = Path(__file__).parent / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Home:
    url: str
    token: str

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Straight to home, bypassing the broker (what home really holds)."""
        data = json.dumps(body).encode() if body is not None else None
        quoted = urllib.parse.quote(path, safe="/?=&:")
        request = urllib.request.Request(self.url + quoted, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/scim+json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None


_HEX_RUN = re.compile(r"[0-9a-f]{32,}")
_DASHED = re.compile(r"([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})")
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def id_forms(text: str) -> set[str]:
    """Every 32-hex-digit window in ``text`` under the spellings a leak could take: any case,
    glued to letters, digits, ``-`` or ``_``, percent- or JSON-escaped, in the dashed UUID form."""
    lowered = text.lower()
    variants = {lowered, urllib.parse.unquote(lowered)}
    variants |= {_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), v).lower() for v in variants}
    variants |= {_DASHED.sub(lambda m: "".join(m.groups()), v) for v in variants}
    found: set[str] = set()
    for variant in variants:
        for match in _HEX_RUN.finditer(variant):
            run = match.group(0)
            found.update(run[i : i + 32] for i in range(len(run) - 31))
    return found


@dataclass(frozen=True)
class HomeCall:
    """One request the broker sent home (any of its clients), seen on the wire."""

    method: str
    url: str
    body: str


@dataclass
class Recorder:
    """Every byte sent toward a domain, and every ID home answered with, over the whole session.

    ``sent`` holds what left the broker toward a domain: every response of the domain-facing
    listener, the admin listener's answers to callers it did not admit (a domain knocking there),
    and every request the broker's own client sessions sent anywhere but home (peers, SET
    receivers, JWKS), with its URL, headers and body. ``home_ids`` holds every 32-hex-digit
    string the broker sent to or received from home on any of its client sessions (proxy,
    workers, poller, SET renderer, admin), plus home's full user and group list read at the end.
    """

    sent: list[str] = field(default_factory=list)
    home_ids: set[str] = field(default_factory=set)
    home_urls: set[str] = field(default_factory=set)
    to_home: list[HomeCall] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    operator: list[str] = field(default_factory=list)
    """The admin listener's answers to operators and home's tools (internal IDs are theirs)."""

    def record(self, text: str, label: str = "") -> None:
        """``text`` as sent, and the claims of every JWT in it (a SET's are base64url-encoded,
        where a plain search would not see an ID). ``label`` says what it answered (for the
        report; it is not searched: a domain's own request is not a leak)."""
        self.sent.append(text)
        self.labels.append(label)
        for match in _JWT.finditer(text):
            payload = match.group(1)
            try:
                claims = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            except ValueError:
                continue
            self.sent.append(claims.decode(errors="replace"))
            self.labels.append(f"{label} (JWT claims)")

    def learn(self, body: Any) -> None:
        """The IDs home assigned, in a body home answered with: every ``id``, and the last
        segment of every ``location`` and ``$ref`` (not free text: a domain writes that, and
        what a domain wrote is not an internal ID)."""
        if isinstance(body, dict):
            for key, value in body.items():
                if key == "id" and isinstance(value, str) and HOME_ID.fullmatch(value):
                    self.home_ids.add(value)
                elif key in ("location", "$ref") and isinstance(value, str):
                    self.learn_location(value)
                else:
                    self.learn(value)
        elif isinstance(body, list):
            for item in body:
                self.learn(item)

    def learn_location(self, url: str) -> None:
        tail = url.rstrip("/").rsplit("/", 1)[-1]
        if HOME_ID.fullmatch(tail):
            self.home_ids.add(tail)

    def is_home(self, url: str) -> bool:
        """Whether ``url`` is on a home server (its origin, whatever the path: a smuggled
        ``..`` may step out of home's base path and still reach home)."""
        origin = yarl.URL(url).origin()
        return any(yarl.URL(base).origin() == origin for base in self.home_urls)

    def leaks(self, since: int = 0) -> set[str]:
        """The home IDs found, in any form, in what was sent from ``sent[since]`` on."""
        found: set[str] = set()
        for text in self.sent[since:]:
            found |= id_forms(text)
        return found & self.home_ids

    def report(self, leaked: set[str], since: int = 0) -> str:
        """Where each leaked ID was sent (the first message holding it), for the failure."""
        lines = []
        for leaked_id in sorted(leaked)[:5]:
            where = next(
                (
                    f"{label}: {text[:600]!r}"
                    for text, label in zip(self.sent[since:], self.labels[since:], strict=True)
                    if leaked_id in id_forms(text)
                ),
                "",
            )
            lines.append(f"{leaked_id} in the answer to {where}")
        return "home IDs reached a domain:\n" + "\n".join(lines)


RECORDER = Recorder()


class _RecordingResponse(aiohttp.ClientResponse):
    """A response the broker's clients read: home's body teaches the recorder home's IDs."""

    async def read(self) -> bytes:
        body = await super().read()
        url = str(self.url)
        if RECORDER.is_home(url):
            with suppress(ValueError):
                RECORDER.learn(json.loads(body))
            RECORDER.learn_location(self.headers.get("Location", ""))
        return body


async def _on_request_chunk(
    session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestChunkSentParams
) -> None:
    chunks = ctx.__dict__.setdefault("chunks", [])
    chunks.append(params.chunk)


async def _on_request_headers(
    session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    ctx.headers = params.headers


async def _on_request_done(
    session: aiohttp.ClientSession,
    ctx: Any,
    params: aiohttp.TraceRequestEndParams | aiohttp.TraceRequestExceptionParams,
) -> None:
    url = str(params.url)
    headers = getattr(ctx, "headers", params.headers)
    body = b"".join(ctx.__dict__.get("chunks", [])).decode(errors="replace")
    if RECORDER.is_home(url):
        RECORDER.to_home.append(HomeCall(params.method, url, body))
        return
    head = "\n".join(f"{k}: {v}" for k, v in headers.items() if k.lower() != "authorization")
    RECORDER.record(f"{params.method} {url}\n{head}\n{body}", "a request the broker sent out")


def _trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_request_chunk)
    trace.on_request_headers_sent.append(_on_request_headers)
    trace.on_request_end.append(_on_request_done)
    trace.on_request_exception.append(_on_request_done)
    return trace


class _RecordingAiohttp:
    """``aiohttp`` as broker/app.py sees it: every client session it opens (home, peers, SET
    receivers, the home JWKS) is traced and reads through :class:`_RecordingResponse`. Swapping
    a client object later cannot switch this off: it is the sessions' own."""

    def __getattr__(self, name: str) -> Any:
        return getattr(aiohttp, name)

    @staticmethod
    def ClientSession(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        kwargs["trace_configs"] = [*kwargs.get("trace_configs", []), _trace()]
        kwargs.setdefault("response_class", _RecordingResponse)
        return aiohttp.ClientSession(*args, **kwargs)


async def _record_admin(request: web.Request, response: web.StreamResponse) -> None:
    body = response.body if isinstance(response, web.Response) else None
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    answer = f"{response.status}\n{head}\n{text}"
    operational = request.path.startswith(("/admin/", "/home/", "/console"))
    if operational and response.status not in (401, 403):
        RECORDER.operator.append(answer)
    else:  # a caller the admin listener did not admit may be a domain
        RECORDER.record(answer, f"admin listener {request.method} {request.path_qs}")


def _recording_admin_app(*args: Any, **kwargs: Any) -> web.Application:
    app = _create_admin_app(*args, **kwargs)
    app.on_response_prepare.append(_record_admin)
    return app


_create_admin_app = broker_app.create_admin_app
setattr(broker_app, "create_admin_app", _recording_admin_app)  # noqa: B010
setattr(broker_app, "aiohttp", _RecordingAiohttp())  # noqa: B010


@pytest.fixture(autouse=True)
def no_home_id_reaches_a_domain() -> Iterator[None]:
    """Fails the test during which a home ID reached a domain (the session's check repeats it
    at the end over everything, against IDs learned later too)."""
    since = len(RECORDER.sent)
    yield
    leaked = RECORDER.leaks(since)
    assert not leaked, RECORDER.report(leaked, since)


def _schema_files(directory: Path) -> tuple[Path, Path]:
    """The server's default schemas and resource types plus the acme extension (reference attrs)."""
    import scim2_server

    resources = Path(scim2_server.__file__).parent / "resources"
    schemas = json.loads((resources / "default-schemas.json").read_text())
    schemas.append(json.loads((DATA / "acme-extension.json").read_text()))
    types = json.loads((resources / "default-resource-types.json").read_text())
    for rt in types:
        if rt["name"] == "User":
            rt.setdefault("schemaExtensions", []).append({"schema": ACME, "required": False})
    (directory / "schemas.json").write_text(json.dumps(schemas))
    (directory / "types.json").write_text(json.dumps(types))
    return directory / "schemas.json", directory / "types.json"


@contextmanager
def scim_server(directory: Path, *args: str, base: str = "/v2") -> Iterator[Home]:
    """A real scim2-server process, its URL, and its token."""
    port = _free_port()
    token = secrets.token_hex(8)
    log = (directory / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scim2_server.testserver.cli",
            "--port",
            str(port),
            "--bearer-token",
            token,
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    found = Home(f"http://127.0.0.1:{port}{base}", token)
    # With tenants (base ""), readiness is asked of a tenant of its own.
    probe = Home(f"http://127.0.0.1:{port}{base or '/probe/v2'}", token)
    deadline = time.monotonic() + 30
    while True:
        try:
            if probe.call("GET", "/ServiceProviderConfig")[0] == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"scim2-server did not start: {(directory / 'server.log').read_text()}"
            )
        time.sleep(0.1)
    try:
        yield found
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """A real scim2-server process: the home domain."""
    directory = tmp_path_factory.mktemp("home")
    schemas, types = _schema_files(directory)
    with scim_server(directory, "--schema", str(schemas), "--resource-type", str(types)) as found:
        yield found
        # Home's side of the story: every ID it holds now (deleted ones were seen on the wire).
        for endpoint in ("Users", "Groups"):
            status, listed = found.call("GET", f"/{endpoint}?attributes=id&count=100000")
            if status == 200:
                RECORDER.learn(listed)
    leaked = RECORDER.leaks()
    assert not leaked, RECORDER.report(leaked)
    assert RECORDER.home_ids or not RECORDER.sent, (
        "domains were answered but the recorder saw no home ID: the check proves nothing"
    )


async def _record_sent(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of the domain-facing listener, status line, headers and body."""
    body = response.body if isinstance(response, web.Response) else None
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    RECORDER.record(f"{response.status}\n{head}\n{text}", f"{request.method} {request.path_qs}")


@dataclass
class Broker:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    home: Home
    tokens: dict[str, str]
    base: str
    admin_url: str

    def auth(self, domain: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.tokens[domain]}",
            "Content-Type": "application/scim+json",
        }

    async def call(
        self, domain: str, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, Any, Any]:
        data = json.dumps(body) if body is not None else None
        headers = {**self.auth(domain), **kwargs.pop("headers", {})}
        response = await self.client.request(
            method, "/scim/v2" + path, data=data, headers=headers, **kwargs
        )
        raw = await response.text()
        return response.status, (json.loads(raw) if raw else None), response.headers

    @property
    def pool(self) -> asyncpg.Pool:
        return self.app[POOL]


async def start_broker(
    db_url: str,
    home: Home,
    domains: dict[str, dict[str, Any]],
    *,
    pool_size: int = 4,
    cache_entries: int = 100_000,
    propagation: PropagationConfig | None = None,
    events: EventsConfig | None = None,
    id_pattern: str = "[0-9a-f]{32}",
) -> AsyncIterator[Broker]:
    """The broker in front of ``home``, with ``domains`` registered and a token each. Delivery to
    push peers runs only when ``propagation`` is given; the admin listener always runs."""
    port = _free_port()
    admin_port = _free_port()
    config = Config(
        server=ServerConfig(
            port=port, public_url=f"http://127.0.0.1:{port}", admin_port=admin_port
        ),
        propagation=keyed(propagation or PropagationConfig(enabled=False)),
        database=DatabaseConfig(
            url=db_url, pool_min_size=1, pool_max_size=pool_size, cache_entries=cache_entries
        ),
        home=HomeConfig(scim_url=home.url, token=home.token, id_pattern=id_pattern),
        events=events or EventsConfig(),
    )
    app = create_app(config)
    app.on_response_prepare.append(_record_sent)

    RECORDER.home_urls.add(home.url)
    server = TestServer(app, port=port)
    async with TestClient(server) as client:
        store, tokens = DomainStore(app[POOL]), TokenStore(app[POOL])
        issued = {}
        for name, options in domains.items():
            await store.add(name, **options)
            issued[name], _ = await tokens.issue(name)
        yield Broker(
            client,
            app,
            home,
            issued,
            f"http://127.0.0.1:{port}/scim/v2",
            f"http://127.0.0.1:{admin_port}",
        )


TEST_KEY_ENV = "TEST_BROKER_KEY"
"""The variable holding the sealing key of the brokers tests start (set in conftest.py): with a
database URL, a broker makes no key of its own."""


def keyed(settings: PropagationConfig) -> PropagationConfig:
    """``settings`` with the tests' key, unless they name one."""
    if settings.secret_key_env or settings.secret_key_file:
        return settings
    return settings.model_copy(update={"secret_key_env": TEST_KEY_ENV})


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_user(name: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"schemas": [CORE_USER], "userName": name or unique("user"), **extra}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
