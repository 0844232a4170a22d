"""The console's pages over plain HTTP against a real federation (home and push peers,
scim2-server processes): an identity's history and the accounts the peers hold (asked by the
peer's own ID: no internal ID reaches a peer), the merge's dry run exactly as the CLI's
``--dry-run`` prints it, a domain's dead letters retried in bulk behind the confirmed count, the
audit chain verified, and the domain lifecycle with the admin API's checks. Every action is
audited with the session's token; a read-only session sees and never acts."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator

import pytest

from broker.app import POOL, STORE
from broker.mapping.render import peer_tasks
from broker.mapping.store import merge_planner
from tests.console_support import client, operator_token, sign_in
from tests.propagation_support import (
    FAST,
    Gate,
    assert_no_internal_id,
    cli,
    federation,
    gate,
    held,
    home_ids,
    home_tool,
    peer_id,
    quiesce,
    tenant,
)
from tests.scim_support import Broker, Home, new_user, unique
from tests.waiting import until


@pytest.fixture
async def fed(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Gate, Home]]:
    """A federation: home, a pull domain D, push peer P1 (direct) and P2 behind a gate. One
    request per write (no SCIM Bulk): the gate's scripted failures count requests, and two
    creates sent in one Bulk request would meet one failure, or a ServiceProviderConfig read
    another (it failed so once in CI)."""
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    alone = FAST.model_copy(update={"bulk_operations": 0})
    async with gate(p2) as front:
        async for broker in federation(
            db_url, home, {"P1": p1.url, "P2": front.url}, monkeypatch, peer_server.token, alone
        ):
            yield broker, front, p1


async def _user(broker: Broker, name: str) -> str:
    status, user = await home_tool(broker, "POST", "/Users", new_user(unique(name)))
    assert status == 201, user
    return str(user["id"])


async def _audited(broker: Broker, action: str) -> list[dict[str, object]]:
    rows = await broker.app[POOL].fetch(
        "SELECT actor, subject, details FROM audit_log WHERE action = $1 ORDER BY seq", action
    )
    return [dict(r) for r in rows]


def _text(page: str) -> str:
    """The page's text, tags dropped, entities decoded, whitespace folded."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


async def test_an_identity_shows_its_history_and_each_peers_account_asked_by_its_own_id(
    fed: tuple[Broker, Gate, Home],
) -> None:
    broker, front, p1 = fed
    internal = await _user(broker, "ada")
    await quiesce(broker)
    l1, l2 = await peer_id(broker, "P1", internal), await peer_id(broker, "P2", internal)
    assert l1 and l2
    front.forwarded.clear()
    async with client() as http:
        await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.get(f"{broker.admin_url}/console/identity?q=P1:{l1}") as response:
            assert response.status == 200
            page = await response.text()
    # P2's account, fetched through the gate: the request named only P2's own ID.
    assert front.forwarded == [("GET", f"/Users/{l2}", None)]
    sent = json.dumps(front.forwarded)
    assert internal not in sent and not any(i in sent for i in home_ids(broker.home))
    accounts = re.findall(r'<details class="account" data-peer="(P\d)"', page)
    assert sorted(accounts) == ["P1", "P2"]
    p2_account = page.split('data-peer="P2"')[1].split("</details>")[0]
    assert "HTTP 200" in p2_account and f'"id": "{l2}"' in html.unescape(p2_account)
    history = _text(page.split('<table class="history">')[1].split("</table>")[0])
    assert f"{internal} write \u2013 create" in history  # home's create, from broker history
    assert "delivery" in history  # and its deliveries to the peers (settled in a batch or not)
    assert_no_internal_id(p1, {internal})

    # A hostile peer's redirect is shown, never followed.
    front.failures = [(302, {"Location": "http://127.0.0.1:9/elsewhere"})]
    async with client() as http:
        await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.get(f"{broker.admin_url}/console/identity?q={internal}") as response:
            page = await response.text()
    p2_account = _text(page.split('data-peer="P2"')[1].split("</details>")[0])
    assert "HTTP 302" in p2_account and "never followed" in p2_account


async def test_the_merge_dry_run_is_the_stores_and_shows_what_the_cli_prints(
    fed: tuple[Broker, Gate, Home], db_url: str
) -> None:
    broker, _, _ = fed
    survivor, loser = await _user(broker, "jsmith"), await _user(broker, "johns")
    await quiesce(broker)
    before = await broker.app[POOL].fetch("SELECT * FROM id_mappings ORDER BY domain_id")
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        async with http.post(
            f"{broker.admin_url}/console/merge/preview",
            data={"csrf": csrf, "survivor": survivor, "losers": loser},
        ) as response:
            assert response.status == 200
            page = await response.text()
    table = page.split('<table class="tasks">')[1].split("</table>")[0]
    shown = [
        tuple(_text(cell) for cell in re.findall(r"<td>(.*?)</td>", row))
        for row in re.findall(r"<tr data-peer=.*?</tr>", table)
    ]
    store = broker.app[STORE]
    preview = await store.preview([survivor, loser], merge_planner(survivor, [loser]))
    assert shown == peer_tasks(preview.plan)
    assert {d for d, *_ in shown} == {"P1", "P2"}
    status, printed = await cli(db_url, "merge", survivor, loser, "--dry-run")
    assert status == 0, printed
    for domain, task, entity, details in shown:
        assert any(
            all(cell in line for cell in (domain, task, entity, details))
            for line in printed.splitlines()
        ), (domain, task, printed)
    after = await broker.app[POOL].fetch("SELECT * FROM id_mappings ORDER BY domain_id")
    assert [dict(r) for r in after] == [dict(r) for r in before], "a dry run changes nothing"


async def test_all_of_a_domains_dead_letters_are_retried_only_at_the_confirmed_count(
    fed: tuple[Broker, Gate, Home],
) -> None:
    broker, front, _ = fed
    front.failures = [(403, {}), (403, {})]  # P2 refuses the next two deliveries: dead letters
    ids = [await _user(broker, "dead1"), await _user(broker, "dead2")]
    await quiesce(broker)
    dead = "SELECT count(*) FROM outbox WHERE domain_id = 'P2' AND state = 'dead'"
    assert await broker.app[POOL].fetchval(dead) == 2
    async with client() as http:
        viewer = await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.post(
            f"{broker.admin_url}/console/deliveries/all",
            data={"csrf": viewer, "domain": "P2", "action": "retry", "expected": "2"},
        ) as response:
            assert response.status == 403
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        async with http.get(f"{broker.admin_url}/console/deliveries?domain=P2") as response:
            assert '<span id="dead-count">2</span>' in await response.text()
        async with http.get(
            f"{broker.admin_url}/console/deliveries/all?domain=P2&action=retry"
        ) as response:
            confirm = await response.text()
            assert 'name="expected" value="2"' in confirm and "Retry all 2" in confirm
        async with http.post(
            f"{broker.admin_url}/console/deliveries/all",
            data={"csrf": csrf, "domain": "P2", "action": "retry", "expected": "1"},
        ) as response:
            assert response.status == 409
            assert "not the 1 confirmed" in await response.text()
        assert await broker.app[POOL].fetchval(dead) == 2, "a stale count settles nothing"
        async with http.post(
            f"{broker.admin_url}/console/deliveries/all",
            data={"csrf": csrf, "domain": "P2", "action": "retry", "expected": "2"},
        ) as response:
            assert response.status == 200
            assert "retry of 2 dead letters of P2" in _text(await response.text())
    await quiesce(broker)
    assert await broker.app[POOL].fetchval(dead) == 0
    for internal in ids:
        assert await peer_id(broker, "P2", internal) is not None
    (entry,) = await _audited(broker, "deliveries_retry")
    assert str(entry["actor"]).startswith("H token ")


async def test_the_audit_page_verifies_the_chain_and_shows_a_break(
    fed: tuple[Broker, Gate, Home],
) -> None:
    broker, _, _ = fed
    async with client() as http:
        await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.get(f"{broker.admin_url}/console/audit?verify=1") as response:
            page = _text(await response.text())
        assert "Intact: all" in page and "BROKEN" not in page
        async with broker.app[POOL].acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE audit_log SET actor = 'someone else' "
                "WHERE id = (SELECT min(id) FROM audit_log)"
            )
        async with http.get(f"{broker.admin_url}/console/audit?verify=1") as response:
            page = _text(await response.text())
        assert "BROKEN: 0 rows hold, then row" in page


async def test_domains_are_added_changed_disabled_enabled_and_tested_with_the_apis_checks(
    fed: tuple[Broker, Gate, Home], peer_server: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, _, _ = fed
    pool = broker.app[POOL]
    count = "SELECT count(*) FROM domains"
    domains_before = await pool.fetchval(count)
    url = f"{broker.admin_url}/console/domains"
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        refusals = {
            "a domain name is 1 to 63": {"domain": "no spaces"},
            "the broker's own configuration or secrets": {
                "domain": "N1",
                "token_env": "BROKER_HOME_TOKEN",
            },
            "is not a SCIM filter": {"domain": "N1", "scope": "userName eq"},
        }
        for said, form in refusals.items():
            async with http.post(url, data={"csrf": csrf, **form}) as response:
                assert response.status == 400, said
                assert said in html.unescape(await response.text())
        assert await pool.fetchval(count) == domains_before, "a refusal adds nothing"

        peer = tenant(peer_server, "n1")
        monkeypatch.setenv("N1_TOKEN", peer_server.token)
        form = {"csrf": csrf, "domain": "N1", "scim_url": peer.url, "token_env": "N1_TOKEN"}
        async with http.post(url, data={**form, "push": "on"}) as response:
            assert response.status == 201
            page = await response.text()
        assert '<span class="ok" id="test-verdict">it works</span>' in page
        async with http.post(
            f"{url}/N1", data={**_fields(page), "csrf": csrf, "scope": 'userName sw "a"'}
        ) as response:
            assert response.status == 200
        scope = "SELECT scope_filter FROM domains WHERE id = 'N1'"
        assert await pool.fetchval(scope) == 'userName sw "a"'
        for bad in ({"scope": "userName eq"}, {"token_env": "BROKER_HOME_TOKEN"}):
            async with http.post(
                f"{url}/N1", data={**_fields(page), "csrf": csrf, **bad}
            ) as response:
                assert response.status == 400, bad
        assert await pool.fetchval(scope) == 'userName sw "a"', "a refused change changes nothing"
        for action, status in (("disable", "disabled"), ("enable", "active")):
            async with http.post(f"{url}/N1/{action}", data={"csrf": csrf}) as response:
                assert f'id="domain-status">{status}<' in await response.text()
        async with http.post(f"{url}/N1/test", data={"csrf": csrf}) as response:
            assert "SCIM service found" in await response.text()
    actions = ["domain_add", "domain_update", "domain_disable", "domain_enable", "domain_test"]
    for action in actions:
        (entry,) = [e for e in await _audited(broker, action) if e["subject"] == "N1"]
        assert str(entry["actor"]).startswith("H token "), action

    async with client() as http:
        viewer = await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.get(f"{url}/N1") as response:
            page = await response.text()
        assert "<form" not in page.split("</header>")[1], "a viewer is shown no form"
        async with http.post(f"{url}/N1/disable", data={"csrf": viewer}) as response:
            assert response.status == 403
    assert await pool.fetchval("SELECT status FROM domains WHERE id = 'N1'") == "active"


def _fields(page: str) -> dict[str, str]:
    """The settings form's fields as the page fills them (a browser would send these)."""
    form = page.split('class="stack">', 1)[1].split("</form>")[0]
    out = dict(re.findall(r'<input id="[^"]+" name="([^"]+)" value="([^"]*)"', form))
    out |= {n: "on" for n in re.findall(r'name="(\w+)" value="on" checked', form)}
    for name, body in re.findall(r'<select id="\w+" name="(\w+)">(.*?)</select>', form):
        out[name] = re.findall(r"<option selected>([^<]*)</option>", body)[0]
    return {k: html.unescape(v) for k, v in out.items()}


@pytest.fixture
async def world(
    db_url: str, peer_server: Home, homes_server: Home, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Home, Home]]:
    """A home of the test's own and a push peer P that holds accounts already."""
    home, peer = tenant(homes_server, "home"), tenant(peer_server, "peer")
    async for broker in federation(db_url, home, {"P": peer.url}, monkeypatch, peer_server.token):
        yield broker, home, peer


def _made(server: Home, name: str) -> str:
    status, made = server.call("POST", "/Users", new_user(name))
    assert status == 201, made
    return str(made["id"])


async def _finished(broker: Broker, run: str) -> str:
    async def phase() -> str | None:
        found = await broker.app[POOL].fetchval(
            "SELECT phase FROM reconciliations WHERE id = $1::uuid", run
        )
        return found if found in ("done", "stopped", "failed") else None

    return await until(phase, f"reconciliation {run} ends")


async def test_a_reconciliation_dry_run_shows_each_situations_accounts_then_is_applied(
    world: tuple[Broker, Home, Home],
) -> None:
    broker, home, peer = world
    alice, bob = _made(home, "alice"), _made(home, "bob")  # home's, unknown to the broker
    alice_there, stray = _made(peer, "ALICE"), _made(peer, "stray")
    url = f"{broker.admin_url}/console/reconcile"
    async with client() as http:
        viewer = await sign_in(http, broker, await operator_token(broker, ["console:read"]))
        async with http.post(url, data={"csrf": viewer, "domain": "P"}) as response:
            assert response.status == 403
    assert await broker.app[POOL].fetchval("SELECT count(*) FROM reconciliations") == 0
    async with client() as http:
        csrf = await sign_in(http, broker, await operator_token(broker))
        async with http.post(url, data={"csrf": csrf, "domain": "P", "mode": "dry"}) as response:
            run = str(response.url).rsplit("/", 1)[1]
        assert await _finished(broker, run) == "done"
        async with http.get(f"{url}/{run}") as response:
            page = await response.text()
        counts = dict(re.findall(r'<tr data-situation="(\w+)">.*?<td>(\d+)</td>', page))
        assert (counts["unlinked"], counts["unmatched"], counts["missing"]) == ("1", "1", "1")
        unmatched = page.split('id="s-unmatched"')[1].split("</section>")[0]
        assert stray in unmatched and alice_there not in unmatched
        missing = page.split('id="s-missing"')[1].split("</section>")[0]
        assert bob in missing
        assert await peer_id(broker, "P", alice) is None, "a dry run links nothing"

        apply = page.split('action="/console/reconcile" class="inline">')[1].split("</form>")[0]
        fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', apply))
        assert fields["mode"] == "apply" and fields["on_unmatched"] == "report"
        async with http.post(url, data={**fields, "csrf": csrf}) as response:
            applied = str(response.url).rsplit("/", 1)[1]
        assert applied != run and await _finished(broker, applied) == "done"
    await quiesce(broker)
    assert await peer_id(broker, "P", alice) == alice_there, "linked, not duplicated"
    assert await peer_id(broker, "P", bob) is not None, "created"
    assert {u["id"] for u in held(peer)["Users"]} >= {alice_there, stray}
    starts = await _audited(broker, "reconcile.start")
    assert len(starts) == 2 and all(str(s["actor"]).startswith("H token ") for s in starts)
    assert_no_internal_id(peer, home_ids(home))
