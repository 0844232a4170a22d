"""A real home (scim2-server, as a process) and the broker in front of it, for the proxy tests.

Every byte the broker sends to a domain is recorded for the whole session, and so is every ID the
home ever answered with; at the end of the session the first must contain none of the second.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.app import POOL, PROXY, create_app
from broker.config import (
    Config,
    DatabaseConfig,
    EventsConfig,
    HomeConfig,
    PropagationConfig,
    ServerConfig,
)
from broker.domains import DomainStore
from broker.home import HomeClient, HomeResponse
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


@dataclass
class Recorder:
    """Everything sent to domains, and every ID home answered with, over the whole session."""

    sent: list[str] = field(default_factory=list)
    home_ids: set[str] = field(default_factory=set)

    def record(self, text: str) -> None:
        """``text`` as sent, and the claims of every JWT in it (a SET's are base64url-encoded,
        where a plain search would not see an ID)."""
        self.sent.append(text)
        for match in _JWT.finditer(text):
            payload = match.group(1)
            self.sent.append(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode())

    def leaks(self) -> set[str]:
        text = "\n".join(self.sent)
        return {i for i in self.home_ids if i in text}


RECORDER = Recorder()


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
    leaked = RECORDER.leaks()
    assert not leaked, f"home IDs reached a domain: {sorted(leaked)[:5]}"
    assert RECORDER.home_ids or not RECORDER.sent, (
        "domains were answered but the recorder saw no home ID: the check proves nothing"
    )


class RecordingHome(HomeClient):
    """The real home client, noting every ID home answers with (for the session-wide check)."""

    async def request(self, method: str, path: str, **kwargs: Any) -> HomeResponse:
        response = await super().request(method, path, **kwargs)
        if response.body is not None:
            RECORDER.home_ids.update(_ids_in(response.body))
        RECORDER.home_ids.update(_ids_in(response.headers.get("Location", "")))
        return response


_ID_KEYS = {"id", "value", "$ref", "location"}


def _ids_in(document: Any, key: str = "id") -> set[str]:
    """Home's IDs in one of its answers: the values of ``id``, of references (``value``,
    ``$ref``) and locations, not text a domain wrote (32 hex digits in a title are not an ID)."""
    if isinstance(document, dict):
        return {i for k, v in document.items() for i in _ids_in(v, k)}
    if isinstance(document, list):
        return {i for item in document for i in _ids_in(item, key)}
    if isinstance(document, str) and key in _ID_KEYS:
        tail = document.rstrip("/").rsplit("/", 1)[-1]
        return {tail} if HOME_ID.fullmatch(tail) else set()
    return set()


async def _record_sent(request: web.Request, response: web.StreamResponse) -> None:
    body = response.body if isinstance(response, web.Response) else None
    text = body.decode() if isinstance(body, bytes) else str(body or "")
    RECORDER.record("\n".join(f"{k}: {v}" for k, v in response.headers.items()) + "\n" + text)


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
        propagation=propagation or PropagationConfig(enabled=False),
        database=DatabaseConfig(
            url=db_url, pool_min_size=1, pool_max_size=pool_size, cache_entries=cache_entries
        ),
        home=HomeConfig(scim_url=home.url, token=home.token, id_pattern=id_pattern),
        events=events or EventsConfig(),
    )
    app = create_app(config)
    app.on_response_prepare.append(_record_sent)

    async def recording_home(app: web.Application) -> AsyncIterator[None]:
        proxy = app[PROXY]
        original = proxy.home
        proxy.home = RecordingHome(original.session, original.base_url, home.token)
        yield

    app.cleanup_ctx.append(recording_home)
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


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_user(name: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"schemas": [CORE_USER], "userName": name or unique("user"), **extra}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
