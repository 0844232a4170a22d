"""``[log] format`` and ``level``: JSON lines that parse, an access line per request carrying the
correlation ID the client got in ``X-Request-ID``, and never a token or a password."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from broker import logs
from broker.app import create_app
from broker.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    HomeConfig,
    LogConfig,
    PropagationConfig,
    ServerConfig,
    load_config,
)
from broker.logs import REQUEST_ID_HEADER, configure_logging

TOKEN = "bkr_S3cretT0kenNeverLogged"
PASSWORD = "hunter2-Never-Logged"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger as it was (pytest's own capture handlers included)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("broker.access").disabled = False


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[TestClient[object, object]]:
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False),
    )
    async with TestClient(TestServer(create_app(config))) as test_client:
        yield test_client


async def test_json_lines_parse_and_the_access_line_carries_the_correlation_id_and_no_token(
    client: TestClient[object, object], restore_logging: None
) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format="json", level="info"), stream)
    answers = []
    for path in ("/scim/v2/Users", f"/scim/v2/Users/{TOKEN}", "/healthz"):
        response = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        answers.append((path, response.status, response.headers[REQUEST_ID_HEADER]))
    lines = _lines(stream)  # every line is JSON, or this raises
    access = [line for line in lines if line["logger"] == "broker.access"]
    assert len(access) == 3, lines
    for (path, status, request_id), line in zip(answers, access, strict=True):
        assert line["correlation_id"] == request_id
        assert line["status"] == status
        assert line["method"] == "GET" and line["level"] == "info"
        assert isinstance(line["duration_ms"], float)
        if TOKEN not in path:
            assert line["path"] == path
    assert len({request_id for _, _, request_id in answers}) == 3, "one ID per request"
    assert "S3cretT0kenNeverLogged" not in stream.getvalue()


async def test_a_record_logged_while_serving_carries_the_request_correlation_id(
    client: TestClient[object, object], restore_logging: None, db_url: str
) -> None:
    """A 500's SCIM error names the correlation ID, and its log lines carry the same one."""
    stream = io.StringIO()
    configure_logging(LogConfig(format="json"), stream)
    # The domain's token table gone: authentication fails with an internal error.
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("ALTER TABLE domain_tokens RENAME TO domain_tokens_gone")
    finally:
        await conn.close()
    response = await client.get("/scim/v2/Users", headers={"Authorization": f"Bearer {TOKEN}"})
    request_id = response.headers[REQUEST_ID_HEADER]
    assert response.status == 500
    assert request_id in (await response.json())["detail"]
    carrying = [line for line in _lines(stream) if line.get("correlation_id") == request_id]
    assert {line["logger"] for line in carrying} >= {"broker.access"}
    assert len(carrying) >= 2, _lines(stream)  # the error's record and the access line
    assert "S3cretT0kenNeverLogged" not in stream.getvalue()


def test_json_masks_tokens_and_passwords_in_the_message_the_extras_and_the_exception(
    restore_logging: None,
) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format="json", level="debug"), stream)
    log = logging.getLogger("broker.test")
    body = json.dumps({"userName": "dave_%", "password": PASSWORD})
    log.debug("peer said %s", body, extra={"header": f"Authorization: Bearer {TOKEN}"})
    try:
        raise ValueError(f"refused {body} with Bearer {TOKEN}")
    except ValueError:
        log.exception("delivery failed")
    lines = _lines(stream)
    assert [line["level"] for line in lines] == ["debug", "error"]
    assert "dave_%" in lines[0]["message"]  # the rest of the message is kept
    assert "exception" in lines[1] and "ValueError" in lines[1]["exception"]
    text = stream.getvalue()
    assert "S3cretT0kenNeverLogged" not in text
    assert PASSWORD not in text


def test_text_format_names_the_correlation_id_and_the_level_filters(
    restore_logging: None,
) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format="text", level="warning"), stream)
    log = logging.getLogger("broker.test")
    log.info("not shown")
    log.warning("shown with password=%s", PASSWORD)
    text = stream.getvalue()
    assert "not shown" not in text
    assert "WARNING broker.test [-]: shown with password=[redacted]" in text
    assert PASSWORD not in text


def test_log_settings_come_from_the_environment_and_bad_ones_name_the_key() -> None:
    config = load_config(environ={"BROKER_LOG__FORMAT": "JSON", "BROKER_LOG__LEVEL": "debug"})
    assert (config.log.format, config.log.level) == ("json", "debug")
    with pytest.raises(ConfigError, match=r"log\.format \(env BROKER_LOG__FORMAT\)"):
        load_config(environ={"BROKER_LOG__FORMAT": "xml"})


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize(
    "path",
    [
        "/scim/v2/Users",
        f"/scim/v2/Users/{TOKEN}",
        f"/scim/v2/Users/Bearer%20{TOKEN[4:]}",
        f"/scim/v2/Users/password={PASSWORD}",
        "/scim/v2/Us\u00e9rs/\u212aey",
    ],
)
def test_the_access_line_written_directly_is_the_line_a_log_record_gives(
    restore_logging: None, log_format: str, path: str
) -> None:
    """The access line skips the record, its filters and its formatter (issue 15): what it
    writes is what they would have written, masking included, but for the time stamp."""
    stream = io.StringIO()
    configure_logging(LogConfig(format=log_format, level="info"), stream)
    request = make_mocked_request("GET", path)
    token = logs._CURRENT.set("f00dfeedcafe0123")
    try:
        assert logs._WRITER is not None and logs._WRITER.usable()
        logs._access_line(request, 201, 0.0123456)
        # Another handler on the root: the line goes as a record, through both handlers.
        other = logging.StreamHandler(io.StringIO())
        logging.getLogger().addHandler(other)
        assert not logs._WRITER.usable()
        logs._access_line(request, 201, 0.0123456)
    finally:
        logs._CURRENT.reset(token)
    direct, recorded = stream.getvalue().splitlines()
    assert TOKEN not in stream.getvalue() and PASSWORD not in stream.getvalue()
    if log_format == "json":
        direct_entry, recorded_entry = json.loads(direct), json.loads(recorded)
        for entry in (direct_entry, recorded_entry):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry.pop("time")))
        assert direct_entry == recorded_entry
        assert list(direct_entry) == list(recorded_entry)
    else:
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
        assert re.match(stamp, direct) and re.match(stamp, recorded)
        assert direct[24:] == recorded[24:]
        assert "[f00dfeedcafe0123]" in direct
