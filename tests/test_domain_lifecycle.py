"""The domain lifecycle (issue 17): update, disable and enable, remove, test, token files, the
key shared by all processes, and /readyz asking home. Against real scim2-server peers that check
the broker's token."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.admin.domains import update_from_json
from broker.app import DELIVERER, create_app
from broker.cli.domains import saved_warning
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from broker.domains import DomainUpdate
from broker.errors import ConflictError, InvalidValueError
from broker.home import readiness_problem
from broker.mapping.removal import plan_removal
from broker.probe import Check, ProbeReport, assess
from tests.propagation_support import (
    admin,
    assert_no_internal_id,
    cli,
    federation,
    held,
    home_tool,
    quiesce,
    tenant,
)
from tests.scim_support import Broker, Home, new_user
from tests.waiting import until

# ---------------------------------------------------------------------------------- pure parts


def test_a_patch_body_is_the_update_it_asks_for_and_null_takes_a_setting_away() -> None:
    change = update_from_json(
        {"scope": None, "read_attributes": ["userName"], "push": False, "token_file": "/t"}
    )
    assert change == DomainUpdate(
        push=False, read=["userName"], credential_ref="file:/t", clear=frozenset({"scope_filter"})
    )
    for bad in ({"nope": 1}, {"push": "yes"}, {"token_env": "A", "token_file": "/b"}):
        with pytest.raises(InvalidValueError):
            update_from_json(bad)


def test_a_removal_is_refused_while_deliveries_wait_unless_forced() -> None:
    footprint = {"mappings": 3, "deliveries pending": 2, "dead letters": 0, "tokens": 1}
    with pytest.raises(ConflictError, match="--force"):
        plan_removal("P1", footprint, keep_mappings=False, force=False)
    removal = plan_removal("P1", footprint, keep_mappings=True, force=True)
    assert removal.effects[0].startswith("mappings: 3 kept")
    assert "2 pending and 0 dead discarded" in removal.effects[2]


def test_what_a_peer_and_home_answer_means() -> None:
    assert not assess("auth", 401, None).ok
    assert "404" in assess("service", 404, None).detail
    assert assess("service", 200, {"patch": {"supported": True}}).detail.endswith("patch")
    assert not assess("schemas", None, None, error="ClientConnectorError").ok


def test_the_warning_of_a_failed_test_says_whether_deliveries_wait_or_die() -> None:
    """A peer that is not up yet makes deliveries wait; one that refuses the token (401) makes
    them dead letters at once, to retry by hand (the README said they all wait and retry)."""
    ok = Check("credential", True, "read from --token-file /t")

    def report(*checks: Check) -> ProbeReport:
        return ProbeReport("hr", "https://hr.example/scim/v2", (ok, *checks))

    down = report(assess("service", None, None, error="ClientConnectorError"))
    assert down.deliveries_wait and "wait and retry" in saved_warning("hr", down)
    busy = report(assess("service", 503, None), assess("auth", 429, None))
    assert busy.deliveries_wait
    refused = report(assess("service", 200, {}), assess("auth", 401, None))
    assert not refused.deliveries_wait
    warning = saved_warning("hr", refused)
    assert "dead letter" in warning and "broker deliveries retry --domain hr --all" in warning
    assert not report(assess("service", 404, None)).deliveries_wait
    no_file = ProbeReport(
        "hr", "u", (Check("credential", False, "no file", waits=True), assess("auth", 401, None))
    )
    assert no_file.deliveries_wait  # nothing is sent without the token: they wait for the file
    assert readiness_problem(200, {"schemas": []}) is None
    problem = readiness_problem(404, None)
    assert problem is not None and "[home] scim_url" in problem


# ---------------------------------------------------------------------------------- commands


@pytest.fixture
async def broker(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home]]:
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    async for running in federation(
        db_url, home, {"P1": p1.url, "P2": p2.url}, monkeypatch, peer_server.token
    ):
        yield running, p1, p2


async def _pending(broker: Broker, domain: str) -> int:
    count: int = await broker.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE domain_id = $1 AND state IN ('pending', 'in_flight')",
        domain,
    )
    return count


async def test_a_disabled_domain_is_refused_with_403_and_its_deliveries_wait_until_enabled(
    broker: tuple[Broker, Home, Home],
) -> None:
    running, p1, p2 = broker
    status, body = await admin(running, "POST", "/admin/domains/P1/disable")
    assert status == 200 and body["status"] == "disabled" and body["changed"]
    status, error, _ = await running.call("P1", "GET", "/Users")
    assert status == 403
    assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert "disabled" in error["detail"]

    _, alice = await home_tool(running, "POST", "/Users", new_user(displayName="Alice"))
    await until(lambda: held(p2)["Users"], "P2 (enabled) gets Alice")
    await until(lambda: _pending_only(running), "only P1's delivery left, and it waits")
    assert held(p1)["Users"] == []

    status, body = await admin(running, "POST", "/admin/domains/P1/enable")
    assert status == 200 and body["status"] == "active"
    await quiesce(running)
    assert [u["displayName"] for u in held(p1)["Users"]] == ["Alice"]
    assert_no_internal_id(p1, {alice["id"]})
    status, _, _ = await running.call("P1", "GET", "/Users")
    assert status == 200
    audited = await running.pool.fetch(
        "SELECT action FROM audit_log WHERE subject = 'P1' ORDER BY id"
    )
    assert [r["action"] for r in audited][-2:] == ["domain_disable", "domain_enable"]


async def test_a_peer_disabled_after_the_worker_read_its_peers_is_not_delivered_to(
    broker: tuple[Broker, Home, Home],
) -> None:
    """The worker's list of peers is read at most once a second (and cleared by the domain
    change's notification, which may come late under load): the claim itself checks the
    peer's state, so a peer disabled after the list was read gets nothing meanwhile."""
    running, p1, p2 = broker
    claims = running.app[DELIVERER].claims
    await claims.push_peers(claims.monotonic() + 10)  # read now, P1 active
    read = claims._peers
    assert "P1" in [peer.id for peer in read[1]]
    status, _ = await admin(running, "POST", "/admin/domains/P1/disable")
    assert status == 200
    await until(
        lambda: "P1" not in [peer.id for peer in claims._peers[1]], "the worker heard of it"
    )
    claims._peers = (claims.monotonic() + 3600, read[1])  # as if the notification were late
    _, alice = await home_tool(running, "POST", "/Users", new_user(displayName="Alice"))
    await until(lambda: held(p2)["Users"], "P2 (enabled) gets Alice")
    await until(lambda: _pending_only(running), "only P1's delivery left, and it waits")
    assert held(p1)["Users"] == []
    claims.forget_peers()
    status, _ = await admin(running, "POST", "/admin/domains/P1/enable")
    await quiesce(running)
    assert [u["displayName"] for u in held(p1)["Users"]] == ["Alice"]
    assert_no_internal_id(p1, {alice["id"]})


async def _pending_only(running: Broker) -> bool:
    return await _pending(running, "P2") == 0 and await _pending(running, "P1") == 1


async def test_remove_refuses_while_deliveries_wait_and_says_what_happens_with_force(
    broker: tuple[Broker, Home, Home],
) -> None:
    running, _, _ = broker
    await admin(running, "POST", "/admin/domains/P1/disable")
    await home_tool(running, "POST", "/Users", new_user())
    await until(lambda: _pending(running, "P1"), "a delivery waits for P1")
    status, error = await admin(running, "DELETE", "/admin/domains/P1")
    assert status == 409 and "--force" in error["detail"]
    assert await running.pool.fetchval("SELECT status FROM domains WHERE id = 'P1'") == "disabled"

    status, body = await admin(running, "DELETE", "/admin/domains/P1?force=true")
    assert status == 200, body
    assert any(line.startswith("outbox: 1 pending") for line in body["effects"])
    assert await running.pool.fetchval("SELECT count(*) FROM domains WHERE id = 'P1'") == 0
    assert await running.pool.fetchval("SELECT count(*) FROM outbox WHERE domain_id = 'P1'") == 0
    status, _ = await admin(running, "GET", "/admin/domains/P1")
    assert status == 404


async def test_remove_keeping_mappings_gives_them_back_when_the_domain_is_added_again(
    broker: tuple[Broker, Home, Home], db_url: str
) -> None:
    running, _, _ = broker
    _, alice = await home_tool(running, "POST", "/Users", new_user())
    await quiesce(running)
    before = await running.pool.fetchval(
        "SELECT external_id FROM id_mappings WHERE domain_id = 'P1' AND internal_id = $1",
        alice["id"],
    )
    code, out = await cli(db_url, "domain", "remove", "P1", "--keep-mappings")
    assert code == 0, out
    assert "mappings: 1 kept" in out and "tokens: 1 deleted" in out
    status, _, _ = await running.call("P1", "GET", "/Users")
    assert status == 401  # its tokens are gone
    code, out = await cli(db_url, "domain", "add", "P1", "--scim-url", "http://127.0.0.1:9/v2")
    assert code == 0, out
    after = await running.pool.fetchval(
        "SELECT external_id FROM id_mappings WHERE domain_id = 'P1' AND internal_id = $1",
        alice["id"],
    )
    assert after == before


async def test_update_changes_any_setting_refuses_bad_input_and_changes_nothing_then(
    broker: tuple[Broker, Home, Home], db_url: str
) -> None:
    running, _, _ = broker
    code, out = await cli(db_url, "domain", "update", "P9", "--scope", 'userName sw "a"')
    assert code == 1 and "there is no domain P9" in out
    code, out = await cli(db_url, "domain", "update", "P1", "--scim-url", "ftp://x/v2")
    assert code == 1 and "--scim-url" in out
    code, out = await cli(db_url, "domain", "update", "P1")
    assert code == 1 and "nothing to change" in out
    code, out = await cli(db_url, "domain", "update", "P1", "--no-push")
    assert code == 0, out
    code, out = await cli(
        db_url, "domain", "update", "P1", "--scope", 'userName sw "a"', "--deprovision", "suspend"
    )
    assert code == 0, out
    record = await running.pool.fetchrow("SELECT * FROM domains WHERE id = 'P1'")
    assert record["scope_filter"] == 'userName sw "a"' and record["deprovision"] == "suspend"
    assert record["scim_url"].startswith("http://127.0.0.1")  # the refused URL did not stick
    code, out = await cli(db_url, "domain", "update", "P1", "--scope", "")
    assert code == 0 and "(everything)" in out
    assert (
        await running.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE subject = 'P1' AND action = 'domain_update'"
        )
        == 3
    )


async def test_a_token_file_is_read_again_when_it_changes_and_test_says_what_works(
    broker: tuple[Broker, Home, Home], db_url: str, tmp_path: Path, peer_server: Home
) -> None:
    running, p1, _ = broker
    token_file = tmp_path / "p1.token"
    token_file.write_text("wrong-token\n")
    code, out = await cli(db_url, "domain", "update", "P1", "--token-file", str(token_file))
    assert code == 0, out
    assert "FAIL auth" in out and "warning" in out  # saved, with the test's warning
    assert "broker deliveries retry --domain P1 --all" in out  # what a 401 leaves: dead letters
    code, out = await cli(db_url, "domain", "test", "P1")
    assert code == 1 and "FAIL auth" in out

    await home_tool(running, "POST", "/Users", new_user(displayName="Bob"))
    await until(_last_error(running), "the peer refuses the wrong token")
    token_file.write_text(peer_server.token + "\n")
    os.utime(token_file, ns=(0, 10**18))  # a change however coarse the clock
    code, out = await cli(db_url, "domain", "test", "P1")
    assert code == 0 and "ok   auth" in out, out
    for row in await running.pool.fetch("SELECT id FROM outbox WHERE state = 'dead'"):
        await admin(running, "POST", f"/admin/deliveries/{row['id']}/retry")
    await quiesce(running)
    assert [u["displayName"] for u in held(p1)["Users"]] == ["Bob"]

    code, out = await cli(db_url, "domain", "test", "D")
    assert code == 1 and "no SCIM URL" in out
    code, out = await cli(db_url, "domain", "test", "P9")
    assert code == 1 and "there is no domain P9" in out


def _last_error(running: Broker) -> object:
    async def refused() -> bool:
        error = await running.pool.fetchval(
            "SELECT last_error::text FROM outbox WHERE domain_id = 'P1' AND last_error IS NOT NULL"
        )
        return error is not None and "401" in error

    return refused


# ---------------------------------------------------------------------------------- start-up


async def test_a_second_process_with_another_key_refuses_to_start(db_url: str) -> None:
    first = {"BROKER_PROPAGATION__SECRET_KEY_ENV": "KEY_ONE", "KEY_ONE": "a" * 43}
    code, out = await _cli_env(db_url, first, "keys", "list")
    assert code == 0, out
    second = {"BROKER_PROPAGATION__SECRET_KEY_ENV": "KEY_TWO", "KEY_TWO": "b" * 43}
    code, out = await _cli_env(db_url, {**second, "BROKER_SERVER__PORT": "0"}, "serve")
    assert code == 2
    assert "not the key of this database" in out and "secret_key_env" in out
    assert "Traceback" not in out
    code, out = await _cli_env(db_url, {"BROKER_SERVER__PORT": "0"}, "serve", home=True)
    assert code == 2 and "secret_key_file" in out  # a URL and no key: none is made


async def _cli_env(
    db_url: str, env: dict[str, str], *args: str, home: bool = False
) -> tuple[int, str]:
    import asyncio
    import sys

    extra = {"HOME": "/nonexistent-home", "XDG_DATA_HOME": "/nonexistent-data"} if home else {}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        *args,
        env={**os.environ, "BROKER_DATABASE_URL": db_url, **env, **extra},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


@pytest.mark.parametrize("where", ["404", "down"])
async def test_readyz_is_not_ready_while_home_answers_404_or_is_down(
    db_url: str, home: Home, where: str
) -> None:
    url = home.url.rsplit("/", 1)[0] + "/nowhere" if where == "404" else "http://127.0.0.1:9/v2"
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url=url, token=home.token),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    async with TestClient(TestServer(create_app(config))) as client:
        response = await client.get("/readyz")
        body = await response.json()
        assert response.status == 503, body
        assert body["checks"]["database"]["status"] == "ok"
        assert body["checks"]["home"]["status"] == "failing"
        assert (await client.get("/healthz")).status == 200


async def test_readyz_is_ready_with_a_home_that_answers(db_url: str, home: Home) -> None:
    config = Config(
        server=ServerConfig(admin_port=0),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url=home.url, token=home.token),
        propagation=PropagationConfig(enabled=False, secret_key_env="TEST_BROKER_KEY"),
    )
    async with TestClient(TestServer(create_app(config))) as client:
        response = await client.get("/readyz")
        body = await response.json()
        assert response.status == 200, body
        assert body["checks"]["home"] == {"status": "ok"}
