"""Issue 14, fuzzed: valid requests of every kind, mutated the way a hostile domain mutates them,
against a real home. For every answer: no internal ID in any byte (any case, glued, escaped,
dashed), no 5xx but the leak guard's 502; after the run, home holds nothing S's policy forbids.

Hypothesis generates the requests (deterministically: ``derandomize``), one per example, from the
IDs of one world set up once; they are then sent against one broker. More requests:
``BROKER_FUZZ_EXAMPLES=10000 pytest tests/test_hostile_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.scim_support import (
    CORE_GROUP,
    CORE_USER,
    ENTERPRISE,
    RECORDER,
    Broker,
    Home,
    id_forms,
    new_user,
    start_broker,
    unique,
)

EXAMPLES = int(os.environ.get("BROKER_FUZZ_EXAMPLES", "2000"))
CONCURRENCY = 4
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
S_WRITES = {"displayname", "nickname"}
GUARD_502 = "withheld a response"


@dataclass
class World:
    """The users and groups every request is drawn around, and every ID each party has."""

    broker: Broker
    tag: str
    internal: list[str] = field(default_factory=list)
    own: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """domain -> "users"/"groups" -> the IDs it holds for what it may write."""
    names: dict[str, list[str]] = field(default_factory=dict)
    foreign: dict[str, list[str]] = field(default_factory=dict)
    """domain -> other domains' IDs (of anything)."""
    s_users: list[str] = field(default_factory=list)
    """Internal IDs of the users S's invariant is checked on (in and out of its scope)."""
    s_groups: list[str] = field(default_factory=list)
    snapshot: dict[str, dict[str, Any]] = field(default_factory=dict)


async def _ids(broker: Broker, domain: str, endpoint: str, attribute: str, value: str) -> str:
    status, listed, _ = await broker.call(
        domain, "GET", f"/{endpoint}", params={"filter": f'{attribute} eq "{value}"'}
    )
    assert status == 200 and listed["totalResults"] == 1, listed
    return str(listed["Resources"][0]["id"])


def _at_home(home: Home, endpoint: str, internal_id: str) -> dict[str, Any]:
    status, body = home.call("GET", f"/{endpoint}/{internal_id}")
    assert status == 200, body
    return {k: v for k, v in body.items() if k != "meta"}


@pytest.fixture
async def world(db_url: str, home: Home) -> AsyncIterator[World]:
    tag = unique("fuzz")
    domains = {
        "D1": {},
        "D2": {},
        "S": {
            "scope_filter": f'title eq "{tag}"',
            "read_attributes": ["userName", "title", "displayName", "members"],
            "write_attributes": ["displayName", "nickName"],
        },
    }
    async for broker in start_broker(db_url, home, domains):
        w = World(broker, tag)

        def create(endpoint: str, body: dict[str, Any], w: World = w) -> dict[str, Any]:
            status, created = home.call("POST", f"/{endpoint}", body)
            assert status == 201, created
            w.internal.append(created["id"])
            return dict(created)

        boss = create("Users", new_user(title="d1-zone"))
        d1_users = [
            create(
                "Users",
                new_user(
                    title="d1-zone",
                    emails=[{"value": f"{unique('m')}@example.com"}],
                    schemas=[CORE_USER, ENTERPRISE],
                    **{ENTERPRISE: {"manager": {"value": boss["id"]}}},
                ),
            )
            for _ in range(3)
        ]
        s_in = [
            create(
                "Users",
                new_user(
                    title=tag,
                    nickName="n",
                    active=True,
                    emails=[{"value": f"{unique('s')}@example.com"}],
                ),
            )
            for _ in range(3)
        ]
        s_out = [create("Users", new_user(title="elsewhere", nickName="o")) for _ in range(2)]
        d1_group = create(
            "Groups",
            {
                "schemas": [CORE_GROUP],
                "displayName": unique("g1"),
                "members": [{"value": u["id"]} for u in d1_users],
            },
        )
        s_group = create(
            "Groups",
            {
                "schemas": [CORE_GROUP],
                "displayName": unique("gs"),
                "members": [{"value": u["id"]} for u in s_in + s_out],
            },
        )
        w.s_users = [u["id"] for u in s_in + s_out]
        w.s_groups = [s_group["id"]]
        for domain, users, group in (("D1", d1_users, d1_group), ("S", s_in, s_group)):
            w.own[domain] = {
                "users": [
                    await _ids(broker, domain, "Users", "userName", u["userName"]) for u in users
                ],
                "groups": [
                    await _ids(broker, domain, "Groups", "displayName", group["displayName"])
                ],
            }
            w.names[domain] = [u["userName"] for u in users]
        everyone = [boss, *d1_users, *s_in, *s_out]
        d1_all = [await _ids(broker, "D1", "Users", "userName", u["userName"]) for u in everyone]
        d2_all = [await _ids(broker, "D2", "Users", "userName", u["userName"]) for u in everyone]
        w.foreign = {"D1": d2_all + w.own["S"]["users"], "S": d1_all + d2_all}
        w.snapshot = {i: _at_home(home, "Users", i) for i in w.s_users} | {
            i: _at_home(home, "Groups", i) for i in w.s_groups
        }
        yield w


# ---------------------------------------------------------------------- requests


@dataclass
class Request:
    domain: str
    method: str
    segments: list[str]
    """Path segments after /scim/v2, already as they go on the wire (percent-encoded or not)."""
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None
    text_edits: list[tuple[str, str]] = field(default_factory=list)
    """(placeholder, raw JSON text) substitutions made after serialising the body."""
    prefix_keys: list[str] = field(default_factory=list)
    """Raw ``"key": value`` members put first in the top-level object (duplicate keys)."""

    def path(self) -> str:
        query = urllib.parse.urlencode(self.query, quote_via=urllib.parse.quote)
        return "/scim/v2/" + "/".join(self.segments) + (f"?{query}" if query else "")

    def data(self) -> str | None:
        if self.body is None:
            return None
        text = json.dumps(self.body)
        for placeholder, raw in self.text_edits:
            text = text.replace(json.dumps(placeholder)[1:-1], raw)
        if self.prefix_keys and text.startswith("{") and len(text) > 2:
            text = "{" + ", ".join(self.prefix_keys) + ", " + text[1:]
        return text


def _patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


@st.composite
def valid_request(draw: st.DrawFn, w: World) -> Request:
    """A request the domain may well be allowed to make (before any mutation)."""
    domain = draw(st.sampled_from(["D1", "S"]))
    uid = draw(st.sampled_from(w.own[domain]["users"]))
    gid = w.own[domain]["groups"][0]
    name = draw(st.sampled_from(w.names[domain]))
    title = w.tag if domain == "S" else "d1-zone"
    writable = (
        {"displayName": unique("fz"), "nickName": "fz"}
        if domain == "S"
        else {"userName": unique("fz"), "title": title, "displayName": "fz"}
    )
    kind = draw(
        st.sampled_from(
            ["get", "list", "search", "get_group", "post", "put", "patch", "patch_group", "delete"]
            + ["bulk"] * 2
        )
    )
    if kind == "get":
        return Request(domain, "GET", ["Users", uid])
    if kind == "list":
        return Request(domain, "GET", ["Users"], {"filter": f'userName eq "{name}"', "count": "5"})
    if kind == "search":
        body = {"schemas": [SEARCH], "filter": f'userName eq "{name}"', "attributes": ["userName"]}
        return Request(domain, "POST", ["Users", ".search"], body=body)
    if kind == "get_group":
        return Request(domain, "GET", ["Groups", gid], {"attributes": "members,displayName"})
    if kind == "post":
        return Request(domain, "POST", ["Users"], body=new_user(unique("fz"), title=title))
    if kind == "put":
        return Request(domain, "PUT", ["Users", uid], body={"schemas": [CORE_USER], **writable})
    if kind == "patch":
        op = {"op": "replace", "path": "displayName", "value": unique("fz")}
        return Request(domain, "PATCH", ["Users", uid], body=_patch(op))
    if kind == "patch_group":
        op = {"op": "add", "path": "members", "value": [{"value": uid}]}
        return Request(domain, "PATCH", ["Groups", gid], body=_patch(op))
    if kind == "delete":  # only ever of what is not the domain's: the path is always planted
        return Request(domain, "DELETE", ["Users", "PLANT"])
    inner = draw(st.sampled_from(["PATCH", "PUT", "POST", "DELETE"]))
    op: dict[str, Any] = {"method": inner, "path": f"/Users/{uid}"}
    if inner == "PATCH":
        op["data"] = _patch({"op": "replace", "path": "displayName", "value": "fz"})
    elif inner == "PUT":
        op["data"] = {"schemas": [CORE_USER], **writable}
    elif inner == "POST":
        op = {"method": "POST", "path": "/Users", "bulkId": "b", "data": new_user(title=title)}
    else:
        op["path"] = "/Users/PLANT"
    return Request(domain, "POST", ["Bulk"], body={"schemas": [BULK], "Operations": [op]})


def _plant_forms(value: str) -> list[str]:
    """The spellings a planted ID takes (glued to -, _ and letters, upper case, dashed)."""
    forms = [value, f"emp-{value}", f"x_{value}", f"abc{value}", value.upper()]
    with contextlib.suppress(ValueError):
        forms.append(str(uuid.UUID(value)))
    return forms


def _dicts(doc: Any) -> list[dict[str, Any]]:
    """Every object in ``doc`` (to mutate one of them)."""
    if isinstance(doc, dict):
        return [doc, *(d for v in doc.values() for d in _dicts(v))]
    if isinstance(doc, list):
        return [d for v in doc for d in _dicts(v)]
    return []


def _flip(text: str) -> str:
    return text.swapcase() if text.lower() != text.upper() else text


@st.composite
def hostile_request(draw: st.DrawFn, w: World) -> Request:
    """A valid request, then up to four of the attacker's mutations."""
    request = draw(valid_request(w))
    plants = [*w.internal, *w.foreign[request.domain]]
    escapes = 0

    def planted(*, in_json: bool = True) -> str:
        nonlocal escapes
        raw = draw(st.sampled_from(_plant_forms(draw(st.sampled_from(plants)))))
        if (
            in_json and draw(st.booleans()) and draw(st.booleans())
        ):  # a JSON escape of its first character
            escapes += 1
            placeholder = f"@@ESC{escapes}@@"
            request.text_edits.append((placeholder, f"\\u{ord(raw[0]):04x}{raw[1:]}"))
            return placeholder
        return raw

    if "PLANT" in request.segments:
        request.segments[request.segments.index("PLANT")] = urllib.parse.quote(
            planted(in_json=False), safe=""
        )
    if isinstance(request.body, dict):
        for op in request.body.get("Operations", []):
            if isinstance(op, dict) and op.get("path") == "/Users/PLANT":
                op["path"] = f"/Users/{planted()}"
    mutations = draw(
        st.lists(
            st.sampled_from(
                [
                    "key_case",
                    "urn",
                    "duplicate",
                    "encode",
                    "dots",
                    "nul",
                    "long",
                    "deep",
                    "plant_path",
                    "plant_filter",
                    "plant_member",
                    "plant_ref",
                    "plant_manager",
                    "plant_external",
                    "plant_query",
                    "op_keys",
                    "escalate",
                    "escalate",
                ]
            ),
            max_size=4,
        )
    )
    objects = _dicts(request.body)
    for mutation in mutations:
        target = draw(st.sampled_from(objects)) if objects else None
        if mutation == "key_case" and target:
            key = draw(st.sampled_from(sorted(target)))
            target[_flip(key)] = target.pop(key)
        elif mutation == "urn" and target:
            key = draw(st.sampled_from(sorted(target)))
            if key != "schemas":
                target[f"{CORE_USER}:{key}"] = target.pop(key)
            if isinstance(target.get("path"), str) and not target["path"].startswith("/"):
                target["path"] = f"{CORE_USER}:{target['path']}"
        elif mutation == "duplicate" and isinstance(request.body, dict) and request.body:
            key = draw(st.sampled_from(sorted(request.body)))
            spelling = draw(st.sampled_from([key, key.upper(), f"{CORE_USER}:{key}"]))
            request.prefix_keys.append(f"{json.dumps(spelling)}: {json.dumps('title-' + key)}")
        elif mutation == "encode" and request.segments:
            i = draw(st.integers(0, len(request.segments) - 1))
            request.segments[i] = "".join(f"%{b:02X}" for b in request.segments[i].encode())
        elif mutation == "dots":
            dots = draw(st.sampled_from(["..", "%2e%2e", "..%2F..%2FUsers%3Fcount%3D0", "."]))
            request.segments.insert(draw(st.integers(0, len(request.segments))), dots)
        elif mutation == "nul":
            if target and draw(st.booleans()):
                key = draw(st.sampled_from(sorted(target)))
                target[key] = f"{target[key]}\u0000" if isinstance(target[key], str) else "\u0000"
            else:
                request.segments[-1] += "%00"
        elif mutation == "long" and target:
            target[draw(st.sampled_from(sorted(target)))] = "x" * 20_000
        elif mutation == "deep" and target:
            deep: Any = "v"
            for _ in range(draw(st.sampled_from([40, 200]))):
                deep = [deep]
            target[draw(st.sampled_from(sorted(target)))] = deep
        elif mutation == "plant_path" and len(request.segments) > 1:
            request.segments[1] = urllib.parse.quote(planted(in_json=False), safe="")
        elif mutation == "plant_filter":
            attribute = draw(
                st.sampled_from(["id", "members.value", "manager.value", "externalId", "userName"])
            )
            in_body = isinstance(request.body, dict) and "filter" in request.body
            expression = f'{attribute} eq "{planted(in_json=in_body)}"'
            if in_body:
                request.body["filter"] = expression
            else:
                request.query["filter"] = expression
        elif mutation == "plant_member" and target is not None:
            target["members"] = [{"value": planted(), "type": "User"}]
        elif mutation == "plant_ref" and target is not None:
            target["members"] = [{"value": planted(), "$ref": f"../Users/{planted()}"}]
        elif mutation == "plant_manager" and target is not None:
            target[ENTERPRISE] = {"manager": {"value": planted()}}
        elif mutation == "plant_external" and target is not None:
            target["externalId"] = planted()
        elif mutation == "plant_query":
            key = draw(
                st.sampled_from(["attributes", "excludedAttributes", "sortBy", "startIndex"])
            )
            request.query[key] = planted(in_json=False)
        elif mutation == "op_keys" and target and "op" in target:
            for key in [k for k in target if k in ("op", "path", "value")]:
                target[draw(st.sampled_from([key.upper(), key.title()]))] = target.pop(key)
        elif mutation == "escalate":
            attribute, value = draw(
                st.sampled_from(
                    [
                        ("title", "elsewhere"),
                        ("userName", unique("taken")),
                        ("active", False),
                        ("emails", [{"value": "evil@example.com"}]),
                        ("nickName", "allowed"),
                    ]
                )
            )
            spelling = draw(
                st.sampled_from([attribute, attribute.upper(), f"{CORE_USER}:{attribute}"])
            )
            patch_lists = [
                d["Operations"]
                for d in objects
                if PATCH_OP in (d.get("schemas") or []) and isinstance(d.get("Operations"), list)
            ]
            if patch_lists:
                if draw(st.booleans()):
                    extra = {"op": "replace", "path": spelling, "value": value}
                else:
                    extra = {"op": "replace", "value": {spelling: value}}
                draw(st.sampled_from(patch_lists)).append(extra)
            elif target is not None:
                target[spelling] = value
    return request


def generate(w: World, count: int) -> list[Request]:
    """``count`` hostile requests, the same ones on every run."""
    drawn: list[Request] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_request(w))
    def collect(request: Request) -> None:
        drawn.append(request)

    collect()
    return drawn


# ---------------------------------------------------------------------- the run


async def _send(session: aiohttp.ClientSession, broker: Broker, r: Request) -> tuple[int, str]:
    url = yarl.URL(broker.base.rsplit("/scim/v2", 1)[0] + r.path(), encoded=True)
    async with session.request(r.method, url, data=r.data(), headers=broker.auth(r.domain)) as a:
        body = await a.text(errors="replace")
        head = "\n".join(f"{k}: {v}" for k, v in a.headers.items())
        return a.status, f"{a.status} {a.reason}\n{head}\n{body}"


async def test_hostile_requests_never_leak_never_fail_and_never_break_policy(
    world: World, home: Home
) -> None:
    """Every answer free of internal IDs in any spelling and of 5xx but the guard's 502; after
    the run, S's out-of-scope users and everything S may not write are as they were."""
    broker = world.broker
    requests = generate(world, EXAMPLES)
    assert len(requests) >= min(EXAMPLES, 2000) * 0.9, len(requests)
    problems: list[str] = []
    policy: list[str] = []
    internal = set(world.internal)
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(requests), CONCURRENCY):
            batch = requests[start : start + CONCURRENCY]
            answers = await asyncio.gather(*(_send(session, broker, r) for r in batch))
            for r, (status, text) in zip(batch, answers, strict=True):
                leaked = id_forms(text) & (internal | RECORDER.home_ids)
                where = f"{r.domain} {r.method} {r.path()[:200]} {str(r.data())[:300]}"
                if leaked:
                    problems.append(f"internal ID {sorted(leaked)[0]} in the answer to {where}")
                if status >= 500 and not (status == 502 and GUARD_502 in text):
                    problems.append(f"{status} for {where}: {text.splitlines()[-1][:200]}")
    for internal_id, before in world.snapshot.items():
        endpoint = "Groups" if internal_id in world.s_groups else "Users"
        status, now = home.call("GET", f"/{endpoint}/{internal_id}")
        if status != 200:
            policy.append(f"home lost {endpoint}/{internal_id} S could see or not: {status}")
            continue
        now = {k: v for k, v in now.items() if k != "meta"}
        in_scope = endpoint == "Users" and before.get("title") == world.tag
        allowed = S_WRITES if in_scope or endpoint == "Groups" else set()
        changed = {
            k
            for k in set(before) | set(now)
            if k.lower() not in allowed and before.get(k) != now.get(k)
        }
        if changed:
            policy.append(
                f"home's {endpoint}/{internal_id} ({'in' if in_scope else 'out of'} S's scope) "
                f"changed in {sorted(changed)}: {json.dumps({k: now.get(k) for k in changed})[:300]}"
            )
    problems = policy + problems
    assert not problems, f"{len(problems)} problem(s) in {len(requests)} requests:\n" + "\n".join(
        problems[:30]
    )
