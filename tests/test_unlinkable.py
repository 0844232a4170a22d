"""Unlinkability beyond IDs, end to end: two domains that hear of one change in home get SETs
that share no txn, no version and (for an unlinkable domain) no precise time, on a real home, a
real database and the broker's own application."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.app import SEALER
from broker.domains import DomainStore
from broker.errors import InvalidValueError
from tests.propagation_support import FAST, cli, federation, home_tool, patch
from tests.scim_support import Broker, Home, new_user, unique
from tests.test_events import (
    EVENTS,
    PROV,
    add_domain,
    broker_db,
    poll,
    seen_id,
    subscribe,
    verified,
)

HOUR = 3600
# Whole seconds, no fraction, in the zone form home used.
COARSE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})")


@pytest.fixture
async def broker(db_url: str, home: Home, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Broker]:
    async for started in federation(db_url, home, {}, monkeypatch, home.token, FAST, EVENTS):
        await add_domain(started, "U", unlinkable=True, timestamp_precision=HOUR)
        await add_domain(started, "E")
        yield started


async def test_two_domains_sets_for_one_change_share_no_txn_version_or_precise_time(
    broker: Broker,
) -> None:
    for domain in ("U", "E"):
        await subscribe(broker, domain, "--delivery", "poll", "--detail", "full")
    name = unique("ul")
    status, created = await home_tool(broker, "POST", "/Users", new_user(name))
    assert status == 201, created
    status, _ = await home_tool(
        broker,
        "PATCH",
        f"/Users/{created['id']}",
        patch({"op": "replace", "path": "title", "value": "Lead"}),
    )
    assert status in (200, 204)
    _, home_now = await home_tool(broker, "GET", f"/Users/{created['id']}")

    _, got_u = await poll(broker, "U", returnImmediately=True)
    _, got_e = await poll(broker, "E", returnImmediately=True)
    u_sets = await verified(broker, "U", got_u["sets"])
    e_sets = await verified(broker, "E", got_e["sets"])
    assert len(u_sets) == len(e_sets) == 2

    # txn: each domain its own, one per change (RFC 8417 section 2.2).
    assert len({c["txn"] for c in u_sets}) == 2
    assert not {c["txn"] for c in u_sets} & {c["txn"] for c in e_sets}

    # iat: the unlinkable domain's is truncated to its precision.
    assert all(c["iat"] % HOUR == 0 for c in u_sets), [c["iat"] for c in u_sets]

    u_data = [next(iter(c["events"].values()))["data"] for c in u_sets]
    e_data = [next(iter(c["events"].values()))["data"] for c in e_sets]
    for u, e in zip(u_data, e_data, strict=True):
        # Versions: never home's, never the same for two domains, opened back by the broker.
        assert u["meta"]["version"] != e["meta"]["version"]
        sealer = broker.app[SEALER]
        for domain, data in (("U", u), ("E", e)):
            opened = sealer.open(data["meta"]["version"], domain=domain, internal_id=created["id"])
            assert opened is not None and opened.startswith('W/"'), opened
            assert opened != data["meta"]["version"]
        # Timestamps: truncated for U, as home wrote them for E.
        for stamp in ("created", "lastModified"):
            assert COARSE.fullmatch(u["meta"][stamp]), u["meta"]
            assert u["meta"][stamp][14:19] == "00:00", "truncated to the hour"
    assert e_data[-1]["meta"]["lastModified"] == home_now["meta"]["lastModified"]
    assert u_data[-1]["meta"]["lastModified"] != home_now["meta"]["lastModified"]
    assert PROV + "patch:full" in u_sets[1]["events"]
    u_id = await seen_id(broker, "U", name)
    assert [c["sub_id"]["uri"] for c in u_sets] == [f"/Users/{u_id}"] * 2


async def test_an_unlinkable_domain_is_registered_from_the_command_line(broker: Broker) -> None:
    code, out = await cli(
        broker_db(broker), "domain", "add", "V", "--unlinkable", "--timestamp-precision", "60"
    )
    assert code == 0, out
    assert "unlinkable:  yes (timestamps to 60 s)" in out
    domain = await DomainStore(broker.pool).get("V")
    assert domain.unlinkable and domain.timestamp_precision == 60
    plain = await DomainStore(broker.pool).get("E")
    assert not plain.unlinkable and plain.timestamp_precision == 1


@pytest.mark.parametrize("precision", ["0", "-5", "86401"])
async def test_a_timestamp_precision_out_of_range_is_refused(
    broker: Broker, precision: str
) -> None:
    code, out = await cli(
        broker_db(broker), "domain", "add", "W", "--unlinkable", "--timestamp-precision", precision
    )
    assert code == 1, out
    assert "a timestamp precision is a whole number of seconds from 1 to 86400" in out
    assert "W" not in {d.id for d in await DomainStore(broker.pool).list()}


async def test_a_timestamp_precision_without_unlinkable_is_refused(broker: Broker) -> None:
    with pytest.raises(InvalidValueError, match="--unlinkable"):
        await DomainStore(broker.pool).add("W", timestamp_precision=60)
    assert "W" not in {d.id for d in await DomainStore(broker.pool).list()}


# ------------------------------------------------------------------ the proxy
# These drive the request path (broker/proxy/handlers.py calls broker/scim/versions.py).


async def _user(broker: Broker) -> tuple[str, dict[str, Any]]:
    name = unique("ul")
    status, created = await home_tool(broker, "POST", "/Users", new_user(name, title="Eng"))
    assert status == 201, created
    return name, created


async def test_two_domains_read_one_user_with_different_versions_neither_homes(
    broker: Broker,
) -> None:
    name, created = await _user(broker)
    seen = {}
    for domain in ("D", "U"):
        ext = await seen_id(broker, domain, name)
        status, body, headers = await broker.call(domain, "GET", f"/Users/{ext}")
        assert status == 200, body
        assert headers["ETag"] == body["meta"]["version"]
        seen[domain] = body
    versions = {b["meta"]["version"] for b in seen.values()}
    assert len(versions) == 2 and created["meta"]["version"] not in versions
    assert all(v.startswith('W/"') for v in versions)
    assert COARSE.fullmatch(seen["U"]["meta"]["created"]), seen["U"]["meta"]
    assert seen["U"]["meta"]["created"][14:19] == "00:00"


async def test_if_match_with_homes_or_another_domains_version_is_412_and_changes_nothing(
    broker: Broker,
) -> None:
    name, created = await _user(broker)
    d_ext, u_ext = await seen_id(broker, "D", name), await seen_id(broker, "U", name)
    _, u_body, _ = await broker.call("U", "GET", f"/Users/{u_ext}")
    change = patch({"op": "replace", "path": "title", "value": "Lead"})
    for forged in (created["meta"]["version"], u_body["meta"]["version"], '"made-up"'):
        status, body, _ = await broker.call(
            "D", "PATCH", f"/Users/{d_ext}", change, headers={"If-Match": forged}
        )
        assert status == 412, body
    _, now = await home_tool(broker, "GET", f"/Users/{created['id']}")
    assert now["title"] == "Eng" and now["meta"]["version"] == created["meta"]["version"]
    _, d_body, _ = await broker.call("D", "GET", f"/Users/{d_ext}")
    status, body, headers = await broker.call(
        "D", "PATCH", f"/Users/{d_ext}", change, headers={"If-Match": d_body["meta"]["version"]}
    )
    assert status in (200, 204), body
    assert headers["ETag"] != d_body["meta"]["version"]
    assert body is None or headers["ETag"] == body["meta"]["version"]


async def test_if_none_match_with_the_domains_own_etag_is_304_and_with_another_is_200(
    broker: Broker,
) -> None:
    name, _created = await _user(broker)
    d_ext, u_ext = await seen_id(broker, "D", name), await seen_id(broker, "U", name)
    _, d_body, _ = await broker.call("D", "GET", f"/Users/{d_ext}")
    _, u_body, _ = await broker.call("U", "GET", f"/Users/{u_ext}")
    status, _, headers = await broker.call(
        "D", "GET", f"/Users/{d_ext}", headers={"If-None-Match": d_body["meta"]["version"]}
    )
    assert status == 304 and headers["ETag"] == d_body["meta"]["version"]
    status, body, _ = await broker.call(
        "D", "GET", f"/Users/{d_ext}", headers={"If-None-Match": u_body["meta"]["version"]}
    )
    assert status == 200 and body["meta"]["version"] == d_body["meta"]["version"]


@pytest.mark.parametrize(
    "query",
    [
        'filter=meta.lastModified gt "2024-01-01T00:00:00Z"',
        "sortBy=meta.created",
        'filter=meta.version gt "W/\\"1\\""',
    ],
)
async def test_an_unlinkable_domain_may_not_bisect_timestamps_or_versions(
    broker: Broker, query: str
) -> None:
    await _user(broker)
    status, body, _ = await broker.call("U", "GET", f"/Users?{query}")
    assert status == 400, body
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
