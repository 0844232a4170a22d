"""No bearer token reaches a log: not through aiohttp's report of a malformed request (an
oversized or broken Authorization header), nor through any other record."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from broker.app import create_app
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from broker.logsafe import mask_all, may_hold_secret, redact
from tests.scim_support import _free_port

TOKEN = "bkr_S3cretT0kenNeverLogged"


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {TOKEN}",
        f"b'Bearer {TOKEN}AAAA...'",
        f"authorization:bearer {TOKEN}",
        f"Authorization: {TOKEN}",
        f"GET /scim/v2/Users?access_token={TOKEN}",
        "Authorization: Basic dXNlcjpwYXNz",
        "Authorization: Bearer%20S3cretT0kenNeverLogged",
    ],
)
def test_credentials_are_masked(text: str) -> None:
    masked = redact(text)
    assert "S3cretT0kenNeverLogged" not in masked and "dXNlcjpwYXNz" not in masked
    assert "[redacted]" in masked


def test_text_without_credentials_is_left_alone() -> None:
    text = "POST /scim/v2/Users: HTTP 409 (userName taken); resolve it there"
    assert redact(text) == text


def malformed_requests(token: str) -> list[bytes]:
    """Requests aiohttp's parser refuses, each quoting the token somewhere in its bytes."""
    auth = f"Bearer {token}".encode()
    return [
        b"GET /healthz HTTP/1.1\r\nHost: b\r\nAuthorization: " + auth + b"A" * 9000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: b\r\nAuthorization: " + auth + b"\x01x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: b\r\nAuthorization : " + auth + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: b\r\nAuthorization: " + token.encode() + b"\x7f\r\n\r\n",
        b"GET /scim/v2/Users?t=" + token.encode() + b"B" * 9000 + b" HTTP/1.1\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nAuthorization: " + auth + b"\r\nContent-Length: x\r\n\r\n",
        b"POST /scim/v2/Users HTTP/1.1\r\nHost: b\r\nAuthorization: " + auth + b"\r\n"
        b"Content-Type: application/scim+json\r\nContent-Length: 10\r\n\r\n{}",
    ]


async def send(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if raw.endswith(b"{}"):  # a body cut short: hang up
            return b""
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def served(db_url: str) -> AsyncIterator[int]:
    """The application on a port, served as ``broker serve`` serves it; the port."""
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_malformed_requests_never_log_the_token(
    served: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for raw in malformed_requests(TOKEN):
        answer = await send(served, raw)
        assert answer == b"" or answer.startswith(b"HTTP/1.")
    # And a well-formed request with an unknown token: refused, never logged.
    answer = await send(
        served,
        f"GET /scim/v2/Users HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert b" 401 " in answer.split(b"\r\n", 1)[0]
    assert any(r.name == "aiohttp.server" for r in caplog.records), "aiohttp reported them"
    assert "S3cretT0ken" not in caplog.text
    for record in caplog.records:
        assert "S3cretT0ken" not in logging.Formatter().format(record)


async def test_broker_serve_writes_no_token_to_its_log(db_url: str, tmp_path: Path) -> None:
    """The real process: its stderr, while an oversized and a broken header arrive."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_DATABASE_URL=db_url,
        BROKER_SERVER__PORT=str(port),
        BROKER_SERVER__ADMIN_PORT="0",
        BROKER_HOME__SCIM_URL="http://127.0.0.1:9/scim/v2",
        BROKER_PROPAGATION__ENABLED="false",
    )
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", "serve", env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text():
            assert process.returncode is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        for raw in malformed_requests(TOKEN):
            await send(port, raw)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=30)
    text = log.read_text()
    assert "Error handling request" in text, text
    assert "S3cretT0ken" not in text, text


@pytest.mark.parametrize(
    "text",
    [
        '{"userName": "dave_%", "password": "hunter2 x"}',
        "{'password': 'hunter2 x'}",
        'b\'{\\"password\\": \\"hunter2 x\\"}\'',
        '{"newPassword":"hunter2 x"}',
        "POST /token client_secret=hunter2&grant_type=x",
        '"password": "hunter2 \\" x"',
    ],
)
def test_password_values_are_masked_and_the_rest_is_kept(text: str) -> None:
    masked = redact(text)
    assert "hunter2" not in masked and " x" not in masked.replace('x"', "")
    assert "[redacted]" in masked


def test_words_about_passwords_are_not_masked() -> None:
    for text in ("the password is wrong", "[propagation] secret_key_env names KEY, not set"):
        assert redact(text) == text


# Case-insensitive matching pairs these with ASCII letters of the keywords (dotted and dotless
# i, long s, Kelvin sign): the quick check must not skip a text that holds them.
_ODD_LETTERS = "\u0130\u0131\u017f\u212a"


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abc",
        "GET /scim/v2/Users/x 200",
        "Aut\u0125orization: x",
        "Author\u0131zation: hunter2",  # dotless i: the expression still matches
        "pa\u017fsword=hunter2",  # long s
        "to\u212aen hunter2",  # Kelvin sign
        "BEARER hunter2",
        "bkr_abc",
        "SeCrEt: x",
        "",
    ],
)
def test_the_quick_check_skips_only_text_the_expressions_leave_alone(text: str) -> None:
    assert redact(text) == mask_all(text)
    if mask_all(text) != text:
        assert may_hold_secret(text)


@given(
    st.text(
        alphabet=st.sampled_from(
            [*"bearsictoknuhzwdp_BEARSICTOKNUHZWDP :=\"' %20/", *_ODD_LETTERS, "\u00e9"]
        ),
        max_size=40,
    )
    | st.builds(
        lambda a, k, b: a + k + b,
        st.text(max_size=5),
        st.sampled_from(
            ["bearer ", "Basic ", "TOKEN ", "authorization:", "passwd=", "Secret:", "bkr_"]
        ),
        st.text(max_size=10),
    )
)
def test_redact_is_the_expressions_whatever_the_text(text: str) -> None:
    """The quick check (issue 15) changes nothing: what the four expressions mask is masked."""
    assert redact(text) == mask_all(text)
